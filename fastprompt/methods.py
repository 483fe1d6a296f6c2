"""Prompt parametrisations: what is trained, and how it becomes the prompt an engine sees.

Every engine computes ``loss_terms(prompt, batch)`` for an fp32 ``(L, d)`` prompt in the space of the
model's input embeddings. A *method* owns the trainable tensor (``PromptTuner.prompt``) and maps it to that
prompt (``embeddings``), so the engines stay unchanged and exact:

    soft      P (L, d)                     -> P                                   (the post)
    relaxed   theta (L, V) vocabulary logits -> softmax(theta / tau) @ E          (the post's "Better
                                                                                   interpretability")
    hard      P (L, d) continuous          -> E[nearest(P)], gradient to P         (PEZ, Wen et al. 2023)
    prefix    K/V (n_layer, 2, L, H, hd)   -> spliced into every layer's attention (Li & Liang 2021;
                                               own engines, see fastprompt/prefix.py)

``E`` is the embedding table in the space of the embedding module's output (``models.embedding_table``).
"""
from __future__ import annotations

import math
import os
from typing import Any

import torch

from .engines.base import PromptInputs
from .errors import ConfigError, PromptFileError
from .models import embedding_table
from .nearest import format_nearest
from .prompt import init_prompt, save_tensors

METHODS = ("soft", "relaxed", "hard", "prefix")


