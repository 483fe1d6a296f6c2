"""What every engine provides: the summed target-token cross-entropy of a batch and its token count.

``loss_terms(prompt, batch) -> (ce_sum, n_tokens)``: ``ce_sum`` is an fp32 scalar differentiable with
respect to ``prompt`` (an fp32 ``(prompt_len, d)`` tensor); ``batch`` is a list of ``Encoded`` examples.
The batch loss is ``ce_sum / n_tokens``: the token-weighted mean of docs/ARCHITECTURE.md, 'What is computed'.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from ..template import Encoded, TemplateEncoder

PRECISIONS = ("fp32", "bf16", "autocast")


def resolve_precision(precision: str, device, engine: str = "auto") -> str:
    """``auto``: ``bf16`` on CUDA (frozen weights cast to bf16 once, prompt master fp32; the naive engine,
    which has no bf16 copy, runs the post's bf16 ``autocast`` there), ``fp32`` elsewhere. Other values pass
    through unchanged (make_engine checks them)."""
    if precision != "auto":
        return precision
    if torch.device(device).type != "cuda":
        return "fp32"
    return "autocast" if engine == "naive" else "bf16"


class Engine:
    name = "engine"

    def __init__(self, model, encoder: TemplateEncoder, precision: str = "fp32"):
        self.model = model
        self.encoder = encoder
        self.precision = precision
        self.device = next(model.parameters()).device

    def loss_terms(self, prompt: torch.Tensor, batch: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def autocast(self):
        """The post's ``torch.autocast(bfloat16)`` context for precision='autocast', else a no-op."""
        if self.precision == "autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"


def target_count(batch: Sequence[Encoded]) -> int:
    return sum(e.target_len for e in batch)
