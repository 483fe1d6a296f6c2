"""The interface every prompt parametrisation provides, and the behaviour they share.

Every engine computes ``loss_terms(inputs, batch)`` for ``PromptInputs``: an fp32 ``(L, d)`` prompt in the
space of the model's input embeddings, or per-layer K/V at the slot. A *method* owns the trainable tensor
(``PromptTuner.prompt``) and maps it to those inputs (``inputs``; ``embeddings`` for the ``(L, d)`` ones),
so the engines stay unchanged and exact:

    soft      P (L, d)                     -> P                                   (the post; soft.py)
    relaxed   theta (L, V) vocabulary logits -> softmax(theta / tau) @ E          (the post's "Better
                                                                                   interpretability"; relaxed.py)
    hard      P (L, d) continuous          -> E[nearest(P)], gradient to P         (PEZ, Wen et al. 2023; hard.py)
    prefix    K/V (n_layer, 2, L, H, hd)   -> every layer's K/V at the slot (Li & Liang 2021; prefix.py)

``E`` is the embedding table in the space of the embedding module's output (``models.embedding_table``).
"""
from __future__ import annotations

from typing import Any

import torch

from ..engines.base import PromptInputs
from ..errors import ConfigError, PromptFileError
from ..nearest import format_nearest


class Method:
    """A prompt parametrisation (docs/ARCHITECTURE.md, 'Methods'). Subclasses give ``name``, ``init``,
    ``param_shape``, ``embeddings``, ``tensors`` and ``params_from``; the rest is shared and overridden where
    a method differs."""

    name: str
    embedding_rows = False  # the trained tensor is (L, d) rows of the input-embedding space (soft, hard)

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
        """The initial trained tensor for ``--init`` (random, vocab, text:WORDS, ...), on the CPU."""
        raise NotImplementedError

    def param_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def check(self, params: torch.Tensor) -> None:
        if tuple(params.shape) != self.param_shape():
            raise PromptFileError(f"{self.name} prompt shape {tuple(params.shape)} does not fit prompt_len "
                                  f"{self.prompt_len} and the model (expected {self.param_shape()})")

    def embeddings(self, params: torch.Tensor, train: bool = False) -> torch.Tensor:
        """The ``(L, d)`` prompt (differentiable w.r.t. ``params``)."""
        raise NotImplementedError

    def inputs(self, params: torch.Tensor, train: bool = False) -> PromptInputs:
        """What the engine takes (differentiable w.r.t. ``params``). With ``train``, inside the training step,
        which may be captured as a CUDA graph: a per-step value must then come from a device tensor that
        ``after_step`` updates (fastprompt/step.py)."""
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
        """``nearest.txt``: the vocabulary tokens nearest to each row of the prompt."""
        return format_nearest(self.embeddings(params.detach()), self.model, self.tokenizer, k=k, metric="cosine")

    def greedy(self, params, prefixes, max_new_tokens: int, autocast: bool, progress=None) -> list[str]:
        from ..generate import greedy_words

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
        """What a prompt file holds (``fastprompt/promptfile.py``)."""
        raise NotImplementedError

    @classmethod
    def params_from(cls, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The trained tensor from a prompt file's ``tensors``."""
        raise NotImplementedError
