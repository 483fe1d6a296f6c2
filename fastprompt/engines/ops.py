"""The five ops of the fused engine, in plain torch, and the registry that picks an implementation.

The fused engine calls its ops only through an ``Ops`` object, so the Triton kernels (``fastprompt.kernels``,
``add_layer_norm`` also from the CUDA extension ``fastprompt.kernels._C``) plug in behind the same signatures:

    add_layer_norm(x, residual, weight, bias, eps) -> (y, h)   h = x + residual (or x); y = LN(h)
    linear(x, weight, bias=None)                               x @ weight + bias; weight (in, out) (Conv1D)
    bias_gelu(x, bias)                                         gelu_tanh(x + bias)
    tree_attention(q, k, v, n_trunk, cu_seqlens, scale=None)   attention over a packed tree (shared trunk, one branch per example)
    lm_head_ce(h, weight, targets) -> (rows,) fp32             CE of h @ weight^T (weight (V, d)) vs targets

Every weight is frozen: the torch versions read ``.detach()``ed views, so autograd records only the
input-gradient path (``dX = dY @ W^T``; no ``dW``, no ``dgamma``/``dbeta``, no bias reduction), whatever
the caller's parameters' ``requires_grad`` says.

Each op's torch implementation (``<op>_ref``: the CPU path, and the reference the kernels are tested and
benchmarked against; on fp64 inputs it computes in fp64, the tests' ground truth) lives in the op's own file
``fastprompt/kernels/<op>.py`` beside its Triton kernel; this module re-exports them under the ops' names (a façade:
callers never name the files) and holds the registry. The torch attention (tree and sliding window, GQA without
repeating K/V heads) stays here, beside the mask it builds (engines/tree.py's rule, cached on the CPU).

Tree attention: query rows ``(Nq, H, D)`` and key/value rows ``(Nk, Hkv, D)`` (Hkv divides H) with ``Nk >= Nq``; query row ``r``
is key row ``r + (Nk - Nq)``: the first ``Nk - Nq`` key rows are the constant context, keys without queries.
The mask (``n_trunk``, ``cu_seqlens``) is ``engines/tree.py``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import ConfigError
# Each op's torch reference lives in its own file, beside its Triton kernel (fastprompt/kernels/<op>.py; importing those
# never needs Triton): the names here are the façade the engines, families, tests and benchmarks call.
from ..kernels.bias_gelu import bias_gelu_ref as bias_gelu
from ..kernels.gated_act import gated_act_ref as gated_act
from ..kernels.layer_norm import add_layer_norm_ref as add_layer_norm
from ..kernels.linear import linear_ref as linear
from ..kernels.lm_head_ce import VOCAB_CHUNK, lm_head_ce_ref as lm_head_ce, lm_head_ce_softcap_ref as lm_head_ce_softcap  # noqa: F401
from ..kernels.rms_norm import add_rms_norm_ref as add_rms_norm
from ..kernels.rotary import rotary_ref as rotary, rotary_tables  # noqa: F401
from .tree import segment_bounds, tree_mask

KERNELS = ("auto", "torch", "triton", "cuda")
OP_NAMES = ("add_layer_norm", "linear", "bias_gelu", "tree_attention", "lm_head_ce")
# Ops of the other families (RMSNorm, RoPE, gated MLPs, sliding windows, soft-capped logits): torch only so
# far; every kernels choice takes these from here where fastprompt.kernels has no function of the name.
FAMILY_OP_NAMES = ("add_rms_norm", "rotary", "gated_act", "window_attention", "lm_head_ce_softcap")
ALL_OP_NAMES = OP_NAMES + FAMILY_OP_NAMES


# ------------------------------------------------------------------------------------------ torch ops
# The last CPU masks, newest last: (tensors the mask was built from, their _versions, sizes, additive mask).
# Several, since a step of K prompts (loss_terms_many) asks for one mask per prompt at every layer.
_MASK_CACHE: list = []
_WINDOW_CACHE: list = []
MASK_CACHE_SIZE = 16


def _cached_mask(cache: list, tensors: tuple, key: tuple, build):
    """The mask built from ``tensors`` (same objects, unmodified: ``_version``) at sizes ``key``, from
    ``cache`` or built now by ``build()`` and kept (the oldest dropped past ``MASK_CACHE_SIZE``)."""
    versions = tuple(t._version for t in tensors)
    for held, held_versions, held_key, mask in cache:
        if held_key == key and held_versions == versions and all(a is b for a, b in zip(held, tensors)):
            return mask
    mask = build()
    cache.append((tensors, versions, key, mask))
    del cache[:-MASK_CACHE_SIZE]
    return mask


def tree_mask_bias(n_queries: int, n_keys: int, n_trunk: int, cu_seqlens: torch.Tensor, group: int = 1) -> torch.Tensor:
    """The tree mask as an additive fp32 bias (0 = may attend, -inf = masked), (group Nq, Nk): repeated once
    per query head that shares a K/V head (``group``; see ``_grouped_attention``).

    Every layer of a step asks for the same mask with the same ``cu_seqlens`` tensor: the last few are kept
    (``_cached_mask``) and returned while that tensor (same object, unmodified: ``_version``) and the sizes
    are the same.
    CPU only (a cached tensor must not outlive a CUDA graph capture)."""
    return _cached_mask(_MASK_CACHE, (cu_seqlens,), (n_queries, n_keys, n_trunk, group),
                        lambda: _additive(tree_mask(n_queries, n_keys, n_trunk, cu_seqlens), group))


def tree_attention(q, k, v, n_trunk, cu_seqlens, scale=None):
    """softmax(q k^T * scale + tree mask) v. q: (Nq, H, D); k, v: (Nk, Hkv, D) with Hkv dividing H (GQA: query
    head j reads K/V head j // (H / Hkv), as HF's repeat_kv) -> (Nq, H, D) in q's dtype.

    On CPU: explicit fp32 math (fp64 for fp64 inputs), the K/V heads never repeated: the query heads that
    share a K/V head stacked as rows of one batched GEMM per K/V head with the cached additive mask as its
    initial value (``baddbmm``), softmax, one batched GEMM. On CUDA: ``scaled_dot_product_attention`` with
    the boolean mask (memory-efficient backend), in the inputs' dtype.
    """
    n_queries, n_keys = q.shape[0], k.shape[0]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if q.is_cuda:
        return _sdpa(q, k, v, tree_mask(n_queries, n_keys, int(n_trunk), cu_seqlens), scale)
    group = q.shape[1] // k.shape[1]
    if n_queries * n_keys >= SEGMENTED_MIN_SCORES:
        return _segmented_attention(q, k, v, int(n_trunk), cu_seqlens, scale)
    return _grouped_attention(q, k, v, tree_mask_bias(n_queries, n_keys, int(n_trunk), cu_seqlens, group), scale)


# From this many (query, key) pairs a block the CPU tree attention runs per segment (``_segmented_attention``:
# work in Nq x (trunk + longest segment)) instead of over the dense mask (Nq x Nk, almost all of it masked
# once a block holds many examples); below it the dense form's two GEMMs are cheaper than the gathers.
# Measured at SmolLM2's heads (9, GQA 3, D 64; forward + backward, AMD EPYC, 2 cores): 32 examples (146 x 149)
# dense 2.0 ms, segmented 2.8; 64 (268 x 271) 6.6 against 3.3; 256 (1143 x 1146) 163 against 14 ms.
SEGMENTED_MIN_SCORES = 48 * 1024
_SEGMENT_CACHE: list = []


def _segment_layout(n_queries: int, n_keys: int, n_trunk: int, cu_seqlens: torch.Tensor, group: int, n_kv: int):
    """What ``_segmented_attention`` needs of a block's tree (cached per ``cu_seqlens``, as the masks): the
    non-empty segments padded to the longest (S of them, T slots each), ``keys`` (S T,) their key rows (a
    padding slot repeats the segment's first row), ``queries`` (S T,) the same as query rows, ``valid`` (S T,)
    the real slots, ``own`` (G S, group T, T) the additive causal bias
    within a segment, ``trunk_bias`` (group tq, n_trunk) the trunk queries' causal bias (None without any)."""
    def build():
        cu = cu_seqlens.to(torch.long).tolist()
        starts = [a for a, b in zip(cu[:-1], cu[1:]) if b > a]
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:]) if b > a]
        T = max(lengths, default=0)
        device = cu_seqlens.device
        slot = torch.arange(T, device=device)
        length = torch.tensor(lengths, dtype=torch.long, device=device)
        valid = slot[None, :] < length[:, None]  # (S, T)
        index = torch.tensor(starts, dtype=torch.long, device=device)[:, None] + torch.where(valid, slot[None, :], 0)
        allowed = (slot[None, :] <= slot[:, None])[None] & valid[:, None, :]  # (S, T query, T key)
        own = torch.zeros(allowed.shape, dtype=torch.float32, device=device).masked_fill_(~allowed, float("-inf"))
        own = own[None, :, None].expand(n_kv, -1, group, -1, -1).reshape(n_kv * len(lengths), group * T, T)
        first = n_keys - n_queries  # the key row of query row 0
        tq = max(n_trunk - first, 0)  # queries in the trunk: causal over the trunk alone
        trunk_bias = None
        if tq:
            keys = torch.arange(n_trunk, device=device)
            trunk_bias = _additive(keys[None, :] <= (first + torch.arange(tq, device=device))[:, None], group)
        keys_index = index.reshape(-1)
        return len(lengths), T, keys_index, keys_index - first, valid.reshape(-1), own, trunk_bias

    return _cached_mask(_SEGMENT_CACHE, (cu_seqlens,), ("segments", n_queries, n_keys, n_trunk, group, n_kv), build)


