"""The packed layout's tree mask, for every backend (docs/ARCHITECTURE.md, 'Packed suffixes and the tree mask').

Key rows are numbered in order; each belongs to the trunk (the rows every query may see: the constant
context and the shared span after it) or to one example's segment. A query row is itself a key row, and

    allowed[i, j] = row(j) <= row(i)  and  (segment(j) == TRUNK  or  segment(j) == segment(i))

``tree_allowed`` states this rule once; the rest describe the fused engine's packed block with it: key rows
``[0, n_trunk)`` are the trunk, ``cu_seqlens`` ``(B + 1,)`` holds the key-row offsets of the segments
(``cu[0] = n_trunk``, ``cu[-1] = Nk``; empty segments allowed), query row ``r`` is key row ``r + Nk - Nq``.
The torch ops take the dense mask (``tree_mask``), the Triton kernel per-row bounds (``segment_bounds``),
flash-attn's varlen layout the segments (``key_segments``), the generic engine the rule itself on its own
positions and owners. Device ops only, no host sync: each can sit inside a CUDA graph.
"""
from __future__ import annotations

import torch

from ..layout import TRUNK  # the segment of trunk rows (-1)


def tree_allowed(q_row, q_segment, k_row, k_segment, trunk: int = TRUNK) -> torch.Tensor:
    """The rule: ``(..., Nq)`` query rows and segments, ``(..., Nk)`` key rows and segments (the same batch
    dimensions) -> ``(..., Nq, Nk)`` bool, True where the query may attend to the key."""
    k_row, k_segment = k_row[..., None, :], k_segment[..., None, :]
    return (k_row <= q_row[..., :, None]) & ((k_segment == trunk) | (k_segment == q_segment[..., :, None]))


def key_segments(n_keys: int, n_trunk: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``(Nk,)`` long: ``TRUNK`` for key rows below ``n_trunk``, else the segment ``s`` with
    ``cu[s] <= j < cu[s + 1]`` (``right=True`` skips empty segments)."""
    keys = torch.arange(n_keys, device=cu_seqlens.device)
    segment = torch.searchsorted(cu_seqlens.to(torch.long), keys, right=True) - 1
    return torch.where(keys < n_trunk, TRUNK, segment)


def tree_mask(n_queries: int, n_keys: int, n_trunk: int, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The dense ``(Nq, Nk)`` bool mask of the packed block (True = may attend)."""
    keys = torch.arange(n_keys, device=cu_seqlens.device)
    segment = key_segments(n_keys, n_trunk, cu_seqlens)
    first = n_keys - n_queries  # the key row of query row 0
    return tree_allowed(keys[first:], segment[first:], keys, segment)


def segment_bounds(n_keys: int, n_trunk: int, cu_seqlens: torch.Tensor):
    """The rule as two ``(Nk,)`` int32 bounds per key row, for kernels that walk key and query ranges:
    ``seg_start`` (the first key row of its segment: a query at row ``i`` sees ``j <= i`` with ``j < n_trunk``
    or ``j >= seg_start[i]``; 0 in the trunk) and ``seg_end`` (one past the last row whose query sees it;
    ``Nk`` in the trunk)."""
    cu = cu_seqlens.to(torch.long)
    segment = key_segments(n_keys, n_trunk, cu_seqlens)
    trunk = segment == TRUNK
    seg_start = torch.where(trunk, 0, cu[segment.clamp(min=0)])
    seg_end = torch.where(trunk, n_keys, cu[segment + 1])
    return seg_start.to(torch.int32), seg_end.to(torch.int32)
