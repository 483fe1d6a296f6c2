"""Fused residual-add + LayerNorm through the optional CUDA C++ extension ``fastprompt._C`` (csrc/).

The CUDA C++ twin of the Triton op ``fastprompt.kernels.layer_norm.add_layer_norm``, same signature and
semantics:

    add_layer_norm(x, residual, weight, bias, eps) -> (y, h)
        h = x + residual            (h = x when residual is None)
        y = LayerNorm(h) * weight + bias, statistics in fp32

x, residual, y, h are fp32 or bf16 (one dtype); weight and bias have that dtype too and are frozen: the
backward returns the gradient of x and of residual (the same tensor, dx) and nothing for weight/bias.
The math of the backward is written down in csrc/layer_norm.cu.

Layers, as in every op of this repo: CUDA kernels (csrc/layer_norm.cu) -> raw-pointer launchers ->
torch bindings (csrc/bindings.cpp: ``_C.add_layer_norm_fwd`` / ``_C.add_layer_norm_bwd``) ->
``AddLayerNormFn`` (autograd) -> ``add_layer_norm``; ``add_layer_norm_ref`` is the plain torch reference.

The extension is optional: importing this module never fails; calling ``add_layer_norm`` without it
raises a RuntimeError that says how to build it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    from fastprompt import _C
except ImportError as exc:  # not built (CPU-only install) or built against another torch
    _C = None
    _C_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _C_IMPORT_ERROR = None

CUDA_EXT_AVAILABLE = _C is not None

BUILD_HINT = (
    "build it on a machine with a CUDA build of torch and nvcc: "
    "`FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(FASTPROMPT_CUDA_ARCH picks the GPU architecture, default 90 = H100)"
)


def _require_ext():
    """The extension module, or a RuntimeError that explains how to get it (read at call time, so tests
    can monkeypatch ``_C``)."""
    if _C is None:
        why = f" (import failed with {_C_IMPORT_ERROR})" if _C_IMPORT_ERROR else ""
        raise RuntimeError(
            f"fastprompt.cuda_ops.add_layer_norm needs the CUDA extension fastprompt._C, which is not "
            f"available{why}; {BUILD_HINT}. The Triton op fastprompt.kernels.layer_norm.add_layer_norm "
            f"needs no build step."
        )
    return _C


class AddLayerNormFn(torch.autograd.Function):
    """(x, residual, weight, bias, eps) -> (y, h); gradients for x and residual only (weights frozen)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps):
        ext = _require_ext()
        # y, h: like x (h *is* x when residual is None); mean, rstd: (rows,) fp32
        y, h, mean, rstd = ext.add_layer_norm_fwd(x, residual, weight, bias, eps)
        ctx.has_residual = residual is not None
        ctx.set_materialize_grads(False)  # an unused y or h gives None, not a zero tensor to read
        ctx.save_for_backward(h, weight, mean, rstd)  # backward re-derives xhat from h: no (rows, d) xhat saved
        if residual is None:
            return y  # h is x: add_layer_norm returns x itself, whose gradient autograd adds up directly
        return y, h

    @staticmethod
    def backward(ctx, dy, dh=None):
        need_x, need_residual = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and ctx.has_residual
        if not (need_x or need_residual):
            return None, None, None, None, None
        if dy is None:  # only h was used downstream: the norm contributes nothing
            dx = dh
        else:
            h, weight, mean, rstd = ctx.saved_tensors
            dh = None if dh is None else dh.contiguous()
            dx = _require_ext().add_layer_norm_bwd(dy.contiguous(), dh, h, weight, mean, rstd)  # like h
        # h = x + residual: both receive the same dx. weight, bias frozen; eps is not a tensor.
        return (dx if need_x else None), (dx if need_residual else None), None, None, None


def add_layer_norm(
    x: torch.Tensor,  # (..., d) fp32 or bf16, CUDA
    residual: torch.Tensor | None,  # like x, or None
    weight: torch.Tensor,  # (d,) like x, frozen
    bias: torch.Tensor,  # (d,) like x, frozen
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual, y = LayerNorm(h) * weight + bias, via the CUDA extension. Returns (y, h), h being
    x itself when residual is None. Gradients: dx = dresidual = dh + LayerNorm-backward(dy)."""
    _require_ext()
    weight, bias, eps = weight.contiguous(), bias.contiguous(), float(eps)
    if residual is None:  # as the Triton op: h is x itself, not an output of the autograd node
        return AddLayerNormFn.apply(x.contiguous(), None, weight, bias, eps), x
    return AddLayerNormFn.apply(x.contiguous(), residual.contiguous(), weight, bias, eps)


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-5,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch reference, differentiable.

    upcast=False: computed as a plain torch model would, in the inputs' dtype (h rounded to it; torch's
    layer_norm accumulates in fp32): the same-precision baseline for tolerances.
    upcast=True: every input cast to fp32 first and fp32 outputs returned: the ground truth.
    """
    if upcast:
        x, weight, bias = x.float(), weight.float(), bias.float()
        residual = None if residual is None else residual.float()
    h = x if residual is None else x + residual  # (..., d)
    y = F.layer_norm(h, (h.shape[-1],), weight, bias, eps)  # (..., d)
    return y, h
