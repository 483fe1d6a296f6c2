"""The generic engine: any Hugging Face causal LM through its own forward, sharing what the batch shares.

One step, for a template whose tokens split as ``context | trunk | suffix_b`` (docs/ARCHITECTURE.md, 'Layouts'):

    context  ids[:n_context]          fixed text before both prompt and first field: run once per engine,
                                     no grad, its KV cache kept (a constant of the frozen model)
    trunk    ids[n_context:n_shared]  the prompt and the fixed text up to the first field: run once per step
                                     at batch 1 against a copy of the context cache, with grad
    suffix_b ids[n_shared:n_b - 1]   example b from its first field to the token before its last target
                                     token, in one of two layouts:

      packed (default)  all examples' suffix rows side by side in one sequence at batch 1 (several packs of at
                        most PACK_ROWS rows where longer), against the batch-1 (context + trunk) cache itself, with
                        a 4D tree mask (a row sees the shared cache and its own example's earlier rows; within the
                        window where a layer slides; a dict by layer type where the decoder mixes full and
                        sliding layers) and each row's own position id n_shared + t. No padding rows: the
                        linear layers compute exactly the rows the gradient needs
                        (docs/ARCHITECTURE.md, 'Packed suffixes and the tree mask').
      padded            batch B, right-padded to the longest suffix, against the shared cache expanded over the
                        batch (a view: no copy; autograd sums the B gradients of the shared K/V), with a 2D
                        attention mask over cache + suffix and position ids n_shared + t.

    ``layout="auto"`` (default) checks once, on a few examples of the first batch, that the packed layout
    gives the padded layout's hidden states, and runs padded where it does not or where the model cannot take
    such a mask (attention other than sdpa/eager, cache layers other than dynamic ones): ``packed_reason``
    says why. ``layout="packed"`` raises instead; ``layout="padded"`` forces the padded layout.

Where a field stands before the prompt the trunk is empty and the prompt is written into each example's
suffix embeddings at its own offset. Tokens after the last input row are never computed.

Prefix-tuning (``PromptInputs.layer_kv``): the slot's K/V are appended to every layer of the context cache's
copy, with grad, and the trunk is the fixed text after the slot; the suffixes run as above. Where a field
precedes the prompt the K/V would stand inside every suffix, which the model's forward cannot take: that
case runs the naive engine's reference forward (``describe`` says so).

Logits only at target rows: the decoder's last hidden state (``model.base_model``, i.e. after the final
norm) is gathered at the rows that predict target tokens, then the model's output embeddings (LM head)
run on those rows only, followed by the logit transform of the model's own ``forward``. Known transforms:
``final_logit_softcapping`` (Gemma 2/3/4, nanochat: ``cap * tanh(logits / cap)``), Cohere's ``logit_scale``
(multiply) and Granite's ``logits_scaling`` (divide). On first use the engine checks, at batch 1 without
grad, that this reproduces ``model(input_ids).logits`` for one example and raises a ``ConfigError``
naming the naive engine where it does not (an output transform it does not know).

Cache API: ``fastprompt/kvcache.py`` (the cache's name in ``forward``, per-step ``copy.deepcopy`` of the
context cache, expansion over the batch without a copy).

precision: ``fp32``; ``autocast`` (``torch.autocast(bfloat16)`` around every forward, as the post);
``bf16`` (the model itself where its weights are bf16, else a bf16 copy made once; the prompt stays fp32
and is cast where it is written into the embeddings; logits and loss in fp32). The user's model is never
changed (dtype, device, requires_grad, training flags).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError, NonFiniteError
from ..kvcache import append_layer_kv, cache_kwarg, expand_batch, new_cache
from ..models import eval_mode
from ..template import Encoded
from .base import Engine, PromptInputs, as_inputs, target_count
from ..layout import PACK_ROWS, SuffixPacks, pack_shape
from .tree import tree_allowed


# Target rows are rounded up to a multiple of ROW_BUCKET with zero rows the loss ignores. Fewer rows than
# this send the LM head's backward (rows x vocab @ vocab x d) to CPU BLAS's skinny-matrix path, whose
# 50,257-long fp32 sums are ~10x less accurate (measured: ~5e-6 vs ~5e-7 relative gradient error against
# float64 at 1-7 rows); the extra rows cost at most ROW_BUCKET - 1 rows of logits.
ROW_BUCKET = 16
IGNORE = -100


class GenericEngine(Engine):
    name = "generic"

    def __init__(self, model, encoder, precision: str = "fp32", layout: str = "auto"):
        super().__init__(model, encoder, precision)
        self.runner = _bf16_runner(model) if precision == "bf16" else model  # the module whose forward runs
        self.decoder = self.runner.base_model  # GPT2Model, LlamaModel, Gemma3TextModel ...: last hidden state
        self.lm_head = self.runner.get_output_embeddings()
        if self.decoder is self.runner or self.lm_head is None:
            raise ConfigError(f"the generic engine needs a causal LM with a base model and an LM head; "
                              f"{type(model).__name__} has none: use engine='naive'")
        self.logit_transform = _logit_transform(self.runner)
        self.cache_kwarg = cache_kwarg(self.decoder)
        self._context_cache = None  # (key, DynamicCache or None), built lazily
        self._checked = False
        self.layout = layout
        # packed layout usable? None: not yet checked (auto checks once against the padded layout)
        self._packed = False if layout == "padded" else None
        self.packed_reason = None  # why the packed layout was not taken (auto), once checked
        self._naive = None  # layer_kv inputs where a field precedes the prompt (see the module docstring)
        self.auto_reason = None  # why engine "auto" chose this engine over the packed one (make_engine)

    # --------------------------------------------------------------------------------------- layout
    @property
    def trunk_len(self) -> int:
        return self.encoder.n_shared - self.encoder.n_context

    def suffix_lens(self, batch: Sequence[Encoded]) -> list[int]:
        """Per example: rows from the first field to the token before the last target token."""
        return [len(e.ids) - 1 - self.encoder.n_shared for e in batch]

    def rows_per_example(self, batch: Sequence[Encoded]) -> float:
        """Transformer rows computed per example in one step: the padded suffix block plus the batch-1 trunk,
        amortised over the batch (the context is computed once per engine and not counted)."""
        lens = self.suffix_lens(batch)
        if self._packed is False:
            return (self.trunk_len + len(batch) * max(lens)) / len(batch)
        P, N = _pack_shape(lens)
        return (self.trunk_len + P * N) / len(batch)

    # ------------------------------------------------------------------------------------- forwards
    def _forward(self, embeds, position_ids, attention_mask=None, cache=None):
        """The decoder's last hidden state ``(B, T, d)``; ``cache`` is extended in place."""
        kwargs = {self.cache_kwarg: cache} if cache is not None else {}
        out = self.decoder(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                           use_cache=cache is not None, **kwargs)
        return out.last_hidden_state

    def _new_cache(self):
        return new_cache(self.runner.config)

    def _context(self):
        """A fresh cache holding the constant context's K/V (computed once, copied per step), or None."""
        n_context = self.encoder.n_context
        if n_context == 0:
            return None
        weight = self.lm_head.weight
        key = (weight.device, weight.dtype)
        if self._context_cache is None or self._context_cache[0] != key:
            ids = torch.tensor([self.encoder.shared_ids[:n_context]], device=self.device)  # (1, n_context)
            cache = self._new_cache()
            with torch.no_grad():
                embeds = self.runner.get_input_embeddings()(ids)
                self._forward(embeds, torch.arange(n_context, device=self.device)[None], cache=cache)
            self._context_cache = (key, cache)
        return copy.deepcopy(self._context_cache[1])  # the forwards below extend it; the constant stays

    def _check_logits(self, example: Encoded):
        """Once: the LM head on our hidden state must give the model's own logits (see module docstring)."""
        ids = torch.tensor([example.ids[:-1]], device=self.device)
        with torch.no_grad():
            full = self.runner(input_ids=ids, use_cache=False).logits[0, -1].float()
            hidden = self.decoder(input_ids=ids, use_cache=False).last_hidden_state[0, -1:]
            ours = self.logit_transform(self.lm_head(hidden))[0].float()
        if not (torch.isfinite(full).all() and torch.isfinite(ours).all()):  # the model's weights, not its code
            raise NonFiniteError(f"{type(self.runner).__name__} gives NaN/inf logits on a plain example")
        tol = 1e-4 if self.precision == "fp32" and full.dtype == torch.float32 else 3e-2
        err = (full - ours).abs().max().item()
        if not err <= tol * (1.0 + full.abs().max().item()):
            raise ConfigError(
                f"the generic engine cannot reproduce the logits of {type(self.runner).__name__} from its last "
                f"hidden state (max difference {err:.3g}: an output transform it does not know); use engine='naive'")
        self._checked = True

    # ----------------------------------------------------------------------------------------- loss
    def loss_terms(self, inputs, batch):
        prompt = as_inputs(inputs)
        if prompt.layer_kv is not None and self.encoder.prompt_start is None:
            return self._naive_engine().loss_terms(prompt, batch)
        with eval_mode(self.runner), self.autocast():
            if not self._checked:
                self._check_logits(batch[0])
            if self._packed is None:
                self._check_packed(prompt, batch)
            lens = self.suffix_lens(batch)
            suffix_h, where = None, None
            if self._packed and max(lens) > 0 and _pack_shape(lens)[0] == 1:
                # one pack: trunk and suffixes in one forward (the trunk's rows are shared by every example)
                trunk_h, suffix_h, where = self._suffix_packed(prompt, batch, lens, self._start_cache(prompt), with_trunk=True)
            else:
                cache, trunk_h = self._shared(prompt)
                # suffix: every example from its first field on, against the shared cache
                if max(lens) > 0:
                    if self._packed:
                        _, suffix_h, where = self._suffix_packed(prompt, batch, lens, cache)
                    else:
                        suffix_h = self._suffix_padded(prompt, batch, lens, cache)

            # target rows: row p predicts token p + 1; p >= n_shared lies in the suffix, p = n_shared - 1 in the trunk
            hidden, labels = self._target_rows(batch, trunk_h, suffix_h, where)  # (R, d), (R,): R rounded up to ROW_BUCKET
            logits = self.logit_transform(self.lm_head(hidden))  # (R, V)
        ce_sum = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
        return ce_sum, target_count(batch)

    def _naive_engine(self):
        if self._naive is None:
            from .naive import NaiveEngine

            self._naive = NaiveEngine(self.model, self.encoder, "fp32" if self.precision == "fp32" else "autocast")
        return self._naive

    def pass_settings(self) -> tuple:
        return (self.layout,)

    def describe(self) -> str:
        notes = [self.precision]
        if self._naive is not None:
            notes.append("prefix K/V after a field: the naive reference forward")
        if self.auto_reason:
            notes.append(f"auto: not the packed engine, {self.auto_reason.removesuffix(': use engine=' + repr('generic'))}")
        return f"{self.name} ({'; '.join(notes)})"

    def _start_cache(self, prompt: PromptInputs):
        """A fresh cache of what precedes the trunk's rows: the constant context and, for ``layer_kv``, the slot's
        K/V (1, H, L, hd) per layer, appended with grad. None where that is nothing."""
        cache = self._context()
        if prompt.layer_kv is None:
            return cache
        if cache is None:
            cache = self._new_cache()
        append_layer_kv(cache, prompt.layer_kv, self.lm_head.weight.dtype)
        return cache

    def _trunk_start(self, prompt: PromptInputs) -> int:
        """The trunk's first position: the prompt's, or after the slot where the slot holds K/V, not rows."""
        enc = self.encoder
        return enc.n_context + (enc.prompt_len if prompt.layer_kv is not None else 0)

    def _shared(self, prompt):
        """The context cache extended by the trunk: the prompt and the fixed text up to the first field,
        once, batch 1, with grad. Returns ``(cache or None, trunk hidden state (1, H, d) or None)``."""
        enc, dev = self.encoder, self.device
        cache = self._start_cache(prompt)
        trunk_h = None
        start = self._trunk_start(prompt)
        if enc.n_shared > start:
            if cache is None:
                cache = self._new_cache()
            trunk_h = self._forward(self._trunk_embeds(prompt), torch.arange(start, enc.n_shared, device=dev)[None],
                                   cache=cache)
        return cache, trunk_h

    def _trunk_embeds(self, prompt):
        """``(1, H, d)``: the trunk's token embeddings with the prompt written in (``embeds``)."""
        enc = self.encoder
        start = self._trunk_start(prompt)
        ids = torch.tensor([enc.shared_ids[start:]], device=self.device)  # (1, H)
        embeds = self.runner.get_input_embeddings()(ids)  # (1, H, d)
        if prompt.embeds is None:
            return embeds
        at = enc.prompt_start - enc.n_context  # the prompt opens the trunk (n_context == prompt_start)
        return torch.cat([embeds[:, :at], prompt.embeds.to(embeds.dtype)[None], embeds[:, at + enc.prompt_len:]], dim=1)

    def _suffix_padded(self, prompt, batch, lens, cache):
        """Padded layout: the suffixes at batch B, right-padded to the longest, against the cache expanded over
        the batch. Hidden states ``(B, T, d)``; example b's row t at ``[b, t]``."""
        enc, dev = self.encoder, self.device
        n_shared, T, B = enc.n_shared, max(lens), len(batch)
        ids, mask, slot = self._suffix_tensors(batch, lens, T)
        embeds = self.runner.get_input_embeddings()(ids)  # (B, T, d)
        if enc.prompt_start is None:  # a field precedes the prompt: it lies in the suffix
            embeds = torch.where((slot >= 0).unsqueeze(-1), prompt.embeds.to(embeds.dtype)[slot.clamp(min=0)], embeds)
        if cache is not None:
            expand_batch(cache, B)
        positions = torch.arange(n_shared, n_shared + T, device=dev)[None]  # right-padded: same for all
        return self._forward(embeds, positions, attention_mask=mask, cache=cache)  # (B, T, d)

    def _suffix_packed(self, prompt, batch, lens, cache, with_trunk=False):
        """Packed layout (docs/ARCHITECTURE.md, 'Packed suffixes and the tree mask'; here through the model's
        own forward): the suffixes side by side in one sequence (several of at most PACK_ROWS rows where longer)
        against the batch-1 shared cache, with a 4D tree mask (a row sees the shared cache and its own example's
        earlier rows, within a sliding window where the layer has one) and each row's own position id. No padding
        rows (except to even out several packs). ``with_trunk`` (one pack only): the trunk's H rows open the pack
        (``cache`` then holds the context only) and every example's rows see them. Returns the trunk's hidden states
        ``(1, H, d)`` (or None), the suffix hidden states ``(P, N, d)`` and ``where``: example b's row t lies at
        ``[where[b][0], where[b][1] + t]``; or ``(None, None, None)`` where the cache or attention takes no such
        mask."""
        enc, dev = self.encoder, self.device
        n_shared = enc.n_shared
        H = n_shared - self._trunk_start(prompt) if with_trunk else 0
        packs = SuffixPacks.build(enc, batch, lens, H, cap=PACK_ROWS)
        ids, pos, owner, slot, where = packs.ids, packs.positions, packs.owner, packs.slot, packs.where
        if cache is None:
            cache = self._new_cache()
        embeds = self.runner.get_input_embeddings()(ids[:, H:].to(dev))  # (P, N - H, d)
        mask = self._tree_mask(cache, pos, owner, embeds.dtype, n_shared - H)
        if mask is None:
            return None, None, None
        if enc.prompt_start is None:  # a field precedes the prompt: it lies in the suffix
            slot = slot[:, H:].to(dev)
            embeds = torch.where((slot >= 0).unsqueeze(-1), prompt.embeds.to(embeds.dtype)[slot.clamp(min=0)], embeds)
        if H:
            embeds = torch.cat([self._trunk_embeds(prompt), embeds], dim=1)
        if ids.shape[0] > 1:
            expand_batch(cache, ids.shape[0])
        h = self._forward(embeds, pos.to(dev), attention_mask=mask, cache=cache)
        return (h[:, :H] if H else None), h, where

    def _tree_mask(self, cache, pos, owner, dtype, cache_end):
        """The attention mask of the packed rows over (cached keys + packed rows), as the model's attention takes
        it (bool for sdpa, additive float for eager): ``(P, 1, N, c + N)``, or a dict by layer type where layers
        differ (full vs sliding window), or None where the cache or attention is of a kind not handled.
        A row sees the cached keys (positions up to ``cache_end`` - 1) and the earlier rows of its own owner
        (an example's index) or of the TRUNK rows (the trunk, where packed)."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        impl = getattr(self.runner.config, "_attn_implementation", None)
        layers = getattr(cache, "layers", None)
        if impl not in ("sdpa", "eager") or not layers or not all(isinstance(x, DynamicLayer) for x in layers):
            return None
        P, N = pos.shape
        q = pos[:, :, None]  # (P, N, 1)
        own = tree_allowed(pos, owner, pos, owner)  # (P, N, N): the tree over the packed rows
        masks, keys = {}, []
        for layer in layers:
            k = getattr(layer, "keys", None)
            c = k.shape[-2] if torch.is_tensor(k) and k.dim() == 4 else 0  # the last c shared positions are cached
            w = layer.sliding_window if isinstance(layer, DynamicSlidingWindowLayer) else None
            if (c, w) not in masks:
                cached = torch.ones((P, N, c), dtype=torch.bool)
                new = own
                if w is not None:  # the model's sliding window: key position > query position - w
                    cached = (q - torch.arange(cache_end - c, cache_end)) < w
                    new = own & ((q - pos[:, None, :]) < w)
                m = torch.cat([cached, new], dim=-1)[:, None]  # (P, 1, N, c + N)
                if impl == "eager":
                    m = torch.zeros(m.shape, dtype=dtype).masked_fill_(~m, torch.finfo(dtype).min)
                masks[(c, w)] = m.to(self.device, non_blocking=True)
            keys.append((c, w))
        if len(masks) == 1:
            return next(iter(masks.values()))
        layer_types = getattr(self.runner.config, "layer_types", None)
        if not layer_types or len(layer_types) != len(layers):
            return None
        by_type = {}
        for t, key in zip(layer_types, keys):
            if by_type.setdefault(t, key) != key:
                return None
        return {t: masks[key] for t, key in by_type.items()}  # the decoders that mix layer types take a dict

    def _check_packed(self, prompt, batch):
        """Once (layout auto/packed): the packed layout must give the padded layout's hidden states on a few of
        the batch's examples (shortest to longest); where it does not (or the model takes no such mask), the
        engine stays on the padded layout (auto) or raises (packed)."""
        order = sorted(range(len(batch)), key=lambda b: len(batch[b].ids))
        picks = sorted({order[round(i * (len(order) - 1) / 7)] for i in range(8)}) if len(order) > 1 else order
        sub = [batch[b] for b in picks]
        lens = self.suffix_lens(sub)
        if max(lens) == 0:
            return  # nothing to compare yet
        reason = None
        try:
            with torch.no_grad():
                if self.trunk_len > 0 and _pack_shape(lens)[0] == 1:  # the trunk in the pack, as loss_terms runs it
                    _, packed, where = self._suffix_packed(prompt, sub, lens, self._start_cache(prompt), with_trunk=True)
                    cache, _ = self._shared(prompt)
                else:
                    cache, _ = self._shared(prompt)
                    _, packed, where = self._suffix_packed(prompt, sub, lens,
                                                           copy.deepcopy(cache) if cache is not None else None)
                if packed is None:
                    reason = "its cache or attention implementation takes no packed mask"
                else:
                    padded = self._suffix_padded(prompt, sub, lens, cache)
                    a = torch.cat([packed[p, at:at + n] for (p, at), n in zip(where, lens)]).float()
                    b = torch.cat([padded[i, :n] for i, n in enumerate(lens)]).float()
                    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                        return  # a non-finite prompt proves nothing about the layout: decide on a later batch
                    err = (a - b).abs().max().item()
                    tol = 1e-4 if self.precision == "fp32" and a.dtype == torch.float32 else 3e-2
                    if not err <= tol * (1.0 + b.abs().max().item()):
                        reason = f"packed and padded hidden states differ by {err:.3g}"
        except Exception as exc:  # a decoder that does not take a custom 4D / per-layer-type mask
            if self.layout == "packed":
                raise
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None and self.layout == "packed":
            raise ConfigError(f"the generic engine's packed layout does not work for {type(self.runner).__name__}: "
                              f"{reason}; use layout='padded'")
        self._packed = reason is None
        self.packed_reason = reason

    def _suffix_tensors(self, batch, lens, T):
        """``ids`` (B, T) right-padded; ``mask`` (B, n_shared + T) over cache + suffix; ``slot`` (B, T) prompt row or -1."""
        n_shared, L = self.encoder.n_shared, self.encoder.prompt_len
        B = len(batch)
        ids = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, n_shared + T), dtype=torch.long)
        mask[:, :n_shared] = 1
        slot = torch.full((B, T), -1, dtype=torch.long)
        for b, (e, n) in enumerate(zip(batch, lens)):
            ids[b, :n] = torch.tensor(e.ids[n_shared : n_shared + n])
            mask[b, n_shared : n_shared + n] = 1
            if e.prompt_start >= n_shared:
                at = e.prompt_start - n_shared
                slot[b, at : at + L] = torch.arange(L)
        return [t.to(self.device, non_blocking=True) for t in (ids, mask, slot)]

    def _target_rows(self, batch, trunk_h, suffix_h, where=None):
        """Hidden states and labels of the rows that predict target tokens. ``suffix_h``: padded ``(B, T, d)``
        (example b's row t at ``[b, t]``) or packed ``(P, N, d)`` with ``where`` (see ``_suffix_packed``)."""
        n_shared = self.encoder.n_shared
        b_idx, t_idx, n_trunk_rows, labels = [], [], 0, []
        trunk_labels = []
        for b, e in enumerate(batch):
            for p in range(e.target_start - 1, len(e.ids) - 1):
                if p >= n_shared:
                    pack, at = (b, 0) if where is None else where[b]
                    b_idx.append(pack)
                    t_idx.append(at + p - n_shared)
                    labels.append(e.ids[p + 1])
                else:  # only p = n_shared - 1 (the first field is the target), the trunk's last row
                    if trunk_h is None or p != n_shared - 1:
                        raise AssertionError("a target row before the trunk's last row")
                    n_trunk_rows += 1
                    trunk_labels.append(e.ids[p + 1])
        parts = []
        if n_trunk_rows:
            parts.append(trunk_h[0, -1:].expand(n_trunk_rows, -1))
        if b_idx:
            parts.append(suffix_h[torch.tensor(b_idx, device=self.device), torch.tensor(t_idx, device=self.device)])
        labels = trunk_labels + labels
        pad = -len(labels) % ROW_BUCKET
        if pad:  # zero rows, ignored by the loss: see ROW_BUCKET
            parts.append(parts[0].new_zeros(pad, parts[0].shape[-1]))
        hidden = torch.cat(parts) if len(parts) > 1 else parts[0]
        labels = torch.tensor(labels + [IGNORE] * pad, device=self.device)
        return hidden, labels


# --------------------------------------------------------------------------------------- helpers
def _bf16_runner(model):
    """The model itself where its floating weights are bf16 already, else a bf16 copy (made once, frozen)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes == {torch.bfloat16}:
        return model
    # copy.deepcopy(model).to(bfloat16), with each parameter copied straight to bf16 (the memo hands deepcopy
    # the bf16 copies; tied weights stay tied): no transient fp32 copy of the whole model
    memo = {id(p): torch.nn.Parameter(p.detach().to(torch.bfloat16) if p.is_floating_point() else p.detach().clone(),
                                      requires_grad=False)
            for p in model.parameters()}
    runner = copy.deepcopy(model, memo).to(torch.bfloat16)  # .to: the floating buffers, as model.to would
    runner.requires_grad_(False)
    runner.eval()
    return runner


def _pack_shape(lens):
    """``(packs, rows of the longest pack)`` for this engine's ``PACK_ROWS`` (layout.pack_shape)."""
    return pack_shape(lens, PACK_ROWS)


def _logit_transform(model):
    """What the causal LM's forward does to ``lm_head(hidden)`` (see the module docstring)."""
    config = model.config
    model_type = str(getattr(config, "model_type", ""))
    cap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None) if model_type.startswith("cohere") else None
    divide = getattr(config, "logits_scaling", None) if model_type.startswith("granite") else None

    def transform(logits):
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform
