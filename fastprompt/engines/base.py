"""What every engine provides: the summed target-token cross-entropy of a batch and its token count.

``loss_terms(inputs, batch) -> (ce_sum, n_tokens)``: ``inputs`` is the trained input at the template's
``{prompt}`` slot (``PromptInputs``; a bare ``(prompt_len, d)`` tensor is taken as ``embeds``), ``ce_sum``
an fp32 scalar differentiable with respect to it, ``batch`` a list of ``Encoded`` examples. The batch loss
is ``ce_sum / n_tokens``: the token-weighted mean of docs/ARCHITECTURE.md, 'What is computed'.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

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


@dataclass(frozen=True)
class PromptInputs:
    """The trained input at the ``{prompt}`` slot: exactly one of

    ``embeds``    ``(L, d)`` fp32: vectors in the space of the input-embedding module's output, standing
                  where ``L`` tokens would (soft, relaxed and hard prompts)
    ``layer_kv``  ``(n_layer, 2, L, H, hd)`` fp32: every layer's keys and values at the slot's ``L``
                  positions, which hold no token (prefix-tuning); keys as the model's cache holds them
    """

    embeds: torch.Tensor | None = None
    layer_kv: torch.Tensor | None = None

    def __post_init__(self):
        if (self.embeds is None) == (self.layer_kv is None):
            raise ValueError("PromptInputs takes exactly one of embeds and layer_kv")

    @property
    def tensor(self) -> torch.Tensor:
        return self.embeds if self.embeds is not None else self.layer_kv

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PromptInputs":
        """The same kind of input with ``fn`` applied to its tensor."""
        if self.embeds is not None:
            return PromptInputs(embeds=fn(self.embeds))
        return PromptInputs(layer_kv=fn(self.layer_kv))


def as_inputs(inputs) -> PromptInputs:
    """``inputs`` as ``PromptInputs``: a bare tensor is an ``(L, d)`` prompt (``embeds``)."""
    if isinstance(inputs, PromptInputs):
        return inputs
    if inputs.dim() != 2:
        raise ValueError(f"a bare tensor is an (L, d) prompt, not {tuple(inputs.shape)}: pass per-layer K/V as "
                         "PromptInputs(layer_kv=...)")
    return PromptInputs(embeds=inputs)


class Engine:
    name = "engine"

    def __init__(self, model, encoder: TemplateEncoder, precision: str = "fp32"):
        self.model = model
        self.encoder = encoder
        self.precision = precision
        self.device = next(model.parameters()).device

    def loss_terms(self, inputs: PromptInputs | torch.Tensor, batch: Sequence[Encoded]) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def loss_terms_many(self, inputs: Sequence[PromptInputs | torch.Tensor],
                        batches: Sequence[Sequence[Encoded]]) -> list[tuple[torch.Tensor, int]]:
        """``loss_terms`` of K prompts, prompt ``k`` on ``batches[k]`` (the same batch object may be given for
        all K): one ``(ce_sum, n_tokens)`` per prompt, each differentiable with respect to its own input only.
        This default is a loop over ``loss_terms`` (one pass over the weights per prompt); engines that can
        run the K prompts in one pass override it and say so in ``many_in_one_pass``."""
        if len(inputs) != len(batches):
            raise ValueError(f"{len(inputs)} prompts but {len(batches)} batches")
        return [self.loss_terms(x, b) for x, b in zip(inputs, batches)]

    many_in_one_pass = False  # True where loss_terms_many shares one pass over the weights
    many_lengths = False  # True where that pass also takes prompts of other lengths (``encoders=``)

    def joins(self, other) -> bool:
        """``other`` is this engine or one like it for another prompt length: the same kind over the same model,
        template and precision, its prompts able to train beside this engine's (``PromptTuner.fit_many``)."""
        return other is self or (type(other) is type(self) and other.model is self.model
                                 and other.precision == self.precision
                                 and other.encoder.template.text == self.encoder.template.text
                                 and other.pass_settings() == self.pass_settings())

    def pass_settings(self) -> tuple:
        """What else must agree for two engines' prompts to share a step (kernels, graphs: the packed engine)."""
        return ()

    # Whole-step capture (fastprompt/step.py): an engine that can run a step on static shapes says so here
    # and provides ``prepare``, ``static_batch`` and ``static_loss``.
    def graphs_enabled(self) -> bool:
        return False

    def prepare(self, inputs: PromptInputs, example: Encoded) -> None:
        """Once, before a step is captured: one-time checks and lazily built constants (never inside a graph)."""

    def static_batch(self, batch: Sequence[Encoded], batch_size: int):
        raise NotImplementedError(f"the {self.name} engine has no static-shape step")

    def static_loss(self, inputs: PromptInputs, static) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} engine has no static-shape step")

    def autocast(self):
        """The post's ``torch.autocast(bfloat16)`` context for precision='autocast', else a no-op."""
        if self.precision == "autocast":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        return f"{self.name} ({self.precision})"


def target_count(batch: Sequence[Encoded]) -> int:
    return sum(e.target_len for e in batch)
