"""Fused residual-add + LayerNorm with an input-gradient-only backward, from Triton or CUDA C++.

    h = x + residual            (h = x when residual is None)
    y = (h - mean(h)) * rstd(h) * weight + bias,   rstd = 1 / sqrt(var(h) + eps)

One program per row; the whole row (d <= 8192) sits in one block. weight/bias are frozen: no
dgamma/dbeta, so the backward is a per-row map with no cross-row reduction.

One autograd function, two sets of launchers with one contract: the Triton kernels here
(``add_layer_norm``) and the CUDA C++ extension ``fastprompt.kernels._C`` (csrc/layer_norm.cu, loaded by
``fastprompt/kernels/cuda_ext.py``; ``add_layer_norm_cuda``, what ``kernels='cuda'`` runs).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .cuda_ext import require_ext  # reads the module's _C at call time (tests stand one in)
from ._common import check_float, next_power_of_2, require_triton, tl, triton


@triton.jit
def _add_ln_fwd_kernel(
    X,  # (rows, d) input
    R,  # (rows, d) residual (unused when HAS_RESIDUAL is False)
    W,  # (d,) LayerNorm weight
    B,  # (d,) LayerNorm bias
    Y,  # (rows, d) output y
    H,  # (rows, d) output h = x + residual (unused when HAS_RESIDUAL is False)
    MEAN,  # (rows,) fp32 mean of h, saved for backward
    RSTD,  # (rows,) fp32 1/sqrt(var + eps), saved for backward
    stride_x,  # elements between rows of X
    stride_r,  # elements between rows of R
    stride_y,  # elements between rows of Y
    stride_h,  # elements between rows of H
    d,  # row length
    eps,  # variance epsilon
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
    mean = tl.sum(h, axis=0) / d
    hc = tl.where(mask, h - mean, 0.0)
    var = tl.sum(hc * hc, axis=0) / d
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    y = hc * rstd * w + b
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


# Backward (per row, n = d, xhat = (h - mean) * rstd, g = weight * dy):
#     dL/dh = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dh
# where dh is the gradient arriving through the h output (the residual stream). Since h = x + residual,
# dx = dresidual = dL/dh. weight and bias are frozen, so dgamma = sum(dy * xhat) and dbeta = sum(dy)
# (cross-row reductions) are never computed.
@triton.jit
def _add_ln_bwd_kernel(
    DY,  # (rows, d) upstream gradient of y
    DH,  # (rows, d) upstream gradient of h (unused when HAS_DH is False)
    H,  # (rows, d) saved h
    W,  # (d,) LayerNorm weight
    MEAN,  # (rows,) fp32 saved mean
    RSTD,  # (rows,) fp32 saved rstd
    DX,  # (rows, d) output dx
    DR,  # (rows, d) output dresidual (unused when STORE_DR is False)
    stride_dy,  # elements between rows of DY
    stride_dh,  # elements between rows of DH
    stride_h,  # elements between rows of H
    stride_dx,  # elements between rows of DX
    stride_dr,  # elements between rows of DR
    d,  # row length
    HAS_DH: tl.constexpr,
    STORE_DX: tl.constexpr,
    STORE_DR: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    xhat = tl.where(mask, (h - mean) * rstd, 0.0)
    g = dy * w
    c_g = tl.sum(g, axis=0) / d
    c_gx = tl.sum(g * xhat, axis=0) / d
    dh = rstd * (g - c_g - xhat * c_gx)
    if HAS_DH:
        dh += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    if STORE_DX:
        tl.store(DX + row * stride_dx + cols, dh.to(DX.dtype.element_ty), mask=mask)
    if STORE_DR:
        tl.store(DR + row * stride_dr + cols, dh.to(DR.dtype.element_ty), mask=mask)


def _rows(t, d):
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def _num_warps(block_d):
    return min(16, max(1, block_d // 256))


def add_ln_fwd(x, residual, weight, bias, eps):
    """x, residual: (..., d); returns y (..., d), h (..., d; x itself without residual), mean (rows,), rstd
    (rows,)."""
    require_triton(x, residual, weight, bias)
    check_float(x, "x")
    shape, d = x.shape, x.shape[-1]
    x2 = _rows(x, d)  # (rows, d)
    r2 = _rows(residual.to(x.dtype), d) if residual is not None else None
    rows = x2.shape[0]
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else None
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    block_d = next_power_of_2(d)
    if block_d > 8192:
        raise ValueError(f"add_layer_norm supports d <= 8192, got {d}")
    if rows > 0:
        _add_ln_fwd_kernel[(rows,)](
            x2, r2 if r2 is not None else x2, weight.contiguous(), bias.contiguous(), y,
            h if h is not None else y, mean, rstd,
            x2.stride(0), r2.stride(0) if r2 is not None else 0, y.stride(0),
            h.stride(0) if h is not None else 0, d, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_D=block_d, num_warps=_num_warps(block_d),
        )
    return y.view(shape), (h.view(shape) if h is not None else x), mean, rstd


def add_ln_bwd(dy, dh, h, weight, mean, rstd, need_dx, need_dr):
    """Returns (dx, dresidual), each (..., d) in h's dtype or None where not needed."""
    shape, d = h.shape, h.shape[-1]
    h2 = _rows(h, d)
    dy2 = _rows(dy, d)
    dh2 = _rows(dh, d) if dh is not None else None
    rows = h2.shape[0]
    dx = torch.empty_like(h2) if need_dx else None
    dr = torch.empty_like(h2) if need_dr else None
    block_d = next_power_of_2(d)
    if rows > 0 and (need_dx or need_dr):
        out0 = dx if dx is not None else dr
        _add_ln_bwd_kernel[(rows,)](
            dy2, dh2 if dh2 is not None else dy2, h2, weight.contiguous(), mean, rstd,
            dx if dx is not None else out0, dr if dr is not None else out0,
            dy2.stride(0), dh2.stride(0) if dh2 is not None else 0, h2.stride(0),
            out0.stride(0), out0.stride(0), d,
            HAS_DH=dh2 is not None, STORE_DX=need_dx, STORE_DR=need_dr, BLOCK_D=block_d,
            num_warps=_num_warps(block_d),
        )
    return (dx.view(shape) if dx is not None else None), (dr.view(shape) if dr is not None else None)


