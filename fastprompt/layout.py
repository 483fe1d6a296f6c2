"""The packed layout, in one place (docs/ARCHITECTURE.md, 'Layouts'): every engine that packs builds its rows here.

A template's ids split at two offsets shared by every example (``TemplateEncoder``):

    context  [0, n_context)          constant text before the prompt and every field: keys only, computed once
    trunk    [n_context, n_shared)   the prompt and the text up to the first field: once per step, batch 1
    suffix   [n_shared, n_b - 1)     per example, from its first field to the token before its last target

Two engines pack, into two shapes:

``PackedBatch``   the packed engine's block: one sequence of query rows (trunk rows, then every suffix one
                  after another), the context's keys in front (``n_context`` key rows without queries),
                  ``cu_seqlens`` the key-row offsets of the suffixes (``cu[0] = n_context + n_trunk_rows``),
                  the prompt slot as ``prompt_rows`` / ``prompt_slots``, and ``target_rows`` / ``target_ids``
                  (row ``p`` predicts token ``p + 1``; a trunk row repeats once per example that needs it).
                  ``PackedBatch.context`` is the context alone, as a trunk with one empty suffix.
``SuffixPacks``   the generic engine's packs for the model's own forward: suffixes side by side in ``P``
                  sequences of at most ``PACK_ROWS`` rows (``assign_packs``), each row with its token, its
                  position, its owner (an example, ``tree.TRUNK`` for trunk rows, a unique negative number
                  for padding) and its prompt slot; the tree mask is ``tree.tree_allowed`` on owners and
                  positions.

The tree rule itself (a row sees the trunk and its own example's earlier rows) is ``engines/tree.py``'s; the
static-shape padding of a ``PackedBatch`` (CUDA graphs) is ``engines/graphs.py``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import DataError
from .template import Encoded, TemplateEncoder

TRUNK = -1  # the owner of trunk rows (engines/tree.py: tree.TRUNK is this value)
# Generic engine: at most this many suffix rows share one packed sequence (the attention of a pack is
# quadratic in its length; the linear layers do not care). Longer batches run as several packs (batch P).
PACK_ROWS = 512


def check_example(encoder: TemplateEncoder, e: Encoded, b: int) -> None:
    """``e`` was encoded by ``encoder`` (its shared ids, a target in its suffix): a DataError otherwise."""
    S, n = encoder.n_shared, len(e.ids)
    if e.target_start is None or e.target_start < S or e.target_start >= n or e.ids[:S] != encoder.shared_ids:
        raise DataError(f"example {b} was not encoded for this engine's template and prompt length")


# ------------------------------------------------------------------------------ the packed engine's block
@dataclass
class PackedBatch:
    """Index tensors of one step's packed row block (query rows: trunk rows, then each suffix)."""

    token_ids: torch.Tensor  # (rows,) input token ids; the placeholder at prompt rows
    positions: torch.Tensor  # (rows,) absolute positions (learned positions, rotary angles, sliding windows)
    prompt_rows: torch.Tensor  # (n_prompt_rows,) rows that take a prompt vector: L (trunk) or B * L (suffix)
    prompt_slots: torch.Tensor  # (n_prompt_rows,) which prompt vector
    cu_seqlens: torch.Tensor  # (B + 1,) key-row offsets of the suffixes; cu[0] = n_trunk_keys
    target_rows: torch.Tensor  # (n_targets,) rows whose output predicts a target token (trunk rows repeat)
    target_ids: torch.Tensor  # (n_targets,) the token each predicts
    n_context: int  # constant context rows (keys only)
    n_trunk_rows: int  # shared query rows
    n_examples: int

    @property
    def n_rows(self) -> int:
        return self.token_ids.shape[0]

    @property
    def n_trunk_keys(self) -> int:
        return self.n_context + self.n_trunk_rows

    @property
    def n_targets(self) -> int:
        return self.target_ids.shape[0]

    def key_positions(self) -> torch.Tensor:
        """(n_context + rows,) the position of every key row: the context's ``0 .. n_context - 1``, then the rows'."""
        context = torch.arange(self.n_context, dtype=self.positions.dtype, device=self.positions.device)
        return torch.cat([context, self.positions]) if self.n_context else self.positions

    @classmethod
    def build(cls, encoder: TemplateEncoder, batch: Sequence[Encoded], device) -> "PackedBatch":
        """Host-side indices for ``batch``, moved to ``device`` in one transfer."""
        if len(batch) == 0:
            raise DataError("empty batch")
        P0, S, L = encoder.n_context, encoder.n_shared, encoder.prompt_len
        token_ids = list(encoder.shared_ids[P0:S])
        positions = list(range(P0, S))
        prompt_rows: list[int] = []
        prompt_slots: list[int] = []
        if encoder.prompt_start is not None:  # the prompt is in the trunk, which starts with it
            prompt_rows += range(encoder.prompt_start - P0, encoder.prompt_start - P0 + L)
            prompt_slots += range(L)
        n_trunk_rows = len(token_ids)
        cu_seqlens = [S]
        target_rows: list[int] = []
        target_ids: list[int] = []
        for b, e in enumerate(batch):
            check_example(encoder, e, b)
            n = len(e.ids)
            offset = len(token_ids)  # query row of position S
            token_ids += e.ids[S : n - 1]
            positions += range(S, n - 1)
            if e.prompt_start >= S:  # a field precedes the prompt: it lives in every suffix
                prompt_rows += range(offset + e.prompt_start - S, offset + e.prompt_start - S + L)
                prompt_slots += range(L)
            for t in range(e.target_start - 1, n - 1):  # the output at position t predicts ids[t + 1]
                target_rows.append(t - P0 if t < S else offset + t - S)
                target_ids.append(e.ids[t + 1])
            cu_seqlens.append(P0 + len(token_ids))
        parts = (token_ids, positions, prompt_rows, prompt_slots, cu_seqlens, target_rows, target_ids)
        return cls(*_to_device(parts, device), n_context=P0, n_trunk_rows=n_trunk_rows, n_examples=len(batch))

    @classmethod
    def context(cls, encoder: TemplateEncoder, device) -> "PackedBatch":
        """The constant context alone (for its K/V, computed once): its rows as a trunk, one empty suffix."""
        P0 = encoder.n_context
        parts = (encoder.shared_ids[:P0], range(P0), [], [], [P0, P0], [], [])
        return cls(*_to_device(parts, device), n_context=0, n_trunk_rows=P0, n_examples=1)


@dataclass
class PackedMany:
    """K prompts' packed blocks side by side in one row block (docs/ARCHITECTURE.md, 'K prompts in one pass'):
    the tree extended, context -> prompt k's trunk -> prompt k's examples. ``packed`` holds every group's rows
    one after another (``prompt_slots`` index the K prompts stacked along their length, ``target_rows`` the
    block's rows); the linear layers run on it once, attention runs per group on ``groups[k]`` (the group's own
    ``cu_seqlens``, a ``PackedBatch`` of that prompt alone), since a group sees only the context and itself.
    The prompts may have different lengths (one encoder each): ``prompt_slots`` then index their vectors
    stacked one after another (prompt ``k`` from the sum of the earlier prompts' lengths)."""

    packed: PackedBatch  # every group's rows; n_trunk_rows / cu_seqlens are not used (groups hold them)
    groups: list  # [PackedBatch] per prompt
    row_offsets: list  # (K + 1,) first row of each group in ``packed``
    target_counts: list  # targets per group, in ``packed.target_rows`` order

    @classmethod
    def build(cls, encoders: TemplateEncoder | Sequence[TemplateEncoder], batches: Sequence[Sequence[Encoded]],
              device) -> "PackedMany":
        """One block for prompt ``k`` on ``batches[k]``, encoded by ``encoders[k]`` (one encoder: all of them).
        Encoders of several prompt lengths of one template may be mixed: the context is the same for all (it
        precedes the prompt), each group has its own trunk and positions. A batch object given for several
        prompts of one encoder is packed once."""
        if isinstance(encoders, TemplateEncoder):
            encoders = [encoders] * len(batches)
        if len(encoders) != len(batches):
            raise ValueError(f"{len(encoders)} encoders but {len(batches)} batches")
        context = encoders[0].shared_ids[: encoders[0].n_context]
        if any(e.shared_ids[: e.n_context] != context for e in encoders):
            raise DataError("the prompts of one pass share the template's context: encode them with one template")
        built: dict[tuple[int, int], PackedBatch] = {}
        groups = []
        for encoder, batch in zip(encoders, batches):
            if (id(encoder), id(batch)) not in built:
                built[id(encoder), id(batch)] = PackedBatch.build(encoder, batch, device)
            groups.append(built[id(encoder), id(batch)])
        row_offsets, slot_offsets = [0], [0]  # prompt k's vectors: rows slot_offsets[k] .. of the stacked prompts
        for g, encoder in zip(groups, encoders):
            row_offsets.append(row_offsets[-1] + g.n_rows)
            slot_offsets.append(slot_offsets[-1] + encoder.prompt_len)

        def cat(name, shift=None):
            parts = [getattr(g, name) + (shift[k] if shift else 0) for k, g in enumerate(groups)]
            return torch.cat(parts)
        packed = PackedBatch(
            token_ids=cat("token_ids"), positions=cat("positions"), prompt_rows=cat("prompt_rows", row_offsets),
            prompt_slots=cat("prompt_slots", slot_offsets), cu_seqlens=groups[0].cu_seqlens,
            target_rows=cat("target_rows", row_offsets), target_ids=cat("target_ids"),
            n_context=encoders[0].n_context, n_trunk_rows=groups[0].n_trunk_rows,
            n_examples=sum(g.n_examples for g in groups))
        return cls(packed, groups, row_offsets, [g.n_targets for g in groups])


