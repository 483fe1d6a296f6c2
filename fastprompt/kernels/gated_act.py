"""The gated MLP's activation with an input-gradient-only backward: SwiGLU (silu) and GeGLU (tanh GELU).

    gate_up = [gate | up]  (rows, 2I)  ->  y = act(gate) * up  (rows, I)

Backward:  d gate = dy * up * act'(gate),   d up = dy * act(gate), with
    silu'(g) = s (1 + g (1 - s)),  s = sigmoid(g)
    gelu_tanh'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) k (1 + 3 c g^2),  t = tanh(k (g + c g^3))
The backward recomputes act(gate) from the saved input (no (rows, I) activation saved). Elementwise; the
torch reference is ``gated_act_ref`` at the end of this file.
"""
import math

import torch
import torch.nn.functional as F

from ._common import check_float, require_triton, tl, triton

_K = math.sqrt(2.0 / math.pi)
_C = 0.044715
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1}


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, K: tl.constexpr, C: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        da = s * (1.0 + g * (1.0 - s))
    else:
        t = 2.0 * tl.sigmoid(2.0 * K * (g + C * g * g * g)) - 1.0  # tanh without libdevice (the interpreter has none)
        a = 0.5 * g * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * K * (1.0 + 3.0 * C * g * g)
    return a, da


@triton.jit
def _gated_act_kernel(
    GU,  # (rows, 2I) contiguous [gate | up]
    DY,  # (rows, I) upstream gradient (backward only)
    OUT,  # forward: (rows, I) y; backward: (rows, 2I) [d gate | d up]
    numel,  # rows * I
    inner,  # I
    ACT: tl.constexpr,  # 0 silu, 1 tanh GELU
    BACKWARD: tl.constexpr,
    K: tl.constexpr,
    C: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # 64-bit: numel may exceed 2**31
    mask = offs < numel
    row = offs // inner
    col = offs - row * inner
    gate_at = row * 2 * inner + col
    g = tl.load(GU + gate_at, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + gate_at + inner, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, K, C)
    if BACKWARD:
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + gate_at, (dy * u * da).to(OUT.dtype.element_ty), mask=mask)
        tl.store(OUT + gate_at + inner, (dy * a).to(OUT.dtype.element_ty), mask=mask)
    else:
        tl.store(OUT + offs, (a * u).to(OUT.dtype.element_ty), mask=mask)


_BLOCK = 1024


def _launch(gate_up, dy, activation):
    require_triton(gate_up, dy)
    check_float(gate_up, "gate_up")
    inner = gate_up.shape[-1] // 2
    rows = gate_up.numel() // max(1, 2 * inner)
    backward = dy is not None
    out = torch.empty_like(gate_up) if backward else gate_up.new_empty((*gate_up.shape[:-1], inner))
    numel = rows * inner
    if numel > 0:
        _gated_act_kernel[(triton.cdiv(numel, _BLOCK),)](
            gate_up, dy.contiguous() if backward else gate_up, out, numel, inner, ACT=ACTIVATIONS[activation],
            BACKWARD=backward, K=_K, C=_C, BLOCK=_BLOCK, num_warps=4)
    return out


# Registered as torch.library custom ops (``fastprompt::gated_act``, ``fastprompt::gated_act_bwd``) with fake
# implementations, for torch.compile and CUDA graphs. Backward saves the input, not act(gate): recomputed.
@torch.library.custom_op("fastprompt::gated_act", mutates_args=())
def _gated_act_op(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    return _launch(gate_up.contiguous(), None, activation)


@torch.library.custom_op("fastprompt::gated_act_bwd", mutates_args=())
def _gated_act_bwd_op(gate_up: torch.Tensor, dy: torch.Tensor, activation: str) -> torch.Tensor:
    return _launch(gate_up.contiguous(), dy, activation)


@_gated_act_op.register_fake
def _(gate_up, activation):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@_gated_act_bwd_op.register_fake
def _(gate_up, dy, activation):
    return gate_up.new_empty(gate_up.shape)


def _gated_act_setup(ctx, inputs, output):
    gate_up, activation = inputs
    ctx.activation = activation
    ctx.save_for_backward(gate_up)


def _gated_act_backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return _gated_act_bwd_op(gate_up, dy, ctx.activation), None


_gated_act_op.register_autograd(_gated_act_backward, setup_context=_gated_act_setup)


def gated_act(gate_up, activation="silu"):
    """act(gate) * up for ``gate_up = [gate | up]`` (..., 2I) fp32/bf16 -> (..., I); ``activation`` silu or gelu_tanh."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"gated_act: unknown activation {activation!r} (known: {', '.join(ACTIVATIONS)})")
    return _gated_act_op(gate_up, activation)


# ------------------------------------------------------------------- torch reference (the CPU path)
def gated_act_ref(gate_up, activation="silu"):
    """act(gate) * up for ``gate_up = [gate | up]`` (rows, 2I) -> (rows, I): SwiGLU (silu), GeGLU (gelu_tanh)."""
    gate, up = gate_up.chunk(2, dim=-1)
    a = F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")
    return a * up