def _segmented_attention(q, k, v, n_trunk: int, cu_seqlens, scale):
    """The CPU tree attention computed per segment, exactly the dense form's softmax over the same keys: a
    query in a segment attends to every trunk key and causally to its own segment's keys, so its scores are
    the trunk's (one GEMM per K/V head over all segments' queries) beside its segment's (one small batched
    GEMM per segment and K/V head), softmaxed together; the trunk's queries attend causally to the trunk.
    Query rows ``[tq, Nq)`` are the segments' key rows in order (``cu[0] = n_trunk``, ``cu[-1] = Nk``)."""
    n_queries, H, D = q.shape
    n_keys, G = k.shape[0], k.shape[1]
    group, out_dtype = H // G, q.dtype
    S, T, keys, queries, valid, own, trunk_bias = _segment_layout(n_queries, n_keys, n_trunk, cu_seqlens, group, G)
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        outs = []
        if trunk_bias is not None:  # the trunk's own queries (e.g. the prompt's rows): dense and small
            tq = trunk_bias.shape[0] // group
            outs.append(_grouped_attention(q[:tq], k[:n_trunk], v[:n_trunk], trunk_bias.to(dtype), scale))
        if S:
            # (G S, group T, D): segment s's padded queries, the query heads of K/V head g stacked
            qs = q.index_select(0, queries).view(S, T, G, group, D).permute(2, 0, 3, 1, 4).reshape(G * S, group * T, D)
            ks = k.index_select(0, keys).view(S, T, G, D).permute(2, 0, 1, 3).reshape(G * S, T, D)
            vs = v.index_select(0, keys).view(S, T, G, D).permute(2, 0, 1, 3).reshape(G * S, T, D)
            k_trunk, v_trunk = k[:n_trunk].transpose(0, 1), v[:n_trunk].transpose(0, 1)  # (G, n_trunk, D)
            s_trunk = torch.bmm(qs.view(G, S * group * T, D), k_trunk.transpose(1, 2)).mul_(scale)
            s_own = torch.baddbmm(own.to(dtype), qs, ks.transpose(1, 2), alpha=scale)  # (G S, group T, T)
            p = torch.softmax(torch.cat([s_trunk.view(G * S, group * T, n_trunk), s_own], dim=-1), dim=-1)
            out = torch.bmm(p[..., n_trunk:], vs)  # (G S, group T, D)
            if n_trunk:
                p_trunk = p[..., :n_trunk].reshape(G, S * group * T, n_trunk)
                out = out + torch.bmm(p_trunk, v_trunk).view(G * S, group * T, D)
            out = out.view(G, S, group, T, D).permute(1, 3, 0, 2, 4).reshape(S * T, H, D)
            outs.append(out[valid])
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.to(out_dtype)


