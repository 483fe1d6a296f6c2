"""Greedy decoding of the target word after a prompted prefix (for samples, exact match, parrot rate).

Each prefix ``(ids, prompt_start)`` is a template rendered up to its target, the prompt's rows at
``prompt_start``. The word is decoded token by token until a token starts a new word (leading whitespace
after the first token), a newline, EOS, or ``max_new_tokens``.

The cached decoder does what the training engines do: the **shared tokens**, those that every prefix of
the call shares (the template text before the first field, and the prompt where it stands there), runs
once per call at batch 1; each batch continues from a copy of its KV cache, expanded over the
batch without a copy. Each batch's own tokens then run once, left-padded to the batch's longest, and
every new token is one row per undecided example against the KV cache: only the last position's logits
are computed, and finished examples leave the batch (their cache rows are dropped). Layout of one batch::

    keys:     [ shared (C)  | pad ... own tokens | new token 1 | new token 2 ... ]
    mask:     [ 1 ... 1     | 0 ... 0   1 ... 1 | 1           | 1 ... ]
    position:   0 ... C-1     (any)     C ... n-1  n             n+1

Models with sliding-window layers whose window is shorter than a decoded sequence get no shared tokens
(C = 0: plain left padding): their window counts cache slots, and pads after the shared ones would take the
slots of real tokens.

``greedy_words_uncached`` is the former decoder (the whole left-padded sequence re-run for every new token),
kept as the reference the cached one is tested against: the same words, in fp32.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Sequence

import torch

from .errors import ConfigError
from .kvcache import append_layer_kv, cache_kwarg, expand_batch, new_cache
from .models import eval_mode

Prefix = tuple[Sequence[int], "int | None"]  # (token ids up to the target, first prompt position or None)
# Examples decoded together. Larger batches than training's: no activations are kept for a backward, and each
# new token is one (batch, d) row block, whose GEMMs (the LM head's above all) want many rows (measured on
# Gemma 3 270M, 2 CPU cores: 192 pairs took 2.4x longer in batches of 64 than in one batch).
BATCH = 256


def slot_is_shared(prefixes: Sequence[Prefix], prompt_len: int) -> bool:
    """Whether the prompt's slot lies among the shared tokens of ``prefixes`` (where ``layer_kv`` can go)."""
    start = prefixes[0][1] if prefixes else None
    return start is not None and shared_len(prefixes) >= start + prompt_len


@torch.no_grad()
def greedy_words(model, tokenizer, prefixes: Sequence[Prefix], prompt: torch.Tensor | None, max_new_tokens: int = 6,
                 autocast: bool = False, batch_size: int = BATCH, progress=None,
                 layer_kv: torch.Tensor | None = None) -> list[str]:
    """The greedily decoded word after each prefix (see the module docstring). ``prompt``: ``(L, d)`` rows
    in the space of the model's input embeddings; or, with ``prompt=None``, ``layer_kv`` ``(n_layer, 2, L, H,
    hd)``: every layer's K/V at the slot (prefix-tuning), appended to the shared tokens' cache between the
    text before the slot and the text after it (the slot must lie among the shared tokens:
    ``slot_is_shared``). ``progress``: called with the number of prefixes done."""
    if not prefixes:
        return []
    device = next(model.parameters()).device
    C = shared_len(prefixes)
    if layer_kv is not None:
        L = layer_kv.shape[2]
        if not slot_is_shared(prefixes, L):
            raise ValueError("per-layer K/V decode only where the prompt's slot lies among the shared tokens")
        prompt = torch.zeros((L, model.get_input_embeddings().weight.shape[1]), device=device)  # no rows: K/V
    prompt = prompt.detach().to(device)
    window = sliding_window(model.config)
    if window is not None and max(len(ids) for ids, _ in prefixes) + max_new_tokens > window:
        if layer_kv is not None:
            raise ValueError("per-layer K/V decode only on models without a shorter sliding window")
        C = 0  # a sliding window counts cache slots: pads after shared tokens would take slots of real tokens
    forward = _Forward(model)
    out: list[str] = []
    with eval_mode(model), _autocast(device, autocast):
        shared = None
        if C and layer_kv is not None:
            shared = _shared_with_kv(forward, prefixes[0], C, layer_kv, autocast)
        elif C:  # the shared tokens, once for the whole call
            ids, slot = _ids_and_slots([(prefixes[0][0][:C], prefixes[0][1])], C, prompt.shape[0])
            shared = new_cache(model.config)
            forward.fill(_embed(model, ids.to(device), slot.to(device), prompt), None,
                         torch.arange(C, device=device)[None], shared)
        for i in range(0, len(prefixes), batch_size):
            batch = prefixes[i : i + batch_size]
            cache = copy.deepcopy(shared) if shared is not None else new_cache(model.config)
            if shared is not None:
                expand_batch(cache, len(batch))
            out += _decode_batch(forward, tokenizer, batch, prompt, C, cache, max_new_tokens)
            if progress is not None:
                progress(len(batch))
    return out


