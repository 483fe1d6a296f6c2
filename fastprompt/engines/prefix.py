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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import eval_mode
from .base import target_count
from ..kvcache import expand_batch
from .generic import GenericEngine


class PrefixEngine(GenericEngine):
    name = "prefix"

    def __init__(self, model, encoder, precision: str = "fp32"):
        # the padded suffix layout (its loss_terms below runs _suffix_tensors / expand_batch itself)
        super().__init__(model, encoder, precision, layout="padded")
        self.fallback = None
        if encoder.prompt_start is None:
            from ..prefix import NaivePrefixEngine

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
