"""In-place fp32 Adam step, matching torch.optim.Adam (non-fused, no weight decay, no amsgrad).

    m = lerp(m, g, 1 - b1)              (torch: exp_avg.lerp_(grad, 1 - beta1))
    v = v * b2 + (1 - b2) * g * g       (torch: exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2))
    p = p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

`step` (t) may be a Python int or a 0-d / 1-element fp32 tensor on the device: the kernel reads it
from memory, so a CUDA graph can replay the step while the tensor is incremented on the device.
The bias corrections are computed inside the kernel in fp64 by square-and-multiply (b^t for t < 2^31),
as torch does in Python floats; per-element math in fp32 with correctly rounded sqrt and division in
torch's operation order (FMAs where ATen's vectorised CPU kernels use them). betas are compile-time
constants (exact in fp64); lr travels as two fp32 scalars (hi + lo) so it is exact in fp64 too.
"""
import torch

from ._common import require_triton, tl, triton


@triton.jit
def _pow_int(base, n, BITS: tl.constexpr):
    """base ** n in fp64 by square-and-multiply over the BITS low bits of the int32 scalar n."""
    result = base * 0.0 + 1.0
    for i in tl.static_range(BITS):
        bit = (n >> i) & 1
        result = tl.where(bit == 1, result * base, result)
        base = base * base
    return result


@triton.jit
def _adam_kernel(
    P,  # (numel,) fp32 parameter, updated in place
    G,  # (numel,) gradient (fp32 or bf16; upcast on load)
    M,  # (numel,) fp32 exp_avg, in place
    VSQ,  # (numel,) fp32 exp_avg_sq, in place
    STEP,  # fp32 step tensor (read when STEP_IN_TENSOR)
    step,  # int step (used when not STEP_IN_TENSOR)
    lr_hi,  # learning rate, fp32 part: lr = lr_hi + lr_lo (kernel scalars are fp32; this keeps fp64 lr)
    lr_lo,  # fp32 remainder lr - lr_hi
    eps,  # epsilon (fp32)
    numel,  # elements
    BETA1: tl.constexpr,  # exact in fp64
    BETA2: tl.constexpr,
    STEP_IN_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if STEP_IN_TENSOR:
        t = tl.load(STEP).to(tl.int32)
    else:
        t = step
    b1 = tl.full([], BETA1, tl.float64)
    b2 = tl.full([], BETA2, tl.float64)
    bc1 = 1.0 - _pow_int(b1, t, 31)  # fp64, like torch's `1 - beta1 ** step` in Python
    bc2 = 1.0 - _pow_int(b2, t, 31)
    lr = (bc1 * 0.0 + lr_hi) + lr_lo  # fp64, exact to ~2^-48
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)

    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(P + offs, mask=mask, other=0.0)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(M + offs, mask=mask, other=0.0)
    v = tl.load(VSQ + offs, mask=mask, other=0.0)
    w1 = 1.0 - BETA1  # lerp weight, rounded to fp32 as torch's scalar
    # torch.lerp: weight < 0.5 -> start + weight * (end - start), else end - (end - start) * (1 - weight)
    # (ATen's vectorised lerp uses an FMA; so do we)
    if w1 < 0.5:
        m = tl.fma(w1 + 0.0 * m, g - m, m)
    else:
        m = tl.fma(m - g, 1.0 - w1 + 0.0 * m, g)
    v = v * BETA2
    v = tl.fma((1.0 - BETA2) * g, g, v)  # ATen's addcmul: fma(value * t1, t2, self)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)  # ATen addcdiv: self + value * t1 / t2
    tl.store(P + offs, p, mask=mask)
    tl.store(M + offs, m, mask=mask)
    tl.store(VSQ + offs, v, mask=mask)


_BLOCK = 1024


def adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """One in-place Adam update of fp32 `param`, `exp_avg`, `exp_avg_sq` (all contiguous, same shape).

    step: the step number after incrementing (1 on the first update), a Python int or a 0-d /
    1-element fp32 tensor on param's device (read in the kernel: no host sync).
    """
    require_triton(param, grad, exp_avg, exp_avg_sq)
    for name, t in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != param.shape:
            raise ValueError(f"adam_step: {name} must be a contiguous fp32 tensor shaped like param")
    grad = grad.contiguous()
    step_in_tensor = torch.is_tensor(step)
    numel = param.numel()
    lr_hi = float(torch.tensor(float(lr), dtype=torch.float32))
    lr_lo = float(lr) - lr_hi
    if numel == 0:
        return param
    _adam_kernel[(triton.cdiv(numel, _BLOCK),)](
        param, grad, exp_avg, exp_avg_sq,
        step if step_in_tensor else param, 0 if step_in_tensor else int(step),
        lr_hi, lr_lo, float(eps), numel,
        BETA1=float(beta1), BETA2=float(beta2), STEP_IN_TENSOR=step_in_tensor, BLOCK=_BLOCK, num_warps=4,
    )
    return param


@torch.no_grad()
def adam_step_ref(param, grad, exp_avg, exp_avg_sq, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, upcast=False):
    """torch.optim.Adam's single-tensor update, in place (upcast is accepted for symmetry: Adam is fp32)."""
    step = float(step.item()) if torch.is_tensor(step) else float(step)
    grad = grad.to(param.dtype)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
    return param