def repeat_kv(q, k, v):
    """K/V with as many heads as q (``repeat_interleave``), for kernels that take equal head counts."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _sdpa(q, k, v, mask, scale):
    k, v = repeat_kv(q, k.to(q.dtype), v.to(q.dtype))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale)  # (1, H, Nq, D)
    return out[0].transpose(0, 1)  # (Nq, H, D)


def _grouped_attention(q, k, v, bias, scale):
    """CPU attention with an additive ``bias`` ((group Nq, Nk): the mask repeated once per query head of a
    group), K/V heads shared by ``group = H / Hkv`` query heads, fp32 math (fp64 for fp64 inputs)."""
    n_queries, H, D = q.shape
    G = k.shape[1]
    group = H // G
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        if group == 1:  # a strided view, no copy
            qg = q.to(dtype).transpose(0, 1)  # (H, Nq, D)
        else:
            qg = q.to(dtype).reshape(n_queries, G, group, D).permute(1, 2, 0, 3).reshape(G, group * n_queries, D)
        scores = torch.baddbmm(bias.to(dtype), qg, k.to(dtype).permute(1, 2, 0), alpha=scale)  # (G, group Nq, Nk)
        out = torch.bmm(torch.softmax(scores, dim=-1), v.to(dtype).transpose(0, 1))  # (G, group Nq, D)
    if group == 1:
        return out.transpose(0, 1).to(q.dtype)  # (Nq, H, D)
    out = out.view(G, group, n_queries, D).permute(2, 0, 1, 3).reshape(n_queries, H, D)
    return out.to(q.dtype)


def window_attention(q, k, v, n_trunk, cu_seqlens, scale, window, key_positions):
    """``tree_attention`` restricted to a sliding window: a query at position p also needs its key's position
    > p - window (HF's sliding layers: ``q_pos - k_pos < window``). ``key_positions`` (Nk,) long, the
    position of every key row (layout.PackedBatch.key_positions). Same shapes and dtypes as tree_attention."""
    n_queries, n_keys = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    if not q.is_cuda and int(key_positions.max() - key_positions.min()) < window:
        # the window reaches past every key of the block (Gemma 3's 512 over prompts of a few dozen tokens):
        # the tree attention itself, per segment where the block is large (a host read: CPU only)
        return tree_attention(q, k, v, n_trunk, cu_seqlens, scale)
    key = (n_queries, n_keys, int(n_trunk), int(window), group)

    def build():
        mask = tree_mask(n_queries, n_keys, int(n_trunk), cu_seqlens)  # (Nq, Nk)
        q_pos = key_positions[n_keys - n_queries:]
        mask = mask & ((q_pos[:, None] - key_positions[None, :]) < window)
        return mask if q.is_cuda else _additive(mask, group)  # CPU: the additive bias, once per query head of a group

    if q.is_cuda:  # never cached: a cached tensor must not outlive a CUDA graph capture
        return _sdpa(q, k, v, build(), scale)
    mask = _cached_mask(_WINDOW_CACHE, (cu_seqlens, key_positions), key, build)
    return _grouped_attention(q, k, v, mask, scale)


def _additive(mask: torch.Tensor, group: int = 1) -> torch.Tensor:
    """A bool mask (Nq, Nk) as an fp32 additive bias (0 / -inf), repeated ``group`` times along the rows."""
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias if group == 1 else bias.repeat(group, 1)


# ------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Ops:
    """One implementation of each op; ``sources`` says where each came from (for describe/logs)."""

    add_layer_norm: object
    linear: object
    bias_gelu: object
    tree_attention: object
    lm_head_ce: object
    add_rms_norm: object = add_rms_norm
    rotary: object = rotary
    gated_act: object = gated_act
    window_attention: object = window_attention
    lm_head_ce_softcap: object = lm_head_ce_softcap
    name: str = "torch"
    sources: dict = field(default_factory=dict, compare=False)


TORCH_OPS = Ops(add_layer_norm, linear, bias_gelu, tree_attention, lm_head_ce, name="torch",
                sources={name: "torch" for name in ALL_OP_NAMES})


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _import(module_name: str, hint: str):
    """The module, or a clear ConfigError where it does not import."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except Exception as e:  # ImportError, or triton/CUDA failing inside the module's own imports
        raise ConfigError(f"kernels unavailable: cannot import {module_name} ({type(e).__name__}: {e}); {hint}") from None


def _import_ops(module_name: str, names, hint: str) -> dict:
    """``{name: function}`` from ``module_name``; a clear ConfigError when the module or a name is missing."""
    module = _import(module_name, hint)
    missing = [n for n in names if not callable(getattr(module, n, None))]
    if missing:
        raise ConfigError(f"kernels unavailable: {module_name} has no {', '.join(missing)}; {hint}")
    return _adapt({n: getattr(module, n) for n in names})


def bounded_tree_attention(kernel):
    """``kernel(q, k, v, n_trunk, seg_start, seg_end, scale)`` (the Triton op, which imports nothing from
    fastprompt) behind the ops' ``tree_attention(q, k, v, n_trunk, cu_seqlens, scale)``: the bounds come
    from tree.py's one rule."""
    def tree_attention(q, k, v, n_trunk, cu_seqlens, scale=None):
        seg_start, seg_end = segment_bounds(k.shape[0], int(n_trunk), cu_seqlens.to(q.device))
        k, v = repeat_kv(q, k, v)  # the kernel takes as many K/V heads as query heads
        return kernel(q, k, v, n_trunk, seg_start, seg_end, scale)

    return tree_attention


def _adapt(chosen: dict) -> dict:
    """The kernels' own signatures brought to the ops' (only tree attention differs)."""
    if "tree_attention" in chosen and chosen["tree_attention"] is not TORCH_OPS.tree_attention:
        chosen["tree_attention"] = bounded_tree_attention(chosen["tree_attention"])
    return chosen


def get_ops(kernels: str = "auto", device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Ops:
    """``_select_ops`` plus the attention backend: flash-attn's varlen kernel replaces ``tree_attention``
    on CUDA in bf16/fp16 when flash-attn is installed (see engines/attention.py), for every kernels
    choice but ``torch``."""
    ops = _select_ops(kernels, device)
    device = torch.device(device) if device is not None else torch.device("cpu")
    if kernels != "torch" and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        from .attention import FLASH_ATTN_AVAILABLE, varlen_tree_attention

        if FLASH_ATTN_AVAILABLE:
            sources = {**ops.sources, "tree_attention": "flash-attn"}
            ops = replace(ops, tree_attention=varlen_tree_attention, sources=sources)
    return ops


def _select_ops(kernels: str = "auto", device: torch.device | str | None = None) -> Ops:
    """The ops for ``kernels`` in ``auto|torch|triton|cuda`` on ``device``.

    ``torch``: the plain-torch ops above. ``triton``: all five from ``fastprompt.kernels``. ``cuda``: the
    Triton ops with ``add_layer_norm`` through the CUDA extension (``kernels.add_layer_norm_cuda``). ``auto``:
    Triton on CUDA devices where triton imports (an op ``fastprompt.kernels`` does not provide yet stays
    torch), torch otherwise.
    """
    if kernels not in KERNELS:
        raise ConfigError(f"unknown kernels {kernels!r}: use one of {', '.join(KERNELS)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if kernels == "torch" or (kernels == "auto" and (device.type != "cuda" or not _triton_available())):
        return TORCH_OPS
    hint = "install triton (pip install triton) on a CUDA machine, or pass kernels='torch'"
    if kernels == "auto":
        chosen, sources = {}, {}
        try:
            import fastprompt.kernels as module
        except Exception:
            return TORCH_OPS
        for name in ALL_OP_NAMES:
            fn = getattr(module, name, None)
            chosen[name] = fn if callable(fn) else getattr(TORCH_OPS, name)
            sources[name] = "triton" if callable(fn) else "torch"
        return Ops(**_adapt(chosen), name="auto", sources=sources)
    chosen = _import_ops("fastprompt.kernels", OP_NAMES, hint)
    sources = {name: "triton" for name in OP_NAMES}
    module = _import("fastprompt.kernels", hint)
    for name in FAMILY_OP_NAMES:  # a kernel where fastprompt.kernels has one, else the torch op
        fn = getattr(module, name, None)
        chosen[name] = fn if callable(fn) else getattr(TORCH_OPS, name)
        sources[name] = "triton" if callable(fn) else "torch"
    if kernels == "cuda":
        cuda_hint = ("build the CUDA extension (pip install -e . with a CUDA torch and nvcc, "
                     "FASTPROMPT_BUILD_CUDA=1), or pass kernels='triton'")
        if not _import("fastprompt.kernels.cuda_ext", cuda_hint).CUDA_EXT_AVAILABLE:
            raise ConfigError(f"kernels='cuda' needs the fastprompt.kernels._C extension, which is not built: {cuda_hint}")
        chosen["add_layer_norm"] = _import("fastprompt.kernels", hint).add_layer_norm_cuda
        sources["add_layer_norm"] = "cuda"
    return Ops(**chosen, name=kernels, sources=sources)
