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

These torch ops are the only torch implementation of each op: the CPU path, and the reference the kernels
are tested and benchmarked against (on fp64 inputs they compute in fp64: the tests' ground truth).

Tree attention: query rows ``(Nq, H, D)`` and key/value rows ``(Nk, H, D)`` with ``Nk >= Nq``; query row ``r``
is key row ``r + (Nk - Nq)``: the first ``Nk - Nq`` key rows are the constant context, keys without queries.
The mask (``n_trunk``, ``cu_seqlens``) is ``engines/tree.py``'s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .tree import segment_bounds, tree_mask

KERNELS = ("auto", "torch", "triton", "cuda")
OP_NAMES = ("add_layer_norm", "linear", "bias_gelu", "tree_attention", "lm_head_ce")
# Ops of the other families (RMSNorm, RoPE, gated MLPs, sliding windows, soft-capped logits): torch only so
# far; every kernels choice takes these from here where fastprompt.kernels has no function of the name.
FAMILY_OP_NAMES = ("add_rms_norm", "rotary", "gated_act", "window_attention", "lm_head_ce_softcap")
ALL_OP_NAMES = OP_NAMES + FAMILY_OP_NAMES


# ------------------------------------------------------------------------------------------ torch ops
def add_layer_norm(x, residual, weight, bias, eps=1e-5):
    """(y, h): h = x + residual (h = x when residual is None), y = LayerNorm(h) * weight + bias."""
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight.detach().to(h.dtype), bias.detach().to(h.dtype), eps)
    return y, h


def linear(x, weight, bias=None):
    """x @ weight + bias with GPT-2's Conv1D layout: weight (in, out). x: (..., in) -> (..., out)."""
    w = weight.detach()
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    y = x2 @ w if bias is None else torch.addmm(bias.detach(), x2, w)  # as HF's Conv1D computes it
    return y.view(*x.shape[:-1], w.shape[1])


def bias_gelu(x, bias):
    """gelu_tanh(x + bias) (GPT-2's gelu_new)."""
    return F.gelu(x + bias.detach(), approximate="tanh")


def add_rms_norm(x, residual, weight, eps=1e-6, offset=0.0):
    """(y, h): h = x + residual (h = x when residual is None), y = h / rms(h) * (offset + weight) over the last
    dimension, in fp32 (fp64 for fp64 h), cast once to h's dtype. ``offset`` 1: Gemma's ``1 + w``. The weight
    is frozen: the backward forms dX only (no dW), in closed form (``_RMSNorm``)."""
    h = x if residual is None else x + residual
    return _RMSNorm.apply(h, weight.detach(), float(eps), float(offset)), h


class _RMSNorm(torch.autograd.Function):
    """y = h * r * s with r = (mean(h^2) + eps)^-1/2, s = offset + w (frozen). Backward, g = dy * s:
    dh = r * (g - h * r^2 * mean(g * h)). One saved (rows, n) tensor and ~5 ops each way instead of autograd's
    ~12 through pow/mean/rsqrt/mul (the CPU step of a 30-layer model runs ~60 of these a pass)."""

    @staticmethod
    def forward(ctx, h, weight, eps, offset):
        dtype = torch.promote_types(h.dtype, torch.float32)
        hf = h.to(dtype)
        r = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
        scale = weight.to(dtype)
        if offset:
            scale = scale + offset
        ctx.save_for_backward(hf, r, scale)
        ctx.h_dtype = h.dtype
        return (hf * r * scale).to(h.dtype)

    @staticmethod
    def backward(ctx, dy):
        hf, r, scale = ctx.saved_tensors
        g = dy.to(hf.dtype) * scale
        dh = (g - hf * ((g * hf).mean(-1, keepdim=True) * r * r)) * r
        return dh.to(ctx.h_dtype), None, None, None


