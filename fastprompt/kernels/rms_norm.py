"""Fused residual-add + RMSNorm with an input-gradient-only backward (Llama, Qwen, Mistral, Gemma's 1 + w).

    h = x + residual            (h = x when residual is None)
    y = h * rstd(h) * (offset + weight),   rstd = 1 / sqrt(mean(h^2) + eps)

One program per row; the whole row (d <= 8192) sits in one block. Rows are the last dimension of any
shape: per-head q/k norms (Qwen3, Gemma 3) are rows of ``head_dim``. weight is frozen: no dW (a cross-row
reduction), so the backward is a per-row map. The torch reference is ``add_rms_norm_ref`` at the end of this file.
"""
from typing import Optional, Tuple

import torch

from ._common import check_float, next_power_of_2, require_triton, tl, triton


@triton.jit
def _add_rms_fwd_kernel(
    X,  # (rows, d) input
    R,  # (rows, d) residual (unused when HAS_RESIDUAL is False)
    W,  # (d,) RMSNorm weight
    Y,  # (rows, d) output y
    H,  # (rows, d) output h = x + residual (unused when HAS_RESIDUAL is False)
    RSTD,  # (rows,) fp32 1/sqrt(mean(h^2) + eps), saved for backward
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    stride_y,  # elements between rows of Y
    stride_h,  # elements between rows of H
    d,  # row length
    eps,  # epsilon inside the square root
    offset,  # the scale is offset + weight (Gemma: 1)
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= d
):
    row = tl.program_id(0).to(tl.int64)  # 64-bit row offsets: rows * d may exceed 2**31
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(H + row * stride_h + cols, h.to(H.dtype.element_ty), mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / d + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    tl.store(Y + row * stride_y + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


# Backward (per row, n = d, xhat = h * rstd, g = (offset + weight) * dy):
#     dL/dh = rstd * (g - xhat * mean(g * xhat)) + dh
# (d rstd / dh = -rstd^3 h / n), dh being the gradient arriving through the h output (the residual stream).
# Since h = x + residual, dx = dresidual = dL/dh. The weight is frozen: dW = sum_rows(dy * xhat) is never formed.
@triton.jit
def _add_rms_bwd_kernel(
    DY,  # (rows, d) upstream gradient of y
    DH,  # (rows, d) upstream gradient of h (unused when HAS_DH is False)
    H,  # (rows, d) saved h
    W,  # (d,) RMSNorm weight
    RSTD,  # (rows,) fp32 saved rstd
    DX,  # (rows, d) output dL/dh (= dx = dresidual)
    stride_dy,  # elements between rows of DY
    stride_dh,  # elements between rows of DH
    stride_h,  # elements between rows of H
    stride_dx,  # elements between rows of DX
    d,  # row length
    offset,  # the scale is offset + weight
    HAS_DH: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.load(RSTD + row)
    xhat = h * rstd
    g = tl.where(mask, dy * w, 0.0)
    dh = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / d))
    if HAS_DH:
        dh += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)


