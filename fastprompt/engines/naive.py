"""The reference engine: the post's notebook loop, exactly.

Whole right-padded sequences run through the model; logits are computed at every position; the loss is
the masked token-mean cross-entropy over the target tokens. fp32, or the post's bf16 autocast. Every fast
engine is tested against this one.

    embeds    the Hugging Face model's own forward with ``inputs_embeds``, the prompt written over its slot
              (the post's loop; any causal LM)
    layer_kv  every layer's K/V overwritten at the slot by the given ones (prefix-tuning), wherever the slot
              stands: ``gpt2_reference_forward`` for the GPT-2 family (GPT-2's forward written out,
              nanoGPT-style, over the model's weights); for every other model ``slot_kv_forward``, the
              model's own forward with a cache whose ``update`` writes the given K/V over the slot's (the
              K/V a layer hands its cache: after q/k norm and RoPE, docs/ARCHITECTURE.md, 'Prefix K/V on
              rotary models').
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..kvcache import cache_kwarg, new_cache
from ..models import eval_mode, is_gpt2_family
from ..template import Encoded
from ..sharding import gathered
from .base import Engine, as_inputs, target_count


def gpt2_reference_forward(model, embeds, position_ids, key_mask, slot=None, layer_kv=None, capture=False):
    """GPT-2's forward over ``embeds`` (B, T, d) token embeddings, returning the final hidden state
    (B, T, d) (after ``ln_f``), or with ``capture`` also each layer's ``(k, v)`` (B, H, T, hd).

    ``position_ids`` (B, T); ``key_mask`` (B, T) bool, the real rows; ``slot`` (B, T) long, the prompt row
    a position holds or -1; ``layer_kv`` (n_layer, 2, L, H, hd): written over K/V where ``slot >= 0``.
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
        with gathered(model, block):  # --shard-weights: the block's parameters whole while it runs
            h = block.ln_1(x)
            q, k, v = block.attn.c_attn(h).split(d, dim=-1)
            q, k, v = (t.view(B, T, H, hd) for t in (q, k, v))  # (B, T, H, hd)
            if layer_kv is not None:
                rows = slot.clamp(min=0)
                k = torch.where(in_slot, layer_kv[layer, 0].to(k.dtype)[rows], k)
                v = torch.where(in_slot, layer_kv[layer, 1].to(v.dtype)[rows], v)
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


def slot_kv_forward(model, embeds, attention_mask, slot, layer_kv=None, capture=None, position_ids=None):
    """The model's own forward over ``embeds`` (B, T, d) -> logits (B, T, V), with every layer's keys and values
    at the slot written over by ``layer_kv`` (n_layer, 2, L, Hkv, hd) where given.

    The forward runs with a fresh (empty) KV cache whose ``update`` is wrapped: each layer hands it its K/V
    ``(B, Hkv, T, hd)``, after q/k norm and RoPE, and attends to what it returns; the wrapper returns them
    with the slot's rows (``slot`` (B, T): the prompt row a position holds, or -1) replaced. Masks (causal,
    padding, sliding windows), norms, soft-capping: all the model's own. ``capture`` (a list) receives each
    layer's (K, V) as returned (for ``PrefixMethod.init``: the K/V a soft prompt produces at the slot).
    ``position_ids`` (B, T) for left-padded rows (decoding); by default ``0 .. T - 1``."""
    cache = new_cache(model.config)
    update = cache.update
    in_slot = (slot >= 0)[:, None, :, None]  # (B, 1, T, 1)
    rows = slot.clamp(min=0)

    def update_at_slot(key, value, layer_idx, *args, **kwargs):
        if layer_kv is not None:
            key = torch.where(in_slot, layer_kv[layer_idx, 0].to(key.dtype)[rows].transpose(1, 2), key)
            value = torch.where(in_slot, layer_kv[layer_idx, 1].to(value.dtype)[rows].transpose(1, 2), value)
        if capture is not None:
            capture.append((key, value))
        update(key, value, layer_idx, *args, **kwargs)  # the cache's bookkeeping; the layer reads our K/V
        return key, value

    cache.update = update_at_slot
    extra = {} if position_ids is None else {"position_ids": position_ids}
    return model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=True,
                 **{cache_kwarg(model): cache}, **extra).logits


def layer_kv_logits(model, ids, attention_mask, slot, layer_kv, position_ids=None):
    """Logits (B, T, V) of token ``ids`` with ``layer_kv`` at the slot: the reference forward of prefix-tuning
    for any model (GPT-2 family: ``gpt2_reference_forward``; else ``slot_kv_forward``)."""
    if is_gpt2_family(model):
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        hidden = gpt2_reference_forward(model, model.transformer.wte(ids), position_ids, attention_mask.bool(), slot,
                                        layer_kv)
        return model.lm_head(hidden)
    embeds = model.get_input_embeddings()(ids)
    return slot_kv_forward(model, embeds, attention_mask.long(), slot, layer_kv, position_ids=position_ids)


class NaiveEngine(Engine):
    name = "naive"

    def __init__(self, model, encoder, precision="fp32"):
        if precision not in ("fp32", "autocast"):
            raise ConfigError("the naive engine runs the post's loop: precision fp32 or autocast (bf16 is for the generic and fused engines)")
        super().__init__(model, encoder, precision)
        self.pad_id = 0

    def batch_tensors(self, batch: Sequence[Encoded]):
        """``ids``, ``attention_mask``, ``labels`` (-100 off target) and ``slot`` (prompt row or -1): (B, T)."""
        B, T = len(batch), max(len(e.ids) for e in batch)
        L = self.encoder.prompt_len
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        slot = torch.full((B, T), -1, dtype=torch.long)
        for b, e in enumerate(batch):
            n = len(e.ids)
            ids[b, :n] = torch.tensor(e.ids)
            mask[b, :n] = 1
            labels[b, e.target_start - 1 : n - 1] = ids[b, e.target_start : n]  # logits at t predict t + 1
            slot[b, e.prompt_start : e.prompt_start + L] = torch.arange(L)
        return [t.to(self.device, non_blocking=True) for t in (ids, mask, labels, slot)]

    def loss_terms(self, inputs, batch):
        inputs = as_inputs(inputs)
        ids, mask, labels, slot = self.batch_tensors(batch)
        if inputs.layer_kv is not None:
            logits = self._layer_kv_logits(inputs.layer_kv, ids, mask, slot)
        else:
            embeds = self.model.get_input_embeddings()(ids)  # (B, T, d)
            in_prompt = (slot >= 0).unsqueeze(-1)
            embeds = torch.where(in_prompt, inputs.embeds.to(embeds.dtype)[slot.clamp(min=0)], embeds)
            with eval_mode(self.model), self.autocast():
                logits = self.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        # fp32 CE (bf16 logits under autocast upcast), fp64 for a float64 model: a float64 reference stays float64
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        return ce_sum, target_count(batch)

    def _layer_kv_logits(self, layer_kv, ids, mask, slot):
        with eval_mode(self.model), self.autocast():
            return layer_kv_logits(self.model, ids, mask, slot, layer_kv)  # (B, T, V)