def rotary(x, cos, sin):
    """RoPE on ``x`` (rows, heads, D) with ``cos``/``sin`` (rows, D) (the halves repeated, as HF builds them):
    x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotary_tables(positions, inv_freq, scaling=1.0):
    """(cos, sin), each (rows, D) fp32, at ``positions`` (rows,): angles ``position * inv_freq`` as HF's
    rotary modules compute them (fp32), both halves the same, times ``scaling``."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(device=positions.device, dtype=torch.float32)[None]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def gated_act(gate_up, activation="silu"):
    """act(gate) * up for ``gate_up = [gate | up]`` (rows, 2I) -> (rows, I): SwiGLU (silu), GeGLU (gelu_tanh)."""
    gate, up = gate_up.chunk(2, dim=-1)
    a = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return a * up


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
    return _grouped_attention(q, k, v, tree_mask_bias(n_queries, n_keys, int(n_trunk), cu_seqlens, group), scale)


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
        qg = q.to(dtype).reshape(n_queries, G, group, D).permute(1, 2, 0, 3).reshape(G, group * n_queries, D)
        scores = torch.baddbmm(bias.to(dtype), qg, k.to(dtype).permute(1, 2, 0), alpha=scale)  # (G, group Nq, Nk)
        out = torch.bmm(torch.softmax(scores, dim=-1), v.to(dtype).transpose(0, 1))  # (G, group Nq, D)
    out = out.view(G, group, n_queries, D).permute(2, 0, 1, 3).reshape(n_queries, H, D)
    return out.to(q.dtype)


def window_attention(q, k, v, n_trunk, cu_seqlens, scale, window, key_positions):
    """``tree_attention`` restricted to a sliding window: a query at position p also needs its key's position
    > p - window (HF's sliding layers: ``q_pos - k_pos < window``). ``key_positions`` (Nk,) long, the
    position of every key row (layout.PackedBatch.key_positions). Same shapes and dtypes as tree_attention."""
    n_queries, n_keys = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
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


VOCAB_CHUNK = 2048  # vocabulary rows per chunk of the one-pass LM head (a chunk of W stays in cache)


