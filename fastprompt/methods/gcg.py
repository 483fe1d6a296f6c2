"""GCG, Greedy Coordinate Gradient (Zou et al. 2023): a readable token prompt found by discrete search.

The trained tensor is the prompt's token ids, ``ids`` (L,) (stored as fp32, exact below 2**24); the engine
sees their embeddings ``E[ids]``. There is no optimizer step: a GCG step (``discrete_step``) is

    e = E[ids] (L, d), leaf                 ce_sum, n = engine.loss_terms(e, batch)
    G = d(ce_sum / n)/d e @ E^T  (L, V)     the gradient on the one-hot token matrix X (e = X @ E)
    G[:, not allowed] = +inf                 the vocabulary filter (``allowed_tokens``)
    top[l] = the top_k ids of -G[l]          the swaps that most lower the linearised loss at position l
    candidates: ``candidates`` copies of ids, each with one position l (spread evenly over the positions,
                in a seeded random order) set to a seeded random pick from top[l]; duplicates, the current
                ids and those whose text does not tokenise back to the same ids are dropped
    losses = engine.loss_terms_many(candidates, batch) under no_grad   the exact loss of each token prompt
    ids = the best of the candidates and the current ids on this batch (the loss never rises on a batch)

The candidate batch goes through ``Engine.loss_terms_many``: the K candidates on one batch, which an engine
that packs K prompts runs in one pass over the weights (a loop of single forwards elsewhere).

Seeded by the tuner's seed and the step: a run is deterministic. The prompt's text (``text``) is readable
and re-usable: ``--init text:TEXT`` from it gives the same ids, hence the same loss.
"""
from __future__ import annotations

import torch

from ..engines.base import PromptInputs
from ..errors import ConfigError, PromptFileError
from ..models import embedding_table
from ..options import BY_NAME
from .base import Method
from .init import init_ids


def slot_absorbs_space(template) -> bool:
    """Whether the whitespace before ``{prompt}`` belongs to the prompt's text (the tuner's ``text:`` init rule)."""
    return any(p.kind == "prompt" for p in template.pieces[1:2]) or not template.text.startswith("{prompt}")


def allowed_tokens(tokenizer, vocab: int, ascii_only: bool = False) -> torch.Tensor:
    """(V,) bool: the tokens GCG may put in the prompt. Never a special token; the token's text printable
    (no control characters, no newline, no partial UTF-8 byte shown as U+FFFD) and not blank; with
    ``ascii_only``, ASCII letters only, optionally after one leading space (words and word pieces)."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    allowed = torch.zeros(vocab, dtype=torch.bool)
    for i in range(min(vocab, len(tokenizer))):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if not text.strip() or not text.isprintable() or "\ufffd" in text:
            continue
        if ascii_only:
            word = text[1:] if text.startswith(" ") else text
            if not (word.isascii() and word.isalpha()):
                continue
        allowed[i] = True
    return allowed


class GcgMethod(Method):
    """GCG token prompt (module docstring). Options: ``top_k`` swaps considered per position (from the
    gradient), ``candidates`` token prompts evaluated exactly per step, ``ascii_only`` (ASCII words only)."""

    name = "gcg"
    discrete = True  # trained by ``discrete_step``, not by the optimizer (PromptTuner.train_step)

    def __init__(self, model, tokenizer, encoder, top_k: int = BY_NAME["gcg_top_k"].default,
                 candidates: int = BY_NAME["gcg_candidates"].default,
                 ascii_only: bool = BY_NAME["gcg_ascii_only"].default):  # declared once: fastprompt/options.py
        super().__init__(model, tokenizer, encoder)
        for key, value in (("top_k", top_k), ("candidates", candidates)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"gcg: {key} must be an integer >= 1, got {value!r}")
        if not isinstance(ascii_only, bool):
            raise ConfigError(f"gcg: ascii_only must be true or false, got {ascii_only!r}")
        self.top_k, self.candidates, self.ascii_only = top_k, candidates, ascii_only
        self.vocab = embedding_table(model).shape[0]
        self.absorb_space = slot_absorbs_space(encoder.template)
        self.seed = 0  # set by the tuner (``PromptTuner``): the candidates' sampling seed
        self.dropped = 0  # candidates dropped by the re-tokenisation check (all steps)
        self.evaluated = 0  # candidates evaluated exactly (all steps)
        self._table = None
        self._allowed = None

    # ------------------------------------------------------------------------------------ tensors
    def table(self) -> torch.Tensor:
        """E (V, d) fp32 on the model's device, detached."""
        if self._table is None:
            self._table = embedding_table(self.model).detach().float()
        return self._table

    def allowed(self) -> torch.Tensor:
        if self._allowed is None:
            self._allowed = allowed_tokens(self.tokenizer, self.vocab, self.ascii_only)
            if not self._allowed.any():
                raise ConfigError("gcg: the vocabulary filter leaves no token")
        return self._allowed

    def param_shape(self):
        return (self.prompt_len,)

    def check(self, params):
        super().check(params)
        ids = params.detach().float()
        if not (torch.isfinite(ids).all() and (ids == ids.round()).all() and (ids >= 0).all()
                and (ids < self.vocab).all()):
            raise PromptFileError(f"gcg prompt ids must be integers from 0 to {self.vocab - 1}")

    def ids(self, params) -> torch.Tensor:
        return params.detach().round().long()

    def embeddings(self, params, train=False):
        return self.table()[self.ids(params).to(self.table().device)]  # (L, d); no gradient to the ids

    def token_ids(self, params):
        return self.ids(params).tolist()

    def text(self, params) -> str:
        """The prompt as text: ``--init text:TEXT`` (or ``init=f"text:{text}"``) gives back the same ids."""
        return self.tokenizer.decode(self.token_ids(params))

    # --------------------------------------------------------------------------------------- init
    def init(self, init, seed, absorb_space):
        """``text:WORDS`` (its token ids, as the other methods), ``random``/``vocab`` (allowed tokens, seeded,
        re-drawn until their text tokenises back to them), ``file:PATH`` (a prompt file with token ids)."""
        if init.startswith("file:"):
            return self._from_file(init[len("file:"):])
        if init in ("random", "vocab"):
            allowed = self.allowed().nonzero().flatten()
            generator = torch.Generator().manual_seed(seed)
            for _ in range(1000):
                ids = allowed[torch.randint(0, len(allowed), (self.prompt_len,), generator=generator)]
                if self.round_trips(ids.tolist()):
                    break
            return ids.float()
        return torch.tensor(init_ids(self.tokenizer, init, self.prompt_len, self.vocab, seed, absorb_space)).float()

    def _from_file(self, path):
        from ..promptfile import method_record, read_prompt_file

        tensors, meta = read_prompt_file(path)
        ids = method_record(path, meta.get("method", "soft"), tensors, meta)["token_ids"]
        if ids is None:
            raise PromptFileError(f"{path} holds no token ids (a gcg, hard or relaxed prompt file has them)")
        if len(ids) != self.prompt_len:
            raise PromptFileError(f"{path} holds {len(ids)} token ids; pass --prompt-len {len(ids)}")
        return torch.tensor(ids).float()

    # ------------------------------------------------------------------------------- the GCG step
    def round_trips(self, ids: list[int]) -> bool:
        """Whether the text of ``ids``, as a ``text:`` init would tokenise it, gives ``ids`` back."""
        text = self.tokenizer.decode(ids)
        if self.absorb_space:
            if not text.startswith(" ") or text.startswith("  "):
                return False  # the init puts exactly one space before the words
            text = " " + text.lstrip()
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] == ids

    def token_gradient(self, engine, ids: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ce_sum, G)``: the current prompt's summed CE on ``batch`` and the gradient of its mean on the
        one-hot token matrix, ``G = dL/de @ E^T`` (L, V)."""
        E = self.table()
        embeds = E[ids].clone().requires_grad_(True)  # (L, d)
        ce_sum, n_tokens = engine.loss_terms(PromptInputs(embeds=embeds), batch)
        (grad,) = torch.autograd.grad(ce_sum / n_tokens, embeds)
        return ce_sum.detach(), grad @ E.T  # (L, V)

    def sample_candidates(self, ids: torch.Tensor, grad: torch.Tensor, generator) -> torch.Tensor:
        """(K, L) candidate ids: single-token swaps from the top-k of ``-grad``, filtered (module docstring)."""
        L = ids.shape[0]
        score = -grad.float().cpu()
        score[:, ~self.allowed()] = -float("inf")
        k = min(self.top_k, int(self.allowed().sum()))
        top = score.topk(k, dim=-1).indices  # (L, k)
        cpu_ids = ids.cpu()
        positions = torch.arange(self.candidates) % L
        positions = positions[torch.randperm(self.candidates, generator=generator)]
        picks = torch.randint(0, k, (self.candidates,), generator=generator)
        seen = {tuple(cpu_ids.tolist())}
        kept = []
        for position, pick in zip(positions.tolist(), picks.tolist()):
            candidate = cpu_ids.clone()
            candidate[position] = top[position, pick]
            key = tuple(candidate.tolist())
            if key in seen:
                continue
            seen.add(key)
            if not self.round_trips(list(key)):
                self.dropped += 1
                continue
            kept.append(candidate)
        return torch.stack(kept) if kept else cpu_ids[None, :0].expand(0, L)

    @torch.no_grad()
    def candidate_losses(self, engine, candidates: torch.Tensor, batch) -> torch.Tensor:
        """(K,) exact mean CE of each candidate token prompt on ``batch``: the K prompts through
        ``engine.loss_terms_many`` (one pass where the engine packs prompts)."""
        E = self.table()
        inputs = [PromptInputs(embeds=E[c.to(E.device)]) for c in candidates]
        terms = engine.loss_terms_many(inputs, [batch] * len(inputs))
        return torch.stack([(ce / n).float() for ce, n in terms]).cpu()

    def discrete_step(self, engine, params: torch.nn.Parameter, batch) -> torch.Tensor:
        """One GCG step on ``batch`` (module docstring), ``params`` updated in place; returns the summed CE of
        the kept prompt on ``batch`` (detached)."""
        ids = self.ids(params).to(self.table().device)
        ce_sum, grad = self.token_gradient(engine, ids, batch)
        n_tokens = sum(e.target_len for e in batch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        candidates = self.sample_candidates(ids, grad, generator)
        self.step += 1
        if len(candidates) == 0:
            return ce_sum
        losses = self.candidate_losses(engine, candidates, batch)
        self.evaluated += len(candidates)
        best = int(torch.nan_to_num(losses, nan=float("inf")).argmin())
        if not losses[best] < ce_sum.item() / n_tokens:
            return ce_sum
        with torch.no_grad():
            params.copy_(candidates[best].to(params.device).float())
        return (losses[best] * n_tokens).to(ce_sum.device)

    def after_step(self, params):  # the step counter advances in discrete_step
        pass

    # ------------------------------------------------------------------------------------ readout
    def readout(self, params, k=5):
        ids = self.token_ids(params)
        return f"gcg prompt: {self.text(params)!r} ids {ids}\n" + super().readout(params, k)

    def greedy(self, params, prefixes, max_new_tokens, autocast, progress=None):
        from ..generate import greedy_words

        return greedy_words(self.model, self.tokenizer, prefixes, self.embeddings(params), max_new_tokens,
                            autocast, progress=progress)

    # ----------------------------------------------------------------------------------------- I/O
    def options(self):
        return {"top_k": self.top_k, "candidates": self.candidates, "ascii_only": self.ascii_only}

    def tensors(self, params):
        """``prompt``: the tokens' embedding rows (readable by any consumer); ``ids``: the token ids."""
        return {"prompt": self.embeddings(params).float().cpu(), "ids": self.ids(params).float().cpu()}

    @classmethod
    def params_from(cls, tensors):
        if "ids" not in tensors:
            raise PromptFileError("a gcg prompt file must hold the 'ids' tensor")
        return tensors["ids"]