def _rows(t, d):
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(block_d):
    return min(16, max(1, block_d // 256))


def add_rms_fwd(x, residual, weight, eps, offset):
    """x, residual: (..., d); returns y (..., d), h (..., d; x itself without residual), rstd (rows,)."""
    require_triton(x, residual, weight)
    check_float(x, "x")
    shape, d = x.shape, x.shape[-1]
    x2 = _rows(x, d)  # (rows, d)
    r2 = _rows(residual.to(x.dtype), d) if residual is not None else None
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else None
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    block_d = next_power_of_2(d)
    if block_d > 8192:
        raise ValueError(f"add_rms_norm supports d <= 8192, got {d}")
    if rows > 0:
        _add_rms_fwd_kernel[(rows,)](
            x2, r2 if r2 is not None else x2, weight.contiguous(), y, h if h is not None else y, rstd,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0), h.stride(0) if h is not None else 0,
            d, float(eps), float(offset), HAS_RESIDUAL=residual is not None, BLOCK_D=block_d,
            num_warps=_num_warps(block_d),
        )
    return y.view(shape), (h.view(shape) if h is not None else x), rstd


def add_rms_bwd(dy, dh, h, weight, rstd, offset):
    """dL/dh (..., d) in h's dtype: the gradient of both x and residual."""
    shape, d = h.shape, h.shape[-1]
    h2 = _rows(h, d)
    dy2 = _rows(dy, d)
    dh2 = _rows(dh, d) if dh is not None else None
    rows = h2.shape[0]
    dx = torch.empty_like(h2)
    block_d = next_power_of_2(d)
    if rows > 0:
        _add_rms_bwd_kernel[(rows,)](
            dy2, dh2 if dh2 is not None else dy2, h2, weight.contiguous(), rstd, dx,
            dy2.stride(0), dh2.stride(0) if dh2 is not None else 0, h2.stride(0), dx.stride(0), d, float(offset),
            HAS_DH=dh2 is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return dx.view(shape)


# Registered as torch.library custom ops (``fastprompt::add_rms_norm``, ``fastprompt::add_rms_norm_bwd``) with
# fake implementations, for torch.compile and CUDA graphs. A custom op's output may not alias an input, so
# without a residual the op's h output is an empty tensor and the public function returns x itself as h.
@torch.library.custom_op("fastprompt::add_rms_norm", mutates_args=())
def _add_rms_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                offset: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, rstd = add_rms_fwd(x, residual, weight, eps, offset)
    return y, (h if residual is not None else x.new_empty(0)), rstd


@torch.library.custom_op("fastprompt::add_rms_norm_bwd", mutates_args=())
def _add_rms_bwd_op(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                    rstd: torch.Tensor, offset: float) -> torch.Tensor:
    return add_rms_bwd(dy, dh, h, weight, rstd, offset)


@_add_rms_op.register_fake
def _(x, residual, weight, eps, offset):
    rows = x.numel() // max(1, x.shape[-1])
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    return x.new_empty(x.shape), h, x.new_empty(rows, dtype=torch.float32)


@_add_rms_bwd_op.register_fake
def _(dy, dh, h, weight, rstd, offset):
    return h.new_empty(h.shape)


def _add_rms_setup(ctx, inputs, output):
    x, residual, weight, _, offset = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.offset = offset
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)  # xhat re-derived from h


def _add_rms_backward(ctx, dy, dh, _drstd):
    need_dx = ctx.needs_input_grad[0]
    need_dr = ctx.has_residual and ctx.needs_input_grad[1]
    if not (need_dx or need_dr):
        return None, None, None, None, None
    h, weight, rstd = ctx.saved_tensors
    d = _add_rms_bwd_op(dy, dh if ctx.has_residual else None, h, weight, rstd, ctx.offset)
    return (d if need_dx else None), (d if need_dr else None), None, None, None  # weight frozen: no dW


_add_rms_op.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)


def add_rms_norm(x, residual, weight, eps=1e-6, offset=0.0):
    """(y, h): h = x + residual (h = x when residual is None), y = h * rstd(h) * (offset + weight).
    x, residual: (..., d) fp32/bf16; weight: (d,) frozen. Statistics in fp32; outputs in x's dtype."""
    y, h, _ = _add_rms_op(x, residual, weight.detach(), float(eps), float(offset))
    return y, (h if residual is not None else x)


# ------------------------------------------------------------------- torch reference (the CPU path)
def add_rms_norm_ref(x, residual, weight, eps=1e-6, offset=0.0):
    """(y, h): h = x + residual (h = x when residual is None), y = h / rms(h) * (offset + weight) over the last
    dimension, in fp32 (fp64 for fp64 h), cast once to h's dtype. ``offset`` 1: Gemma's ``1 + w``. The weight
    is frozen: the backward forms dX only (no dW), in closed form (``_RMSNormRef``)."""
    h = x if residual is None else x + residual
    return _RMSNormRef.apply(h, weight.detach(), float(eps), float(offset)), h


class _RMSNormRef(torch.autograd.Function):
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
