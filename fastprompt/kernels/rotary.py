"""RoPE on query/key heads with an input-gradient-only backward (the tables cos/sin are constants).

    x = [x1 | x2] (halves of a head of D)     y1 = x1 * cos1 - x2 * sin1,   y2 = x2 * cos2 + x1 * sin2

``cos``/``sin`` are (rows, D) with both halves equal, as Hugging Face builds them (``ops.rotary_tables``).
One program per (row, head); x may be a strided view (q, k sliced out of the fused q/k/v projection):
rows and heads by stride, the head dimension contiguous. The torch reference is
``rotary_ref`` at the end of this file.
"""
import torch

from ._common import check_float, next_power_of_2, require_triton, tl, triton


@triton.jit
def _rotary_kernel(
    X,  # (rows, heads, D) input (forward) or upstream gradient (backward)
    COS,  # (rows, D) fp32 cos table
    SIN,  # (rows, D) fp32 sin table
    Y,  # (rows, heads, D) contiguous output
    stride_row,  # elements between rows of X
    stride_head,  # elements between heads of X
    stride_table,  # elements between rows of COS / SIN
    heads,  # heads per row
    half,  # D / 2
    BACKWARD: tl.constexpr,  # the transpose: dx1 = dy1 cos1 + dy2 sin2, dx2 = dy2 cos2 - dy1 sin1
    BLOCK: tl.constexpr,  # next power of two >= D / 2
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < half
    x_ptr = X + row * stride_row + head * stride_head
    x1 = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half + cols, mask=mask, other=0.0).to(tl.float32)
    t_ptr = row * stride_table
    c1 = tl.load(COS + t_ptr + cols, mask=mask, other=0.0)
    c2 = tl.load(COS + t_ptr + half + cols, mask=mask, other=0.0)
    s1 = tl.load(SIN + t_ptr + cols, mask=mask, other=0.0)
    s2 = tl.load(SIN + t_ptr + half + cols, mask=mask, other=0.0)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    y_ptr = Y + (row * heads + head) * 2 * half
    tl.store(y_ptr + cols, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half + cols, y2.to(Y.dtype.element_ty), mask=mask)


def _launch(x, cos, sin, backward):
    require_triton(x, cos, sin)
    check_float(x, "x")
    rows, heads, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    y = torch.empty((rows, heads, D), device=x.device, dtype=x.dtype)
    if rows > 0 and heads > 0:
        _rotary_kernel[(rows, heads)](x, cos, sin, y, x.stride(0), x.stride(1), cos.stride(0), heads, D // 2,
                                      BACKWARD=backward, BLOCK=next_power_of_2(D // 2), num_warps=1)
    return y


# Registered as torch.library custom ops (``fastprompt::rotary``, ``fastprompt::rotary_bwd``) with fake
# (shape-only) implementations, so torch.compile traces through them and CUDA graphs capture the launches.
# Backward: y = x * cos + rotate_half(x) * sin is linear in x, so dx is the transposed rotation of dy
# (the kernel's BACKWARD mode); the tables are constants (no gradient).
@torch.library.custom_op("fastprompt::rotary", mutates_args=())
def _rotary_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _launch(x, cos, sin, backward=False)


@torch.library.custom_op("fastprompt::rotary_bwd", mutates_args=())
def _rotary_bwd_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _launch(dy, cos, sin, backward=True)


@_rotary_op.register_fake
def _(x, cos, sin):
    return x.new_empty(x.shape)


@_rotary_bwd_op.register_fake
def _(dy, cos, sin):
    return dy.new_empty(dy.shape)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)  # the tables only: the map is linear in x


def _rotary_backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _rotary_bwd_op(dy, cos, sin), None, None  # tables are constants


_rotary_op.register_autograd(_rotary_backward, setup_context=_rotary_setup)


def rotary(x, cos, sin):
    """RoPE on ``x`` (rows, heads, D) fp32/bf16 with ``cos``/``sin`` (rows, D) -> (rows, heads, D) in x's dtype."""
    return _rotary_op(x, cos, sin)


# ------------------------------------------------------------------- torch reference (the CPU path)
def rotary_ref(x, cos, sin):
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