class Method:
    """Soft prompt: the trainable tensor *is* the prompt (docs/ARCHITECTURE.md, 'Methods')."""

    name = "soft"

    def __init__(self, model, tokenizer, encoder, **options):
        if options:
            raise ConfigError(f"method {self.name!r} takes no options, got {', '.join(sorted(options))}")
        self.model, self.tokenizer, self.encoder = model, tokenizer, encoder
        self.step = 0  # optimizer steps taken (schedules)
        self.total_steps = 0  # steps planned by fit (schedules)

    # ------------------------------------------------------------------------------------ tensors
    @property
    def prompt_len(self) -> int:
        return self.encoder.prompt_len

    @property
    def hidden(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    def init(self, init: str, seed: int, absorb_space: bool) -> torch.Tensor:
        return init_prompt(self.model, self.tokenizer, self.prompt_len, init, seed, absorb_space=absorb_space)

    def param_shape(self) -> tuple[int, ...]:
        return (self.prompt_len, self.hidden)

    def check(self, params: torch.Tensor) -> None:
        if tuple(params.shape) != self.param_shape():
            raise PromptFileError(f"{self.name} prompt shape {tuple(params.shape)} does not fit prompt_len "
                                  f"{self.prompt_len} and the model (expected {self.param_shape()})")

    def embeddings(self, params: torch.Tensor, train: bool = False) -> torch.Tensor:
        """The ``(L, d)`` prompt (differentiable w.r.t. ``params``)."""
        return params

    def inputs(self, params: torch.Tensor, train: bool = False) -> PromptInputs:
        """What the engine takes (differentiable w.r.t. ``params``). With ``train``, inside the training step,
        which may be captured as a CUDA graph: every per-step value must then come from a device tensor."""
        return PromptInputs(embeds=self.embeddings(params, train))

    def param_groups(self, params: torch.Tensor, lr: float) -> list[dict]:
        return [{"params": [params], "lr": lr}]

    # ---------------------------------------------------------------------------------- schedules
    def plan(self, steps: int) -> None:
        """Called by ``fit`` with the number of optimizer steps it is about to take."""
        self.total_steps = self.step + steps

    def after_step(self, params: torch.Tensor) -> None:
        self.step += 1

    # ------------------------------------------------------------------------------------ readout
    def token_ids(self, params: torch.Tensor) -> list[int] | None:
        """The prompt as vocabulary ids, where the method has a discrete readout."""
        return None

    def readout(self, params: torch.Tensor, k: int = 5) -> str:
        return format_nearest(self.embeddings(params.detach()), self.model, self.tokenizer, k=k, metric="cosine")

    def greedy(self, params, prefixes, max_new_tokens: int, autocast: bool, progress=None) -> list[str]:
        from .generate import greedy_words

        return greedy_words(self.model, self.tokenizer, prefixes, self.embeddings(params.detach()),
                            max_new_tokens, autocast, progress=progress)

    # ----------------------------------------------------------------------------------------- I/O
    def options(self) -> dict[str, Any]:
        return {}

    def metadata(self, params: torch.Tensor) -> dict[str, Any]:
        meta: dict[str, Any] = {"method": self.name, "method_options": self.options(), "method_step": self.step,
                                "method_total_steps": self.total_steps}
        ids = self.token_ids(params)
        if ids is not None:
            meta["token_ids"] = ids
            meta["token_text"] = self.tokenizer.decode(ids)
        return meta

    def tensors(self, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """What is saved: always ``prompt`` (the effective ``(L, d)`` prompt, readable by any consumer)."""
        return {"prompt": self.embeddings(params.detach()).float()}

    @classmethod
    def params_from(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        if "prompt" not in tensors:
            raise PromptFileError("the prompt file has no 'prompt' tensor")
        return tensors["prompt"]


def _token_ids_for(tokenizer, text: str, prompt_len: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"--init text:{text.strip()!r} tokenises to nothing")
    return (ids * prompt_len)[:prompt_len]


def _init_ids(tokenizer, init: str, prompt_len: int, vocab: int, seed: int, absorb_space: bool) -> list[int] | None:
    """Token ids for ``text:WORDS`` / ``vocab`` inits; None for ``random``."""
    if init == "vocab":
        return torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    if init.startswith("text:"):
        words = init[len("text:"):]
        if not words.strip():
            raise ConfigError("--init text: needs words after the colon, e.g. text:antonyms")
        return _token_ids_for(tokenizer, (" " + words.lstrip()) if absorb_space else words, prompt_len)
    if init == "random":
        return None
    raise ConfigError(f"unknown prompt init {init!r}: use random, vocab or text:WORDS")


class RelaxedMethod(Method):
    """Vocabulary relaxation: per prompt position a distribution over the vocabulary,
    ``prompt = softmax(theta / tau) @ E`` with ``theta`` (L, V) trainable logits.

    Why the post's version stalled: it initialised ``theta`` with std 6. The largest of 50,257 such logits
    is ~4.1 std (~25) and leads the runner-up by ~1.3: the softmax is nearly one-hot on a handful of
    tokens and the remaining ~50,000 have probabilities below e^-20. The softmax Jacobian
    ``p_v (delta_vw - p_w)`` vanishes at a one-hot, so those logits get gradients ~1e-9 to 1e-20 —
    at or below Adam's eps (1e-8), where Adam's step shrinks from ``lr`` to ``lr * g / eps`` — and the
    few live logits move by at most ``lr = 1e-3`` a step, so reordering logits that are units apart takes
    thousands of steps. The prompt stays at its initial mixture.

    What converges here:
      * ``init_std`` small (default 0.01): a near-uniform softmax, whose Jacobian ``~1/V`` is the same for
        every token, so every token gets a gradient (Adam rescales it to ``~lr``); ``text:WORDS`` / ``vocab``
        inits put ``init_peak`` (default log V: about half the mass) on the chosen tokens.
      * ``lr_scale`` (default 100): ``theta`` is learned at ``lr * lr_scale``. Adam moves each logit by
        ~its learning rate per step and a token needs a lead of ~log V (~11) to dominate, so the prompt's
        default 1e-3 would need ~10^4 steps.
      * temperature annealing, ``tau_start`` -> ``tau_end`` (default 1 -> 0.1, geometric over the steps
        ``fit`` plans): the mixture is free early and driven towards single tokens late.
      * ``gumbel=True``: straight-through Gumbel-softmax (Jang et al. 2017) during training: the forward
        uses the one-hot ``argmax(theta + g)`` (a real token), the backward the softmax's gradient.

    Evaluation uses the deterministic mixture at the current temperature; ``token_ids`` is the argmax
    readout, which ``fastprompt.report.hard_prompt_metrics`` evaluates as a hard prompt.
    """

    name = "relaxed"

    def __init__(self, model, tokenizer, encoder, tau_start: float = 1.0, tau_end: float = 0.1,
                 init_std: float = 0.01, init_peak: float | None = None, lr_scale: float = 100.0,
                 gumbel: bool = False):
        super().__init__(model, tokenizer, encoder)
        if not (tau_start > 0 and tau_end > 0 and init_std >= 0 and lr_scale > 0):
            raise ConfigError("relaxed: tau_start, tau_end and lr_scale must be > 0, init_std >= 0")
        self.tau_start, self.tau_end = float(tau_start), float(tau_end)
        self.init_std, self.lr_scale, self.gumbel = float(init_std), float(lr_scale), bool(gumbel)
        self.vocab = embedding_table(model).shape[0]
        self.init_peak = float(init_peak) if init_peak is not None else math.log(self.vocab)
        self._table = None
        self._tau = None  # the temperature as a device tensor, for the training step (see ``inputs``)

    def table(self) -> torch.Tensor:
        """E (V, d) fp32 on the model's device, detached (the model is frozen)."""
        if self._table is None:
            self._table = embedding_table(self.model).detach().float()
        return self._table

    def init(self, init, seed, absorb_space):
        ids = _init_ids(self.tokenizer, init, self.prompt_len, self.vocab, seed, absorb_space)
        g = torch.Generator().manual_seed(seed)
        theta = self.init_std * torch.randn(self.prompt_len, self.vocab, generator=g)
        if ids is not None:
            theta[torch.arange(self.prompt_len), torch.tensor(ids)] += self.init_peak
        return theta

    def param_shape(self):
        return (self.prompt_len, self.vocab)

    @property
    def tau(self) -> float:
        """Geometric interpolation tau_start -> tau_end over the planned steps (tau_end after them)."""
        if self.total_steps <= 0:
            return self.tau_start if self.step == 0 else self.tau_end
        frac = min(1.0, self.step / self.total_steps)
        return self.tau_start * (self.tau_end / self.tau_start) ** frac

    def probabilities(self, theta: torch.Tensor) -> torch.Tensor:
        return torch.softmax(theta.float() / self.tau, dim=-1)  # (L, V)

    def tau_tensor(self, device) -> torch.Tensor:
        """``tau`` in a device tensor, updated in place after every step (outside a captured graph)."""
        if self._tau is None or self._tau.device != torch.device(device):
            self._tau = torch.tensor(self.tau, dtype=torch.float32, device=device)
        return self._tau

    def after_step(self, params):
        super().after_step(params)
        if self._tau is not None:
            self._tau.fill_(self.tau)

    def plan(self, steps):
        super().plan(steps)
        if self._tau is not None:
            self._tau.fill_(self.tau)

    def embeddings(self, theta, train=False):
        E = self.table().to(theta.device)
        tau = self.tau_tensor(theta.device) if train else self.tau
        if train and self.gumbel:
            u = torch.rand_like(theta).clamp_(1e-10, 1 - 1e-10)
            soft = torch.softmax((theta - torch.log(-torch.log(u))) / tau, dim=-1)
            hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
            weights = hard + (soft - soft.detach())  # straight-through
        else:
            weights = torch.softmax(theta.float() / tau, dim=-1)  # (L, V)
        return weights @ E  # (L, d)

    def param_groups(self, params, lr):
        return [{"params": [params], "lr": lr * self.lr_scale}]

    def token_ids(self, theta):
        return theta.detach().argmax(-1).tolist()

    def readout(self, theta, k=5):
        probs = self.probabilities(theta.detach())
        values, ids = probs.topk(k, dim=-1)
        lines = [f"relaxed prompt (tau {self.tau:.4g}); argmax tokens: {self.tokenizer.decode(self.token_ids(theta))!r} "
                 f"ids {self.token_ids(theta)}"]
        for position, (row_ids, row_values) in enumerate(zip(ids.tolist(), values.tolist())):
            lines.append(f"prompt position {position}:")
            lines += [f"  token_id: {i}, token: {self.tokenizer.decode([i])!r}, probability: {v:.4f}"
                      for i, v in zip(row_ids, row_values)]
        return "\n".join(lines) + "\n"

    def options(self):
        return {"tau_start": self.tau_start, "tau_end": self.tau_end, "init_std": self.init_std,
                "init_peak": self.init_peak, "lr_scale": self.lr_scale, "gumbel": self.gumbel}

    def tensors(self, theta):
        return {"prompt": self.embeddings(theta.detach()).float().cpu(), "logits": theta.detach().float().cpu()}

    @classmethod
    def params_from(cls, tensors):
        if "logits" not in tensors:
            raise PromptFileError("a relaxed prompt file must hold the 'logits' tensor")
        return tensors["logits"]


class HardMethod(Method):
    """PEZ hard prompts (Wen et al. 2023, "Hard Prompts Made Easy"): continuous vectors ``P`` (L, d) are
    trained, but every forward uses their projection onto the vocabulary, ``E[nearest(P)]`` (a real token
    sequence); the gradient taken at the projection updates ``P`` (straight-through:
    ``P + (proj - P).detach()``). Nearest by cosine similarity (PEZ) or ``metric="euclidean"``.
    ``lr_scale`` multiplies the learning rate of ``P``. The trained prompt is ``token_ids`` (text and ids).
    """

    name = "hard"

    def __init__(self, model, tokenizer, encoder, metric: str = "cosine", lr_scale: float = 1.0):
        super().__init__(model, tokenizer, encoder)
        if metric not in ("cosine", "euclidean"):
            raise ConfigError(f"hard: unknown metric {metric!r}: use cosine or euclidean")
        if not lr_scale > 0:
            raise ConfigError("hard: lr_scale must be > 0")
        self.metric, self.lr_scale = metric, float(lr_scale)
        self._table = None
        self._normed = None

    def table(self) -> torch.Tensor:
        if self._table is None:
            self._table = embedding_table(self.model).detach().float()
            self._normed = torch.nn.functional.normalize(self._table, dim=-1)
        return self._table

    @torch.no_grad()
    def nearest(self, P: torch.Tensor) -> torch.Tensor:
        """Vocabulary ids (L,) nearest to each row of ``P``."""
        E = self.table()
        P = P.detach().float().to(E.device)
        if self.metric == "cosine":
            return (torch.nn.functional.normalize(P, dim=-1) @ self._normed.T).argmax(-1)
        return torch.cdist(P, E).argmin(-1)

    def embeddings(self, P, train=False):
        proj = self.table()[self.nearest(P)].to(P.device)  # (L, d)
        return P + (proj - P).detach()  # value: the projection; gradient: to P

    def param_groups(self, params, lr):
        return [{"params": [params], "lr": lr * self.lr_scale}]

    def token_ids(self, P):
        return self.nearest(P).tolist()

    def readout(self, P, k=5):
        ids = self.token_ids(P)
        head = f"hard prompt: {self.tokenizer.decode(ids)!r} ids {ids}\n"
        return head + super().readout(P, k)

    def options(self):
        return {"metric": self.metric, "lr_scale": self.lr_scale}

    def tensors(self, P):
        proj = self.table()[self.nearest(P)]  # exactly the vocabulary rows
        return {"prompt": proj.float().cpu(), "continuous": P.detach().float().cpu()}

    @classmethod
    def params_from(cls, tensors):
        return tensors["continuous"] if "continuous" in tensors else super().params_from(tensors)


def parse_options(items) -> dict[str, Any]:
    """``["tau_end=0.05", "gumbel=true"]`` -> ``{"tau_end": 0.05, "gumbel": True}`` (CLI ``--method-opt``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-opt takes KEY=VALUE, got {item!r}")
        value = value.strip()
        if value.lower() in ("true", "false", "yes", "no", "on", "off"):
            parsed: Any = value.lower() in ("true", "yes", "on")
        else:
            try:
                parsed = float(value) if any(c in value.lower() for c in ".e") or value.lower() in ("inf", "nan") else int(value)
            except ValueError:
                parsed = value
        out[key.strip().replace("-", "_")] = parsed
    return out


# ----------------------------------------------------------------------------------------- files
def save_method_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """A method's tensors + string metadata as safetensors, atomically (temp file + rename)."""
    save_tensors(path, tensors, metadata)


def read_method_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise PromptFileError(f"no prompt file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:
        raise PromptFileError(f"{path} is not a valid safetensors prompt file ({str(e)[:120]})") from None
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise PromptFileError(f"{path}: tensor {name!r} is not finite")
    return tensors, meta


def saved_method(path: str) -> str:
    """The method a prompt file was trained with ('soft' for files without one, .pt files included)."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return "soft"
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("method", "soft")
    except Exception:
        return "soft"  # read_prompt reports the bad file
