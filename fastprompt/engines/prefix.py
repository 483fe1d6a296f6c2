"""The fast prefix-tuning engine: the generic engine's machinery with per-layer prefix K/V as the shared head.

One step, for a template whose tokens split as ``prefix text | prompt slot | head text | suffix_b``:

    prefix text   constant, run once per engine without grad, its KV cache kept (``GenericEngine._prefix``)
    prompt slot   no forward at all: the trainable K/V (n_layer, 2, L, H, hd) are appended to every
                  layer of a copy of that cache (with grad: ``DynamicCache.update`` concatenates)
    head text     fixed text after the prompt up to the first field: once per step, batch 1, with grad
    suffix_b      every example from its first field on, batch B, against the cache expanded over the
                  batch (a view; autograd sums the B gradients of the shared K/V)

Logits only at target rows, as in the generic engine. Where a field precedes ``{prompt}`` the prefix K/V
differ in position per example: that case runs the naive prefix engine. GPT-2 family only (see
``fastprompt/prefix.py``). Built on ``GenericEngine`` by subclassing; nothing in it is changed.

Also here: ``gpt2_prefix_forward`` (our own GPT-2 forward with the K/V written at the slot) and the naive
prefix engine built on it, the reference both are tested against.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kvcache import expand_batch
from ..models import eval_mode
from .base import target_count
from .generic import GenericEngine
from .naive import NaiveEngine


# ---------------------------------------------------------------------------------- own forward
def gpt2_prefix_forward(model, embeds, position_ids, key_mask, slot=None, prefix_kv=None, capture=False):
    """GPT-2's forward over ``embeds`` (B, T, d) token embeddings, returning the final hidden state
    (B, T, d) (after ``ln_f``), or with ``capture`` also each layer's ``(k, v)`` (B, H, T, hd).

    ``position_ids`` (B, T); ``key_mask`` (B, T) bool, the real rows; ``slot`` (B, T) long, the prefix row
    a position holds or -1; ``prefix_kv`` (n_layer, 2, L, H, hd): written over K/V where ``slot >= 0``.
    Causal attention over real keys; every row also sees itself, so padded rows stay finite.
    """
    tr, c = model.transformer, model.config
    B, T, d = embeds.shape
    H = c.n_head
    hd = d // H
    x = embeds + tr.wpe(position_ids)  # (B, T, d)
    eye = torch.eye(T, dtype=torch.bool, device=embeds.device)
    allowed = (torch.ones(T, T, dtype=torch.bool, device=embeds.device).tril() & key_mask[:, None, :]) | eye
    allowed = allowed[:, None]  # (B, 1, Tq, Tk)
    in_slot = None if slot is None else (slot >= 0)[..., None, None]  # (B, T, 1, 1)
    scale = 1.0 / math.sqrt(hd) if getattr(c, "scale_attn_weights", True) else 1.0
    captured = []
    for layer, block in enumerate(tr.h):
        h = block.ln_1(x)
        q, k, v = block.attn.c_attn(h).split(d, dim=-1)
        q, k, v = (t.view(B, T, H, hd) for t in (q, k, v))  # (B, T, H, hd)
        if prefix_kv is not None:
            rows = slot.clamp(min=0)
            k = torch.where(in_slot, prefix_kv[layer, 0].to(k.dtype)[rows], k)
            v = torch.where(in_slot, prefix_kv[layer, 1].to(v.dtype)[rows], v)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        if capture:
            captured.append((k, v))
        layer_scale = scale / (layer + 1) if getattr(c, "scale_attn_by_inverse_layer_idx", False) else scale
        att = (q @ k.transpose(-1, -2)).float() * layer_scale  # (B, H, T, T)
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)
        y = (att @ v).transpose(1, 2).reshape(B, T, d)
        x = x + block.attn.c_proj(y)
        x = x + block.mlp(block.ln_2(x))
    x = tr.ln_f(x)
    return (x, captured) if capture else x


# ---------------------------------------------------------------------------------- naive engine
class NaivePrefixEngine(NaiveEngine):
    """Whole right-padded sequences through ``gpt2_prefix_forward``, logits everywhere (the reference).
    The batch layout is the naive engine's; ``slot`` marks where the prefix K/V stand."""

    def describe(self) -> str:
        return f"prefix-naive ({self.precision})"

    def loss_terms(self, prefix_kv, batch):
        ids, mask, labels, slot = self.batch_tensors(batch)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        with eval_mode(self.model), self.autocast():
            embeds = self.model.transformer.wte(ids)
            hidden = gpt2_prefix_forward(self.model, embeds, positions, mask.bool(), slot, prefix_kv)
            logits = self.model.lm_head(hidden)  # (B, T, V)
        ce_sum = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return ce_sum, target_count(batch)


class PrefixEngine(GenericEngine):
    name = "prefix"

    def __init__(self, model, encoder, precision: str = "fp32"):
        # the padded suffix layout (its loss_terms below runs _suffix_tensors / expand_batch itself)
        super().__init__(model, encoder, precision, layout="padded")
        self.fallback = None
        if encoder.prompt_start is None:
            self.fallback = NaivePrefixEngine(model, encoder, "autocast" if precision != "fp32" else "fp32")

    def describe(self) -> str:
        if self.fallback is not None:
            return f"prefix-naive ({self.fallback.precision}; a field precedes the prompt)"
        return f"prefix-generic ({self.precision})"

    def _append_prefix(self, cache, prefix_kv):
        """Every layer's cache gets the prompt slot's K/V: (1, H, L, hd) each, in the runner's dtype."""
        dtype = self.lm_head.weight.dtype
        for layer in range(prefix_kv.shape[0]):
            k = prefix_kv[layer, 0].transpose(0, 1)[None].to(dtype)  # (1, H, L, hd)
            v = prefix_kv[layer, 1].transpose(0, 1)[None].to(dtype)
            cache.update(k, v, layer)

    def loss_terms(self, prefix_kv, batch):
        if self.fallback is not None:
            return self.fallback.loss_terms(prefix_kv, batch)
        enc, dev = self.encoder, self.device
        n_prefix, n_shared, L = enc.n_prefix, enc.n_shared, enc.prompt_len
        B = len(batch)
        embed = self.runner.get_input_embeddings()
        with eval_mode(self.runner), self.autocast():
            if not self._checked:
                self._check_logits(batch[0])
            cache = self._prefix()
            if cache is None:
                cache = self._new_cache()
            self._append_prefix(cache, prefix_kv)

            # head text after the prompt, up to the first field: once, batch 1, with grad
            head_h = None
            if n_shared > n_prefix + L:
                ids = torch.tensor([enc.head_ids[n_prefix + L:]], device=dev)  # (1, H_text)
                head_h = self._forward(embed(ids), torch.arange(n_prefix + L, n_shared, device=dev)[None], cache=cache)

            lens = self.suffix_lens(batch)
            T = max(lens)
            suffix_h = None
            if T > 0:
                ids, mask, _ = self._suffix_tensors(batch, lens, T)
                expand_batch(cache, B)
                positions = torch.arange(n_shared, n_shared + T, device=dev)[None]
                suffix_h = self._forward(embed(ids), positions, attention_mask=mask, cache=cache)  # (B, T, d)
            hidden, labels = self._target_rows(batch, head_h, suffix_h)  # (R, d), (R,)
            logits = self.logit_transform(self.lm_head(hidden))  # (R, V)
        ce_sum = F.cross_entropy(logits.float(), labels, reduction="sum")
        return ce_sum, target_count(batch)