def shared_len(prefixes: Sequence[Prefix]) -> int:
    """Leading tokens every prefix shares, prompt rows included where every prefix has the prompt at the same
    place; each prefix keeps at least its last token for itself (its first logits come from it)."""
    starts = {start for _, start in prefixes}
    n = len(os.path.commonprefix([tuple(ids) for ids, _ in prefixes]))
    n = min(n, min(len(ids) for ids, _ in prefixes) - 1)
    if len(starts) > 1:  # the prompt's placeholder ids stand at different places: stop before the first
        n = min([n] + [s for s in starts if s is not None])
    return max(n, 0)


def sliding_window(config) -> int | None:
    """The attention window of the model's sliding-window layers, None where every layer sees everything."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None and not any("sliding" in str(t) for t in types):
        return None
    return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None


class _Forward:
    """The model's forwards as the decoder uses them: ``fill`` runs rows into the cache through the base model
    (no LM head: their logits are not needed), ``logits`` runs one new row per example through the causal LM
    and returns its logits ``(B, V)``. One row per example matters beyond the LM head's work: the causal LM
    slices the last position out of a longer block before its LM head, and torch multiplies that strided
    ``(B, 1, d)`` slice by the ``(V, d)`` weight as a batched matmul over B copies of the weight (measured on
    Gemma 3 270M: 2.5 s for one 256-row block, against ~0.2 s for the same rows contiguous)."""

    def __init__(self, model):
        self.model = model
        self.kwarg = cache_kwarg(model)
        params = inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.decoder = getattr(model, "base_model", model)
        try:
            self.decoder_kwarg = cache_kwarg(self.decoder) if self.decoder is not model else None
        except ConfigError:
            self.decoder_kwarg = None

    def fill(self, embeds, mask, position, cache) -> None:
        if self.decoder_kwarg is None:  # no separate base model: the causal LM, its logits unused
            self.logits(embeds, mask, position, cache)
            return
        self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position, use_cache=True,
                     **{self.decoder_kwarg: cache})

    def logits(self, embeds, mask, position, cache) -> torch.Tensor:
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position, use_cache=True,
                         **{self.kwarg: cache}, **self.keep_last)
        return out.logits[:, -1]


def _shared_with_kv(forward: _Forward, prefix: Prefix, C: int, layer_kv: torch.Tensor, autocast: bool):
    """The shared tokens' cache with the slot holding ``layer_kv``: the text before the slot, the K/V, the text
    after it (positions go on after the slot, as after an ``L``-token prompt)."""
    model = forward.model
    device = next(model.parameters()).device
    seq, start = prefix
    L = layer_kv.shape[2]
    ids = torch.tensor([list(seq[:C])], device=device)
    embed = model.get_input_embeddings()
    cache = new_cache(model.config)
    if start:
        forward.fill(embed(ids[:, :start]), None, torch.arange(start, device=device)[None], cache)
    append_layer_kv(cache, layer_kv.detach().to(device), torch.bfloat16 if autocast else embed.weight.dtype)
    if C > start + L:
        forward.fill(embed(ids[:, start + L:]), None, torch.arange(start + L, C, device=device)[None], cache)
    return cache


def _decode_batch(forward: _Forward, tokenizer, batch, prompt, C, cache, max_new_tokens) -> list[str]:
    model, device = forward.model, prompt.device
    B, L = len(batch), prompt.shape[0]
    S = max(len(ids) for ids, _ in batch) - C  # the batch's own tokens, left-padded to the longest
    ids, slot = _ids_and_slots([(ids[C:], None if start is None else start - C) for ids, start in batch], S, L,
                               left=True)
    lens = torch.tensor([len(seq) for seq, _ in batch])
    mask = torch.ones((B, C + S), dtype=torch.long)
    mask[:, C:] = (torch.arange(S)[None] >= (S - (lens - C))[:, None]).long()  # pads: 0
    position = (C + (mask[:, C:].cumsum(-1) - 1)).clamp(min=C)  # own tokens at C, C+1, ...; pads: any
    ids, slot, mask, position = ids.to(device), slot.to(device), mask.to(device), position.to(device)
    embeds = _embed(model, ids, slot, prompt)
    if S > 1:  # all but the last own token into the cache; the last one gives the first logits
        forward.fill(embeds[:, :-1], mask[:, :-1], position[:, :-1], cache)
        embeds, position = embeds[:, -1:], position[:, -1:]
    words: list[list[int]] = [[] for _ in range(B)]
    alive = torch.arange(B, device=device)  # batch rows still being decoded -> example index
    next_pos = position[:, -1] + 1
    for step in range(max_new_tokens):
        next_ids = forward.logits(embeds, mask, position, cache).float().argmax(-1)
        stay = []
        for row, (b, tok) in enumerate(zip(alive.tolist(), next_ids.tolist())):
            if ends_word(tokenizer, tok, words[b]):
                continue
            words[b].append(tok)
            stay.append(row)
        if not stay or step == max_new_tokens - 1:
            break
        if len(stay) < len(alive):  # finished examples leave the batch
            keep = torch.tensor(stay, device=device)
            cache.batch_select_indices(keep)
            alive, next_ids, mask, next_pos = alive[keep], next_ids[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        embeds = model.get_input_embeddings()(next_ids[:, None])
        position, next_pos = next_pos[:, None], next_pos + 1
    return [tokenizer.decode(w).strip() for w in words]


def ends_word(tokenizer, tok: int, word: list[int]) -> bool:
    """EOS, a newline, or (after the first token) a token that starts a new word."""
    piece = tokenizer.decode([tok])
    return tok == tokenizer.eos_token_id or "\n" in piece or bool(word and piece[:1].isspace())


def _ids_and_slots(prefixes, T: int, L: int, left: bool = False):
    """``(B, T)`` ids and prompt slots (prompt row index, -1 elsewhere), right- or left-padded to ``T``."""
    B = len(prefixes)
    ids = torch.zeros((B, T), dtype=torch.long)
    slot = torch.full((B, T), -1, dtype=torch.long)
    for b, (seq, start) in enumerate(prefixes):
        at = T - len(seq) if left else 0
        ids[b, at : at + len(seq)] = torch.tensor(seq, dtype=torch.long)
        if start is not None:  # prompt rows that fall inside this span (start may be negative: among the shared tokens)
            lo, hi = max(start, 0), min(start + L, len(seq))
            if lo < hi:
                slot[b, at + lo : at + hi] = torch.arange(lo - start, hi - start)
    return ids, slot


def _embed(model, ids, slot, prompt):
    """Token embeddings with the prompt's rows written at the prompt slots."""
    embeds = model.get_input_embeddings()(ids)
    rows = prompt.to(embeds.dtype)[slot.clamp(min=0)]
    return torch.where((slot >= 0).unsqueeze(-1), rows, embeds)