class _LMHeadCE(torch.autograd.Function):
    """loss_r = logsumexp_v(z_rv) - z_r,y_r with z = h W^T (fp32 logits, fp64 for fp64 h; h: (rows, d), W: (V, d)
    frozen).

    One streaming pass over the vocabulary in chunks of ``VOCAB_CHUNK`` rows of W, online softmax (running
    max ``m``, running sum ``s``): each chunk's logits ``z_c = h W_c^T`` are used at once, while W_c is in
    cache, for the loss *and* for the gradient's reduction ``sum_v e_v W_v`` (``e = exp(z - m)``). The
    gradient ``dh = g (softmax(z) - onehot(y)) W`` is thus ready after the forward (``G`` below) and the
    backward only scales it by the upstream ``g``: W is read once per step instead of twice, and the
    (rows, V) logits are never stored.

    Accuracy (few rows: one per target token): the reduction is split into chunks (a GEMM or GEMV over
    ``VOCAB_CHUNK`` terms each, summed in a second level), never one 50k-term fp32 accumulator (~6e-6
    relative error). The target's own term is left out of the sums (``e'``, ``s' = sum_{v != y} e_v``) so
    that ``G = (sum_{v != y} e_v W_v - s' W_y) / s`` has no ``p_y - 1`` cancellation when the model is
    confident.
    """

    @staticmethod
    def forward(ctx, h, weight, targets):
        rows, V = h.shape[0], weight.shape[0]
        want_grad = ctx.needs_input_grad[0]
        w_dtype = weight.dtype
        kw = dict(device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))  # fp32 (fp64 for fp64 h)
        m = torch.full((rows,), float("-inf"), **kw)  # running max of the logits
        s_other = torch.zeros(rows, **kw)  # running sum of exp(z - m) over v != y
        acc = torch.zeros(rows, h.shape[1], **kw) if want_grad else None  # sum_{v != y} e_v W_v
        n_chunks = -(-V // VOCAB_CHUNK)
        chunk_of = torch.div(targets, VOCAB_CHUNK, rounding_mode="floor")
        local = (targets - chunk_of * VOCAB_CHUNK)[:, None]  # (rows, 1): the target's column in its chunk
        hit = torch.nn.functional.one_hot(chunk_of, n_chunks).to(kw["dtype"])  # (rows, n_chunks)
        keep = 1.0 - hit
        z_y = torch.zeros(rows, 1, **kw)  # the target's logit, from the same product as the rest
        for c in range(n_chunks):
            start = c * VOCAB_CHUNK
            w = weight[start : start + VOCAB_CHUNK]  # (C, d): read from memory once, used twice from cache
            z = (h @ w.to(h.dtype).t()).to(kw["dtype"])  # (rows, C)
            col = local if w.shape[0] == VOCAB_CHUNK else local.clamp(max=w.shape[0] - 1)
            z_y.addcmul_(z.gather(1, col), hit[:, c : c + 1])
            m_new = torch.maximum(m, z.amax(dim=1))
            rescale = torch.exp(m - m_new)  # 0 on the first chunk (m = -inf)
            e = z.sub_(m_new[:, None]).exp_()  # (rows, C) in (0, 1]
            e.scatter_(1, col, e.gather(1, col).mul_(keep[:, c : c + 1]))  # leave the target's term out
            s_other = s_other.mul_(rescale).add_(e.sum(dim=1))
            if want_grad:
                acc = acc.mul_(rescale[:, None]).addmm_(e.to(w_dtype), w) if w_dtype == acc.dtype \
                    else acc.mul_(rescale[:, None]).add_((e.to(w_dtype) @ w).to(acc.dtype))
            m = m_new
        z_y = z_y[:, 0]
        s = s_other + torch.exp(z_y - m)  # sum of exp(z - m) over the whole vocabulary
        loss = (m - z_y) + torch.log(s)
        if want_grad:
            w_y = weight[targets].to(acc.dtype)  # (rows, d)
            grad = (acc - s_other[:, None] * w_y) / s[:, None]  # d loss_r / d h_r
            ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return (grad * dloss[:, None].to(grad.dtype)).to(ctx.h_dtype), None, None


def lm_head_ce(h, weight, targets):
    """Per-row cross-entropy of ``h @ weight^T`` against ``targets``, fp32 (fp64 for fp64 h). h: (rows, d) —
    only the rows that predict a target; weight: (V, d) frozen; targets: (rows,) -> (rows,)."""
    loss = _LMHeadCE.apply(h.reshape(-1, h.shape[-1]), weight.detach(), targets.reshape(-1))
    return loss.view(targets.shape)


class _LMHeadCESoftcap(torch.autograd.Function):
    """loss_r = logsumexp_v(c_rv) - c_r,y_r with soft-capped logits c = cap * tanh(h W^T / cap) (Gemma).

    The same one pass over the vocabulary as ``_LMHeadCE`` (chunks of W, online softmax, the gradient formed
    in forward); the cap's derivative enters the reduction: dc/dz = 1 - t^2 (t = tanh(z / cap)), so

        d loss_r / d h_r = sum_v (p_v - [v = y]) (1 - t_v^2) W_v
                         = (sum_{v != y} e_v (1 - t_v^2) W_v  -  s' (1 - t_y^2) W_y) / s

    (e = exp(c - m), s' = sum_{v != y} e_v, s = s' + e_y): no ``p_y - 1`` cancellation, as there."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap):
        rows, V = h.shape[0], weight.shape[0]
        want_grad = ctx.needs_input_grad[0]
        kw = dict(device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
        m = torch.full((rows,), float("-inf"), **kw)
        s_other = torch.zeros(rows, **kw)
        acc = torch.zeros(rows, h.shape[1], **kw) if want_grad else None
        arange = torch.arange(rows, device=h.device)
        c_y = torch.zeros(rows, **kw)
        for start in range(0, V, VOCAB_CHUNK):
            w = weight[start : start + VOCAB_CHUNK]  # (C, d)
            t = torch.tanh((h @ w.to(h.dtype).t()).to(kw["dtype"]) / cap)  # (rows, C)
            c = t * cap
            inside = (targets >= start) & (targets < start + w.shape[0])
            col = (targets - start).clamp(0, w.shape[0] - 1)
            c_y = torch.where(inside, c[arange, col], c_y)
            m_new = torch.maximum(m, c.amax(dim=1))
            rescale = torch.exp(m - m_new)
            e = (c - m_new[:, None]).exp()
            e[arange, col] = torch.where(inside, 0.0, e[arange, col])  # leave the target's term out
            s_other = s_other * rescale + e.sum(dim=1)
            if want_grad:
                acc = acc * rescale[:, None] + (e * (1 - t * t)) @ w.to(kw["dtype"])
            m = m_new
        s = s_other + torch.exp(c_y - m)
        loss = (m - c_y) + torch.log(s)
        if want_grad:
            t_y = c_y / cap
            w_y = weight[targets].to(kw["dtype"])
            grad = (acc - (s_other * (1 - t_y * t_y))[:, None] * w_y) / s[:, None]
            ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        (grad,) = ctx.saved_tensors
        return (grad * dloss[:, None].to(grad.dtype)).to(ctx.h_dtype), None, None, None


def lm_head_ce_softcap(h, weight, targets, cap):
    """``lm_head_ce`` on soft-capped logits ``cap * tanh(h @ weight^T / cap)`` (rows,) fp32."""
    loss = _LMHeadCESoftcap.apply(h.reshape(-1, h.shape[-1]), weight.detach(), targets.reshape(-1), float(cap))
    return loss.view(targets.shape)


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
