"""Frozen linear layer in GPT-2's Conv1D layout (weight is (in, out)): y = x @ weight + bias.

No Triton kernel: both GEMMs go to cuBLAS through torch.matmul / addmm, which is as fast as it gets.
What this file adds is the autograd.Function: the weight and bias are frozen, so backward computes
dx = dy @ weight^T only and never the weight GEMM (x^T @ dy) nor the bias reduction, and forward saves
only the weight (a reference, no copy), not the activation x.
"""
import torch


def linear_fwd(x, weight, bias=None):
    """x: (..., in); weight: (in, out); bias: (out,) or None -> (..., out) in x's dtype."""
    w = weight if weight.dtype == x.dtype else weight.to(x.dtype)  # frozen weights should already match
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    if bias is not None:
        y = torch.addmm(bias.to(x.dtype), x2, w)  # (rows, out), bias fused into the GEMM epilogue
    else:
        y = x2 @ w
    return y.view(*x.shape[:-1], w.shape[1])


def linear_bwd(dy, weight):
    """dx = dy @ weight^T: (..., out) -> (..., in)."""
    w = weight if weight.dtype == dy.dtype else weight.to(dy.dtype)
    dy2 = dy.reshape(-1, dy.shape[-1])
    return (dy2 @ w.t()).view(*dy.shape[:-1], w.shape[0])


class LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(weight)  # x is not needed: there is no weight gradient
        ctx.x_dtype = x.dtype
        return linear_fwd(x, weight, bias)

    # Backward: y = x W + b  =>  dx = dy W^T.  dW = x^T dy and db = sum(dy) are never computed.
    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (weight,) = ctx.saved_tensors
        return linear_bwd(dy, weight).to(ctx.x_dtype), None, None


def linear(x, weight, bias=None):
    """y = x @ weight + bias with weight (in, out) (GPT-2 Conv1D); weight and bias are frozen."""
    return LinearFn.apply(x, weight, bias)


# ------------------------------------------------------------------- torch reference (the CPU path)
def linear_ref(x, weight, bias=None):
    """x @ weight + bias with GPT-2's Conv1D layout: weight (in, out). x: (..., in) -> (..., out)."""
    w = weight.detach()
    x2 = x.reshape(-1, x.shape[-1])  # (rows, in)
    y = x2 @ w if bias is None else torch.addmm(bias.detach(), x2, w)  # as HF's Conv1D computes it
    return y.view(*x.shape[:-1], w.shape[1])