def _autocast(device, on: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else torch.autocast(device.type, enabled=False)


# ------------------------------------------------------------------------------------------ reference
@torch.no_grad()
def greedy_words_uncached(model, tokenizer, prefixes: Sequence[Prefix], prompt: torch.Tensor,
                          max_new_tokens: int = 6, autocast: bool = False, batch_size: int = 64) -> list[str]:
    """The former decoder: each batch left-padded, the whole sequence re-run for every new token. The
    reference for ``greedy_words`` (tests, benchmarks)."""
    device = next(model.parameters()).device
    prompt = prompt.detach().to(device)
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out: list[str] = []
    with eval_mode(model), _autocast(device, autocast):
        for i in range(0, len(prefixes), batch_size):
            batch = prefixes[i : i + batch_size]
            T = max(len(ids) for ids, _ in batch)
            ids, slot = _ids_and_slots(batch, T, prompt.shape[0], left=True)
            lens = torch.tensor([len(seq) for seq, _ in batch])
            mask = (torch.arange(T)[None] >= (T - lens)[:, None]).long().to(device)
            embeds = _embed(model, ids.to(device), slot.to(device), prompt)
            words: list[list[int]] = [[] for _ in batch]
            done = [False] * len(batch)
            for _ in range(max_new_tokens):
                position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                               use_cache=False, **last_only).logits
                next_ids = logits[:, -1].float().argmax(-1)
                for b, tok in enumerate(next_ids.tolist()):
                    if not done[b]:
                        done[b] = ends_word(tokenizer, tok, words[b])
                        if not done[b]:
                            words[b].append(tok)
                if all(done):
                    break
                embeds = torch.cat([embeds, model.get_input_embeddings()(next_ids).unsqueeze(1).to(embeds.dtype)], 1)
                mask = torch.cat([mask, mask.new_ones((len(batch), 1))], dim=1)
            out += [tokenizer.decode(w).strip() for w in words]
    return out
