"""``PromptTuner``: learn a soft prompt for a template through a frozen causal LM
(docs/ARCHITECTURE.md, 'PromptTuner')."""
from __future__ import annotations

import json
import random
import time
from typing import Any, Callable, Mapping, Sequence

import torch

from . import __version__
from .errors import ConfigError, DataError, NonFiniteError, PromptFileError
from .engines import make_engine
from .engines.base import resolve_precision
from .guard import Interrupted, NonFiniteGuard
from .metrics import word_metrics
from .methods import make_method, method_class
from .models import max_positions
from .options import api_defaults, check_api
from .promptfile import check_fits, method_record, read_prompt_file, save_prompt_file
from .sharding import tables_held
from .step import ManyStep, TrainStep
from .template import Encoded, Template, TemplateEncoder

# Keywords that are also options of the CLI share its declaration (fastprompt/options.py): default and check.
NEW = api_defaults("PromptTuner")
FIT = api_defaults("PromptTuner.fit")


class PromptTuner:
    """A trainable ``(prompt_len, d)`` fp32 prompt for ``template``, the model frozen.

    ``engine``: ``auto`` (fused for GPT-2, generic otherwise), ``naive`` (the post's loop), ``generic``,
    ``fused``. ``precision``: ``fp32``, ``bf16`` (frozen weights cast once, prompt kept in fp32),
    ``autocast`` (the post's bf16 autocast) or ``auto``, the default (bf16 on CUDA, fp32 on the CPU;
    ``self.precision`` holds the choice). The model is never modified.

    ``method``: how the trained tensor ``prompt`` becomes the prompt (``fastprompt/methods/``): ``soft``
    (``prompt`` is the ``(prompt_len, d)`` prompt), ``relaxed`` (``prompt``: ``(prompt_len, V)`` vocabulary
    logits), ``hard`` (PEZ: ``prompt`` continuous, the forward uses its nearest tokens), ``prefix``
    (``prompt``: per-layer K/V, ``(n_layer, 2, prompt_len, heads, head_dim)``); ``method_options``: its options.
    """

    def __init__(self, model, tokenizer, template: Template | str = NEW.template, prompt_len: int = NEW.prompt_len,
                 *, engine: str = NEW.engine, precision: str = NEW.precision, init: str = NEW.init,
                 seed: int = NEW.seed, prompt: torch.Tensor | None = None, method: str = NEW.method,
                 method_options: dict[str, Any] | None = None, **engine_options):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template if isinstance(template, Template) else Template(template)
        check_api("PromptTuner", prompt_len=prompt_len, seed=seed)
        limit = max_positions(model)
        if limit is not None and prompt_len >= limit:
            raise ConfigError(f"prompt length {prompt_len} leaves no room in the model's context of {limit} tokens")
        self.encoder = TemplateEncoder(self.template, tokenizer, prompt_len, max_len=limit)
        self.seed = seed
        self.device = next(model.parameters()).device
        self.method = make_method(method, model, tokenizer, self.encoder, **(method_options or {}))
        self.method.seed = seed  # a discrete search's sampling seed (gcg)
        if prompt is None:
            prompt = self.method.init(init, seed, absorb_space=_absorbs_space(self.template))
        self.method.check(prompt)
        self.prompt = torch.nn.Parameter(prompt.detach().float().to(self.device).clone())
        precision = resolve_precision(precision, self.device, engine)
        self.engine = make_engine(engine, model, self.encoder, precision, **engine_options)
        self.precision = precision
        self.optimizer: torch.optim.Optimizer | None = None
        self.history: list[dict[str, Any]] = []
        self.nonfinite = NonFiniteGuard(limit=3)  # NaN/inf steps are not applied; 3 in a row stop fit
        self.resume_at: dict[str, Any] | None = None  # an epoch in progress, set by fastprompt.checkpoint
        # (eval_data, metrics, examples decoded) of the current prompt's last evaluation in fit, cleared by a
        # step: the final report reuses what it covers (fastprompt/report.py)
        self.last_eval: tuple | None = None
        self.stopped: str | None = None  # why the last fit stopped early: "max_steps", "max_seconds" or None
        self._step = None  # the training step (fastprompt/step.py), built by the first train_step
        self._batch_size = 64

    # ----------------------------------------------------------------------------------------- loss
    @property
    def prompt_len(self) -> int:
        return self.encoder.prompt_len

    def encode(self, examples: Sequence[Any]) -> list[Encoded]:
        """Tokenise and check every example (template/data/context errors surface here, before training)."""
        return self.encoder.encode_all(examples)

    def loss(self, examples: Sequence[Any]) -> torch.Tensor:
        """Token-weighted mean target cross-entropy over ``examples``, differentiable w.r.t. ``prompt``."""
        batch = examples if examples and isinstance(examples[0], Encoded) else self.encode(examples)
        ce_sum, n_tokens = self.engine.loss_terms(self.method.inputs(self.prompt), batch)
        return ce_sum / n_tokens

    # ------------------------------------------------------------------------------------- training
    def uses_cuda_graphs(self) -> bool:
        """Whether steps are captured as CUDA graphs (the engine decides: fused with --cuda-graphs; fastprompt/step.py)."""
        return self.engine.graphs_enabled()

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        extra = {"capturable": True} if self.uses_cuda_graphs() else {}  # Adam's step counter on the device
        return torch.optim.Adam(self.method.param_groups(self.prompt, lr), lr=lr, **extra)

    def train_step(self, batch: Sequence[Encoded]) -> torch.Tensor:
        """One Adam step on ``batch`` (fastprompt/step.py); returns the batch's summed CE (detached, on the
        device; 0 for a NaN/inf step, which is not applied). A discrete method (gcg) takes its own step
        instead (``method.discrete_step``: a search over token swaps, no optimizer)."""
        if getattr(self.method, "discrete", False):
            return self.method.discrete_step(self.engine, self.prompt, batch)
        step = self._step
        if step is None or step.optimizer is not self.optimizer or step.engine is not self.engine \
                or step.batch_size != self._batch_size:  # built anew when what it holds changes
            self._step = TrainStep(self.method, self.engine, self.prompt, self.optimizer, self.nonfinite,
                                   self._batch_size)
        return self._step(batch)

    def batches(self, encoded: Sequence[Encoded], batch_size: int, epoch: int) -> list[list[Encoded]]:
        """The epoch's shuffled batches (seeded by ``seed`` and ``epoch``; the last one may be partial)."""
        order = list(range(len(encoded)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return [[encoded[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]

    def fit(self, train: Sequence[Any], epochs: int = FIT.epochs, batch_size: int = FIT.batch_size,
            lr: float = FIT.lr, eval_data: Sequence[Any] | None = None, progress: bool = True,
            callback: Callable[[dict[str, Any]], None] | None = None,
            step_callback: Callable[[dict[str, Any]], None] | None = None, *, eval_every: int = FIT.eval_every,
            eval_size: int | None = FIT.eval_size, max_steps: int | None = FIT.max_steps,
            max_seconds: float | None = FIT.max_seconds) -> list[dict[str, Any]]:
        """Train for ``epochs``; returns the history, one dict an epoch (train loss, steps, seconds, target tokens
        a second of training (``train_target_tokens_per_second``), Adam's learning rate (``lr``, the first
        parameter group's) and, with ``eval_data``, the test loss through the engine; every ``eval_every``
        epochs also the generation metrics of ``evaluate`` on at most ``eval_size`` of the ``eval_data``
        examples). The defaults and checks of ``epochs`` ... ``max_seconds`` are the CLI options' of the same
        names (fastprompt/options.py; ``epochs``, ``eval_every`` and ``eval_size`` default lower here).

        Budgets: training stops after ``max_steps`` optimizer steps or once ``max_seconds`` have passed in
        this call, at the end of a whole step. A stop inside an epoch leaves ``resume_at`` set, so that the
        next ``fit`` (or a checkpoint written now) continues that epoch where it stopped; ``stopped`` says
        why (``None`` when every epoch ran).

        ``step_callback`` gets ``{"epoch", "step", "steps", "ce_sum", "n_tokens"}`` after every step (epoch from
        0, step = batches done in it). With ``resume_at`` set (``fastprompt.checkpoint`` or a budget stop), the
        first epoch skips the batches already done and carries their summed loss."""
        run = self._fitting(train, epochs, batch_size, lr, eval_data, progress, callback, step_callback,
                            eval_every=eval_every, eval_size=eval_size, max_steps=max_steps, max_seconds=max_seconds)
        try:
            batch = next(run)
            while True:
                batch = run.send(self.train_step(batch))
        except StopIteration:
            pass
        return self.history

    def _fitting(self, train, epochs, batch_size, lr, eval_data, progress, callback, step_callback, *,
                 eval_every, eval_size, max_steps, max_seconds):
        """``fit`` as a generator: yields each step's batch and is sent back that step's summed CE (the step is
        the caller's: ``fit`` takes it alone, ``fit_many`` with other prompts in one pass); every other part of
        training (epochs, budgets, resume, the guard's stop, evaluation, history, callbacks) is here."""
        check_api("PromptTuner.fit", epochs=epochs, batch_size=batch_size, lr=lr, eval_every=eval_every,
                  eval_size=eval_size, max_steps=max_steps, max_seconds=max_seconds)
        encoded = self.encode(train)
        if eval_data:
            self.encode(eval_data)  # check the evaluation data before training starts
        if self.optimizer is None:
            self.optimizer = self.make_optimizer(lr)
        self._batch_size = batch_size
        from tqdm.auto import tqdm

        started = time.perf_counter()
        self.stopped = None
        start_epoch = len(self.history)
        resume, self.resume_at = self.resume_at, None
        skip = resume["step"] if resume else 0
        per_epoch = -(-len(encoded) // batch_size)
        # steps over the tuner's life (histories written before steps were recorded: full epochs of this size)
        step_total = (self.history[-1].get("step", len(self.history) * per_epoch) if self.history else 0) + skip
        planned = max(0, epochs * per_epoch - skip)
        self.method.plan(planned if max_steps is None else min(planned, max_steps))  # schedules (relaxed: tau)
        taken = 0  # steps taken in this call
        for epoch in range(start_epoch, start_epoch + epochs):
            t0 = time.perf_counter()
            batches = self.batches(encoded, batch_size, epoch)
            done = skip if epoch == start_epoch else 0  # batches already done (resumed mid-epoch)
            total = torch.full((), resume["ce_sum"] if done else 0.0, device=self.device)
            n_tokens = carried = resume["n_tokens"] if done else 0
            bar = tqdm(batches[done:], desc=f"epoch {epoch + 1}", unit="batch", disable=not progress, leave=False,
                       initial=done, total=len(batches))
            for step, batch in enumerate(bar, start=done):
                if _over_budget(taken, max_steps, started, max_seconds):
                    self.stopped = "max_steps" if max_steps is not None and taken >= max_steps else "max_seconds"
                    self.resume_at = {"step": step, "ce_sum": total.item(), "n_tokens": n_tokens}
                    bar.close()
                    return
                ce_sum = yield batch
                self.last_eval = None  # the prompt moved
                taken += 1
                step_total += 1
                if self.nonfinite.streak == 0:  # a skipped step adds nothing to the epoch's loss
                    total += ce_sum
                    n_tokens += sum(e.target_len for e in batch)
                self.nonfinite.raise_if_stuck(epoch + 1, step + 1)
                if progress and (step % 10 == 0 or step == len(batches) - 1):  # reading the loss syncs the host
                    seen = sum(len(b) for b in batches[: step + 1])
                    bar.set_postfix(loss=f"{total.item() / max(n_tokens, 1):.4f}",
                                    ex_s=f"{seen / (time.perf_counter() - t0):.0f}")
                if step_callback is not None:
                    step_callback({"epoch": epoch, "step": step + 1, "steps": len(batches), "ce_sum": total,
                                   "n_tokens": n_tokens})
            bar.close()
            record: dict[str, Any] = {"epoch": epoch + 1, "step": step_total,
                                      "train_loss": total.item() / n_tokens if n_tokens else float("nan")}
            record["train_seconds"] = time.perf_counter() - t0
            if record["train_seconds"] > 0:  # target tokens of this call's applied steps
                record["train_target_tokens_per_second"] = (n_tokens - carried) / record["train_seconds"]
            record["lr"] = self.optimizer.param_groups[0]["lr"]  # what Adam used (relaxed: lr x lr_scale)
            if eval_data:
                t_eval = time.perf_counter()
                generation = bool(eval_every) and (epoch + 1) % eval_every == 0
                metrics = self.evaluate(eval_data, generation=generation, generation_size=eval_size,
                                        progress=progress)
                record.update({f"test_{k}": v for k, v in metrics.items()})
                decoded = generation_count(len(eval_data), eval_size) if generation else 0
                self.last_eval = (eval_data, metrics, decoded)
                record["eval_seconds"] = time.perf_counter() - t_eval
            record["seconds"] = time.perf_counter() - t0
            self.history.append(record)
            if callback is not None:
                callback(record)

    def variant(self, *, init: str | None = None, seed: int | None = None,
                prompt: torch.Tensor | None = None) -> "PromptTuner":
        """A new tuner on this one's model, template, prompt length, method and options, with its own prompt
        (``init`` and ``seed``, or ``prompt``), optimizer and guard, sharing this tuner's engine (nothing of the
        model is copied again): the points of ``fit_many``."""
        seed = self.seed if seed is None else seed
        if prompt is None:
            prompt = self.method.init(init or NEW.init, seed, absorb_space=_absorbs_space(self.template))
        other = object.__new__(type(self))
        other.__dict__.update({k: v for k, v in self.__dict__.items()})
        other.seed = seed
        other.method = make_method(self.method.name, self.model, self.tokenizer, self.encoder,
                                   **self.method.options())
        other.method.check(prompt)
        other.prompt = torch.nn.Parameter(prompt.detach().float().to(self.device).clone())
        other.optimizer, other.history, other._step = None, [], None
        other.nonfinite = NonFiniteGuard(limit=self.nonfinite.limit)
        other.resume_at = other.last_eval = other.stopped = None
        return other

    @staticmethod
    def fit_many(tuners: Sequence["PromptTuner"], fits: Sequence[Mapping[str, Any]]) -> list[Any]:
        """Train K tuners together, tuner ``k`` as ``tuners[k].fit(**fits[k])`` would alone (its own data,
        learning rate, epochs, budgets, evaluation, callbacks; its own optimizer, guard and history), the
        steps taken together: each round, one ``engine.loss_terms_many`` pass over the weights for every tuner
        still training (fastprompt/step.py: ``ManyStep``). The tuners share one engine (``variant``), or have
        engines that join it (``Engine.joins``: the same model, template and settings, other prompt lengths;
        one pass for all where the engine takes several lengths, ``ManyStep.one_pass``). A tuner whose guard
        stops it (NaN/inf steps in a row) stops alone: its entry in the returned list is that
        ``NonFiniteError``, the others' their history. A signal (``guard.Interrupted`` from a point's
        callback) lets every point of the round take its callback (each checkpoints) before it is raised.
        With the same seeds every prompt ends exactly as its own ``fit`` would (docs/ARCHITECTURE.md,
        'K prompts in one pass')."""
        if len(tuners) != len(fits):
            raise ConfigError(f"{len(tuners)} tuners but {len(fits)} fit argument sets")
        engine = tuners[0].engine
        if any(not engine.joins(t.engine) for t in tuners):
            raise ConfigError("fit_many trains tuners that share one engine (make them with tuner.variant(...)), "
                              "or engines of one kind over the same model, template and precision that differ "
                              "only in prompt length")
        results: list[Any] = [None] * len(tuners)
        runs: dict[int, Any] = {}
        batches: dict[int, Any] = {}
        for k, (tuner, kwargs) in enumerate(zip(tuners, fits)):
            unknown = set(kwargs) - set(FIT_ARGS)
            if unknown:
                raise ConfigError(f"fit_many: fit takes no argument {', '.join(sorted(unknown))}")
            args = {**FIT_ARGS, **kwargs}
            train = args.pop("train")
            if train is None:
                raise ConfigError(f"fit_many: point {k} has no train data")
            runs[k] = tuner._fitting(train, **{a: args[a] for a in ("epochs", "batch_size", "lr", "eval_data",
                                                                     "progress", "callback", "step_callback")},
                                     **{a: args[a] for a in ("eval_every", "eval_size", "max_steps", "max_seconds")})
        for k in list(runs):
            _advance(runs, batches, results, tuners, k, None, first=True)
        _raise_interrupted(results)
        while runs:
            active = sorted(runs)
            steps = []
            for k in active:
                t = tuners[k]
                if t._step is None or t._step.optimizer is not t.optimizer or t._step.batch_size != t._batch_size:
                    t._step = TrainStep(t.method, t.engine, t.prompt, t.optimizer, t.nonfinite, t._batch_size,
                                        static=False)
                steps.append(t._step)
            ces = ManyStep(engine, steps)([batches[k] for k in active])
            for k, ce in zip(active, ces):
                _advance(runs, batches, results, tuners, k, ce)
            _raise_interrupted(results)
        return results

    # ----------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, examples: Sequence[Any], batch_size: int = 256, *, generation: bool = True,
                 generation_size: int | None = None, progress: bool = False, loss: bool = True) -> dict[str, float]:
        """``loss``: token-weighted target cross-entropy through the engine, on every example. With
        ``generation`` (on at most ``generation_size`` examples, the first ones): the greedily decoded word
        compared with the target (``exact_match``) and with each input field's value (``parrot_rate``, the
        failure the post observed), both after ``normalize_word`` (surrounding punctuation and whitespace
        stripped, case folded); ``exact_match_strict`` / ``parrot_rate_strict`` compare the raw words.
        ``batch_size``: examples a forward (larger than training's: nothing is kept for a backward).
        ``loss=False`` leaves the loss out (a caller that has it already: the last epoch's test loss)."""
        encoded = self.encode(examples)
        n_gen = generation_count(len(encoded), generation_size) if generation else 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encoded) * loss + n_gen, desc="evaluate", unit="ex", disable=not progress, leave=False)
        metrics = {}
        if loss:
            total, n_tokens = 0.0, 0
            prompt = self.method.inputs(self.prompt.detach())
            for i in range(0, len(encoded), batch_size):
                ce_sum, n = self.engine.loss_terms(prompt, encoded[i : i + batch_size])
                total += ce_sum.item()
                n_tokens += n
                bar.update(len(encoded[i : i + batch_size]))
            metrics["loss"] = total / n_tokens
        if n_gen:
            words = self._greedy(encoded[:n_gen], progress=bar.update)
            fields = [self.template.as_fields(example) for example in examples[:n_gen]]
            refs = [(f["target"], [f[name] for name in self.template.input_fields]) for f in fields]
            metrics.update(word_metrics(words, refs))
        bar.close()
        return metrics

    def _greedy(self, encoded: Sequence[Encoded], max_new_tokens: int = 6, progress=None) -> list[str]:
        prefixes = [(e.ids[: e.target_start], e.prompt_start) for e in encoded]
        autocast = self.precision != "fp32" and self.device.type == "cuda"
        with tables_held(self.model):  # sharded tables gathered once, not twice a decoded token
            return self.method.greedy(self.prompt, prefixes, max_new_tokens, autocast, progress=progress)

    def generate(self, inputs: Sequence[Any], max_new_tokens: int = 6) -> list[str]:
        """Greedy target words for ``inputs``: strings (for a one-input-field template) or field mappings."""
        return self._greedy(self.encode_inputs(inputs), max_new_tokens)

    def encode_inputs(self, inputs) -> list[Encoded]:
        """Inputs as ``generate`` takes them (strings for a one-field template, or field mappings; one alone or
        a sequence), encoded up to the target."""
        if isinstance(inputs, (str, Mapping)):
            inputs = [inputs]
        if len(inputs) == 0:
            raise DataError("no inputs given")
        fields = self.template.input_fields
        encoded = []
        for i, x in enumerate(inputs):
            if isinstance(x, str):
                if len(fields) != 1:
                    raise DataError(f"the template has fields {', '.join(fields)}: give mappings, not strings")
                x = {fields[0]: x}
            if not isinstance(x, Mapping):
                raise DataError(f"input {i} must be a string or a mapping of fields, got {type(x).__name__}")
            encoded.append(self.encoder.encode({**dict(x), "target": "x"}, i))  # the target is cut off below
        return encoded

    def prompt_text(self) -> str:
        """The prompt as text, for methods whose prompt is a token sequence (gcg, hard; relaxed: its argmax
        tokens): ``PromptTuner(..., init=f"text:{text}")`` starts from the same tokens (for gcg exactly: its
        candidates are kept only where the text tokenises back to them). ``ConfigError`` for soft and prefix
        prompts, which are vectors (``fastprompt.interpret`` shows their nearest tokens)."""
        ids = self.method.token_ids(self.prompt)
        if ids is None:
            raise ConfigError(f"a {self.method.name} prompt is vectors, not tokens: it has no text "
                              "(python -m fastprompt.interpret shows its nearest tokens)")
        return self.tokenizer.decode(ids)

    # ----------------------------------------------------------------------------------------- I/O
    def metadata(self) -> dict[str, Any]:
        return {
            "model": str(getattr(self.model.config, "_name_or_path", "") or ""),
            "model_type": str(getattr(self.model.config, "model_type", "")),
            "hidden_size": int(self.model.get_input_embeddings().weight.shape[1]),
            "prompt_len": self.prompt_len,
            "template": self.template.text,
            "fastprompt_version": __version__,
            **self.method.metadata(self.prompt),
        }

    def save(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """The method's tensors as safetensors with metadata (model, template, prompt length, hidden size,
        method, its options and schedule state)."""
        save_prompt_file(path, self.method.tensors(self.prompt), {**self.metadata(), **(extra or {})})

    @classmethod
    def load(cls, path: str, model, tokenizer, template: Template | str | None = None, strict: bool = True,
             **kwargs) -> "PromptTuner":
        """A tuner holding the prompt saved at ``path`` (any method's file; a legacy .pt is a soft prompt),
        its method's options and schedule state restored. Refuses a prompt made for another hidden size, or
        (with ``strict``) for another model name."""
        tensors, meta = read_prompt_file(path)
        name = meta.get("method", "soft")
        record = method_record(path, name, tensors, meta)  # metadata parsed and checked
        method = method_class(name)
        params = method.params_from(tensors)
        check_fits(path, model, hidden=params.shape[1] if method.embedding_rows else None,
                   saved_model=meta.get("model", "") if strict else "", hint=" (pass strict=False to load it anyway)")
        options = dict(record["options"])
        options.update(kwargs.pop("method_options", None) or {})
        prompt_len = params.shape[0] if method.embedding_rows else int(json.loads(meta.get("prompt_len", "0")))
        if not prompt_len:
            raise PromptFileError(f"{path} has no prompt_len in its metadata")
        if template is None:
            template = meta.get("template") or "Here are two {prompt} {input} and {target}"
        tuner = cls(model, tokenizer, template, prompt_len, method=name, method_options=options, prompt=params,
                    **kwargs)
        tuner.method.step, tuner.method.total_steps = record["step"], record["total_steps"]
        return tuner

    # ---------------------------------------------------------------- Hugging Face stack (peft_io.py)
    def save_peft(self, path: str) -> None:
        """The prompt as a PEFT adapter directory (prompt or prefix tuning; ``{prompt}`` first in the template),
        written atomically; ``peft.PeftModel.from_pretrained(base_model, path)`` serves it."""
        from .peft_io import save_peft

        save_peft(self, path)

    @classmethod
    def from_peft(cls, peft_model, tokenizer, template: Template | str, **kwargs) -> "PromptTuner":
        """A tuner training the prompt of a PEFT prompt-tuning (or GPT-2 prefix-tuning) model: its base model
        frozen and unchanged, its prompt the initial value, the trained prompt written back into it when
        ``fit`` returns (``write_peft()`` does it on request). ``kwargs``: engine, precision, seed, ..."""
        from .peft_io import tuner_from_peft

        return tuner_from_peft(cls, peft_model, tokenizer, template, **kwargs)

    def inputs_embeds(self, inputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs_embeds, attention_mask)`` of ``inputs`` (as for ``generate``) up to ``{target}``, left padded,
        the prompt in place: ``model.generate(inputs_embeds=..., attention_mask=...)`` continues them."""
        from .peft_io import inputs_embeds

        return inputs_embeds(self, inputs)


FIT_ARGS = {"train": None, "epochs": FIT.epochs, "batch_size": FIT.batch_size, "lr": FIT.lr, "eval_data": None,
            "progress": False, "callback": None, "step_callback": None, "eval_every": FIT.eval_every,
            "eval_size": FIT.eval_size, "max_steps": FIT.max_steps, "max_seconds": FIT.max_seconds}


def _advance(runs, batches, results, tuners, k, ce, first=False):
    """Run ``k``'s generator on to its next batch (sent ``ce``, the summed CE of its last step); a finished run
    leaves ``runs`` with its history, a stopped one (NaN/inf) with its error."""
    try:
        batches[k] = next(runs[k]) if first else runs[k].send(ce)
    except StopIteration:
        results[k] = tuners[k].history
        del runs[k], batches[k]
    except (NonFiniteError, Interrupted) as e:
        results[k] = e
        del runs[k]
        batches.pop(k, None)


def _raise_interrupted(results) -> None:
    """A signal reaches every point of a round (each checkpoints as it sees it), then stops ``fit_many``."""
    stops = [r for r in results if isinstance(r, Interrupted)]
    if stops:
        raise stops[0]


def _absorbs_space(template: Template) -> bool:
    """Whether a text init's leading space is absorbed by the prompt (the prompt does not open the template)."""
    return any(p.kind == "prompt" for p in template.pieces[1:2]) or not template.text.startswith("{prompt}")


def generation_count(n_examples: int, generation_size: int | None) -> int:
    """How many of ``n_examples`` an evaluation decodes: all with no ``generation_size``, else at most it."""
    return n_examples if generation_size is None else min(generation_size, n_examples)


def _over_budget(taken: int, max_steps: int | None, started: float, max_seconds: float | None) -> bool:
    """Whether another step would exceed the step or time budget of this ``fit``."""
    if max_steps is not None and taken >= max_steps:
        return True
    return max_seconds is not None and time.perf_counter() - started >= max_seconds


def metadata_json(meta: dict[str, Any]) -> str:
    return json.dumps(meta, sort_keys=True)