def cuda_ln_fwd(x, residual, weight, bias, eps):
    """``add_ln_fwd`` through ``fastprompt.kernels._C`` (csrc/bindings.cpp), which takes contiguous tensors; h is
    the contiguous x without residual. The extension is looked up at call time (tests put in a stand-in)."""
    residual = None if residual is None else residual.contiguous()
    return require_ext().add_layer_norm_fwd(x.contiguous(), residual, weight.contiguous(),
                                                     bias.contiguous(), float(eps))


def cuda_ln_bwd(dy, dh, h, weight, mean, rstd, need_dx, need_dr):
    """``add_ln_bwd`` through ``fastprompt.kernels._C``: one dx, returned for both x and residual."""
    if not (need_dx or need_dr):
        return None, None
    dh = None if dh is None else dh.contiguous()
    dx = require_ext().add_layer_norm_bwd(dy.contiguous(), dh, h, weight.contiguous(), mean, rstd)
    return (dx if need_dx else None), (dx if need_dr else None)


_LAUNCHERS = {"triton": (add_ln_fwd, add_ln_bwd), "cuda": (cuda_ln_fwd, cuda_ln_bwd)}


# Registered as torch.library custom ops (``fastprompt::add_layer_norm``, ``fastprompt::add_layer_norm_bwd``)
# with fake implementations, for torch.compile and CUDA graphs; ``backend`` picks the Triton or the CUDA C++
# launchers. A custom op's output may not alias an input, so without a residual the op's h output is
# empty and the public function returns x itself as h.
@torch.library.custom_op("fastprompt::add_layer_norm", mutates_args=())
def _add_ln_op(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor,
               eps: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = _LAUNCHERS[backend][0](x, residual, weight, bias, eps)
    return y, (h if residual is not None else x.new_empty(0)), mean, rstd


@torch.library.custom_op("fastprompt::add_layer_norm_bwd", mutates_args=())
def _add_ln_bwd_op(dy: torch.Tensor, dh: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
                   mean: torch.Tensor, rstd: torch.Tensor, need_dx: bool, need_dr: bool,
                   backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(dx, dresidual): equal (h = x + residual), in separate buffers; one not needed comes back empty."""
    dx, dr = _LAUNCHERS[backend][1](dy, dh, h, weight, mean, rstd, need_dx, need_dr)
    if dx is not None and dr is not None and dr.data_ptr() == dx.data_ptr():
        dr = dr.clone()  # a custom op's outputs may not alias (a launcher may return one buffer twice)
    empty = h.new_empty(0)
    return (dx if dx is not None else empty), (dr if dr is not None else empty.clone())


@_add_ln_bwd_op.register_fake
def _(dy, dh, h, weight, mean, rstd, need_dx, need_dr, backend):
    return (h.new_empty(h.shape) if need_dx else h.new_empty(0)), (h.new_empty(h.shape) if need_dr else h.new_empty(0))


@_add_ln_op.register_fake
def _(x, residual, weight, bias, eps, backend):
    rows = x.numel() // max(1, x.shape[-1])
    h = x.new_empty(x.shape) if residual is not None else x.new_empty(0)
    stat = x.new_empty(rows, dtype=torch.float32)
    return x.new_empty(x.shape), h, stat, stat.clone()


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight, _, _, backend = inputs
    _, h, mean, rstd = output
    ctx.has_residual, ctx.backend = residual is not None, backend
    ctx.save_for_backward(h if residual is not None else x, weight, mean, rstd)  # xhat re-derived from h


def _add_ln_backward(ctx, dy, dh, _dmean, _drstd):
    need_dx = ctx.needs_input_grad[0]
    need_dr = ctx.has_residual and ctx.needs_input_grad[1]
    if not (need_dx or need_dr):
        return None, None, None, None, None, None
    h, weight, mean, rstd = ctx.saved_tensors
    dx, dr = _add_ln_bwd_op(dy, dh if ctx.has_residual else None, h, weight, mean, rstd, need_dx, need_dr,
                            ctx.backend)
    return (dx if need_dx else None), (dr if need_dr else None), None, None, None, None  # weight, bias frozen


_add_ln_op.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


def _apply(backend, x, residual, weight, bias, eps):
    y, h, _, _ = _add_ln_op(x, residual, weight.detach(), bias.detach(), float(eps), backend)
    return y, (h if residual is not None else x)


def add_layer_norm(x, residual, weight, bias, eps=1e-5):
    """(y, h): h = x + residual (h = x when residual is None), y = LayerNorm(h) * weight + bias.

    x, residual: (..., d) fp32/bf16; weight, bias: (d,) frozen (never get gradients). Statistics in
    fp32; outputs in x's dtype. Backward: dx = dresidual = dh + LayerNorm-backward(dy).
    """
    return _apply("triton", x, residual, weight, bias, eps)


def add_layer_norm_cuda(x, residual, weight, bias, eps=1e-5):
    """``add_layer_norm`` through the CUDA C++ extension ``fastprompt.kernels._C`` (CUDA tensors, fp32 or bf16, one
    dtype for all); a RuntimeError with the build command where it is not built."""
    return _apply("cuda", x, residual, weight, bias, eps)


# ------------------------------------------------------------------- torch reference (the CPU path)
def add_layer_norm_ref(x, residual, weight, bias, eps=1e-5):
    """(y, h): h = x + residual (h = x when residual is None), y = LayerNorm(h) * weight + bias."""
    h = x if residual is None else x + residual
    y = F.layer_norm(h, (h.shape[-1],), weight.detach().to(h.dtype), bias.detach().to(h.dtype), eps)
    return y, h