def _to_device(parts, device):
    """The lists of ``parts`` as long tensors on ``device``: one host-to-device copy of all of them."""
    device = torch.device(device)
    flat = torch.tensor([v for part in parts for v in part], dtype=torch.long)
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    return flat.split([len(part) for part in parts])


# ------------------------------------------------------------------------------ the generic engine's packs
def assign_packs(lens: Sequence[int], cap: int = PACK_ROWS):
    """Suffixes of ``lens`` rows packed in order into sequences of at most max(cap, longest) rows:
    ``([(pack, start) per example], packs, rows of the longest pack)``."""
    cap = max(cap, max(lens))
    where, fill = [], [0]
    for n in lens:
        if fill[-1] + n > cap:
            fill.append(0)
        where.append((len(fill) - 1, fill[-1]))
        fill[-1] += n
    return where, len(fill), max(fill)


def pack_shape(lens: Sequence[int], cap: int = PACK_ROWS):
    """``(packs, rows of the longest pack)`` of ``assign_packs``."""
    _, P, N = assign_packs(lens, cap)
    return P, N


@dataclass
class SuffixPacks:
    """The generic engine's packed suffixes, host tensors ``(P, N)`` (``N`` counts the trunk's ``n_trunk`` rows
    where they open pack 0). Example ``b``'s row ``t`` lies at ``[where[b][0], where[b][1] + t]``."""

    ids: torch.Tensor  # (P, N) token ids (0 at trunk and padding rows: the caller embeds the trunk itself)
    positions: torch.Tensor  # (P, N) each row's position id
    owner: torch.Tensor  # (P, N) example index; TRUNK; a unique negative number < TRUNK for padding rows
    slot: torch.Tensor  # (P, N) the prompt vector a row takes, or -1
    where: list  # [(pack, start row)] per example
    n_trunk: int  # trunk rows opening pack 0 (0: the trunk is in the cache)

    @classmethod
    def build(cls, encoder: TemplateEncoder, batch: Sequence[Encoded], lens: Sequence[int], n_trunk: int = 0,
              cap: int = PACK_ROWS) -> "SuffixPacks":
        """``lens[b]`` suffix rows of every example; ``n_trunk`` trunk rows (positions ``n_shared - n_trunk ..``)
        open the single pack (only where the suffixes fit one)."""
        n_shared, L = encoder.n_shared, encoder.prompt_len
        where, P, N = assign_packs(lens, cap)
        if n_trunk and P != 1:
            raise AssertionError("the trunk is packed with the suffixes only where they fit one pack")
        where = [(p, at + n_trunk) for p, at in where]
        N += n_trunk
        ids = torch.zeros((P, N), dtype=torch.long)
        pos = torch.full((P, N), n_shared, dtype=torch.long)
        owner = TRUNK - 1 - torch.arange(P * N).view(P, N)  # padding rows: each its own (negative) owner
        slot = torch.full((P, N), -1, dtype=torch.long)
        if n_trunk:
            pos[0, :n_trunk] = torch.arange(n_shared - n_trunk, n_shared)
            owner[0, :n_trunk] = TRUNK
        for b, (e, n, (p, at)) in enumerate(zip(batch, lens, where)):
            if n == 0:
                continue
            ids[p, at:at + n] = torch.tensor(e.ids[n_shared:n_shared + n])
            pos[p, at:at + n] = torch.arange(n_shared, n_shared + n)
            owner[p, at:at + n] = b
            if e.prompt_start >= n_shared:
                k = at + e.prompt_start - n_shared
                slot[p, k:k + L] = torch.arange(L)
        return cls(ids, pos, owner, slot, where, n_trunk)
