"""Static shapes for the fused engine's captured step (docs/ARCHITECTURE.md, 'The training step and CUDA graphs').

A step's packed batch has data-dependent sizes (rows, target rows). ``pad_packed`` rounds them up to a
*bucket* so that a handful of shapes cover a whole run:

    rows      one padding segment at the end (its own branch of the tree: it attends to the trunk and
              itself, nothing attends to it, it predicts nothing); cu_seqlens gets empty segments up to
              the batch size, so its length is fixed too
    targets   extra target rows point at row 0 with weight 0
    prompt    extra prompt rows (a field before the prompt, partial batch) write into the padding row

The padded step computes exactly the unpadded step's loss and gradient (tested on the CPU).
``fastprompt/step.py`` captures the step on these shapes, one CUDA graph per bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..layout import PackedBatch


def bucket(n: int, minimum: int = 16) -> int:
    """``n`` rounded up to a multiple of a quarter of its power of two (at least ``minimum``): under 25%
    padding above 64, a handful of sizes per octave."""
    if n <= minimum:
        return minimum
    granule = max(minimum, 1 << (n.bit_length() - 3))
    return -(-n // granule) * granule


@dataclass(frozen=True)
class StaticShape:
    rows: int  # packed query rows, the padding segment included (>= real rows + 1)
    targets: int  # target rows
    prompt_rows: int  # rows that take a prompt vector
    examples: int  # segments before the padding segment (the batch size)


@dataclass
class StaticBatch:
    """A padded packed batch plus what the padded loss needs."""

    packed: PackedBatch  # with static shapes
    target_weight: torch.Tensor  # (targets,) 1 for real target rows, 0 for padding
    n_tokens: torch.Tensor  # () float: real target tokens
    shape: StaticShape

    def clone(self) -> "StaticBatch":
        """Static buffers for a captured graph."""
        p = self.packed
        packed = replace(p, **{name: getattr(p, name).clone() for name in _TENSOR_FIELDS})
        return StaticBatch(packed, self.target_weight.clone(), self.n_tokens.clone(), self.shape)

    def copy_(self, src: "StaticBatch") -> None:
        """This batch's buffers take ``src``'s values (same shape)."""
        for name in _TENSOR_FIELDS:
            getattr(self.packed, name).copy_(getattr(src.packed, name), non_blocking=True)
        self.target_weight.copy_(src.target_weight, non_blocking=True)
        self.n_tokens.copy_(src.n_tokens, non_blocking=True)


def static_shape(packed, batch_size: int, prompt_in_trunk: bool, prompt_len: int) -> StaticShape:
    """The bucket of ``packed``: rows (plus one padding row) and targets rounded up; prompt rows fixed."""
    prompt_rows = prompt_len if prompt_in_trunk else prompt_len * batch_size
    return StaticShape(bucket(packed.n_rows + 1), bucket(packed.n_targets), prompt_rows, batch_size)


def pad_packed(packed, shape: StaticShape) -> StaticBatch:
    """``packed`` padded to ``shape`` (see the module docstring); device ops, no host sync."""
    device = packed.token_ids.device
    rows, n_targets = packed.n_rows, packed.n_targets
    n_examples = packed.cu_seqlens.shape[0] - 1
    pad_rows, pad_targets = shape.rows - rows, shape.targets - n_targets
    pad_prompt, pad_examples = shape.prompt_rows - packed.prompt_rows.shape[0], shape.examples - n_examples
    if pad_rows < 1 or pad_targets < 0 or pad_prompt < 0 or pad_examples < 0:
        raise ValueError(f"batch does not fit static shape {shape}")

    def cat(t, n, value):
        return torch.cat([t, torch.full((n,), value, dtype=t.dtype, device=device)])

    cu = packed.cu_seqlens
    cu = torch.cat([cu, cu[-1:].expand(pad_examples), cu.new_full((1,), packed.n_context + shape.rows)])
    padded = PackedBatch(
        token_ids=cat(packed.token_ids, pad_rows, 0),
        positions=cat(packed.positions, pad_rows, 0),
        prompt_rows=cat(packed.prompt_rows, pad_prompt, rows),  # row `rows`: the first padding row
        prompt_slots=cat(packed.prompt_slots, pad_prompt, 0),
        cu_seqlens=cu,
        target_rows=cat(packed.target_rows, pad_targets, 0),
        target_ids=cat(packed.target_ids, pad_targets, 0),
        n_context=packed.n_context, n_trunk_rows=packed.n_trunk_rows, n_examples=shape.examples + 1,
    )
    weight = torch.cat([torch.ones(n_targets, device=device), torch.zeros(pad_targets, device=device)])
    return StaticBatch(padded, weight, torch.tensor(float(n_targets), device=device), shape)


_TENSOR_FIELDS = ("token_ids", "positions", "prompt_rows", "prompt_slots", "cu_seqlens", "target_rows", "target_ids")
