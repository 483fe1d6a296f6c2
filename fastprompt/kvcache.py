"""Hugging Face KV caches, as the engines and greedy decoding use them (one place for the cache API).

A ``DynamicCache(config=...)`` is built from the model's config and passed under the name the module's
``forward`` takes (``past_key_values`` up to transformers ~5.17, ``cache`` after the rename: read from its
signature). A batch-1 cache (the constant context, computed once) serves a batch of B examples through
``expand_batch``: a view of each ``DynamicLayer``'s keys/values, no copy (other layer kinds use their own
copying ``batch_repeat_interleave``). Copy a shared cache with ``copy.deepcopy`` before extending it: that
keeps the sliding-window bookkeeping. Checked against transformers 5.17 and 5.24.
"""
from __future__ import annotations

import inspect

import torch

from .errors import ConfigError


def new_cache(config):
    from transformers import DynamicCache

    return DynamicCache(config=config)


def cache_kwarg(module) -> str:
    """The name ``module.forward`` takes its KV cache under (renamed past_key_values -> cache in 5.x)."""
    params = inspect.signature(module.forward).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise ConfigError(f"{type(module).__name__}.forward takes no KV cache; use engine='naive'")


def append_layer_kv(cache, layer_kv: torch.Tensor, dtype: torch.dtype) -> None:
    """Append ``layer_kv`` (n_layer, 2, L, H, hd), prefix-tuning's K/V at the slot, to every layer of a batch-1
    cache as ``(1, H, L, hd)`` keys and values in ``dtype`` (with grad where ``layer_kv`` has one)."""
    kv = layer_kv.to(dtype)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None], layer)


def expand_batch(cache, B: int) -> None:
    """Make a batch-1 cache serve B examples: a view (``expand``) of each dynamic layer's K/V, no copy."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(isinstance(layer, DynamicLayer) for layer in layers):
        cache.batch_repeat_interleave(B)  # other layer kinds: their own (copying) batch expansion
        return
    for layer in layers:
        if torch.is_tensor(layer.keys) and layer.keys.dim() == 4:  # (1, heads, S, head_dim)
            layer.keys = layer.keys.expand(B, -1, -1, -1)
            layer.values = layer.values.expand(B, -1, -1, -1)
