"""LM head + cross-entropy + dH in one streaming pass over the vocabulary.

    logits = h @ weight^T          (rows, V), never materialised
    loss_r = logsumexp(logits_r) - logits_r[target_r]
    dloss_r / dh_r = sum_v softmax(logits_r)_v * weight_v - weight_{target_r}

weight is the tied embedding matrix (V, d) and frozen: no dW (that would be a (V, d) GEMM).

Design. A program owns a block of BLOCK_M rows and a contiguous slice of the vocabulary (a "split");
it walks its slice in blocks of BLOCK_V columns, building each logits tile (BLOCK_M, BLOCK_V) from
d-chunks of h and W, and keeps an online log-sum-exp (running max m, running sum s, rescaled by
exp(m_old - m_new) whenever the max grows). In the same pass it accumulates
    A = sum_v exp(logit_v - m) * W_v        (BLOCK_M, d), rescaled together with s,
so that dH = A / s - W_target. A lives in a per-split fp32 scratch in global memory (read-modify-write
per vocabulary block; it is small and stays in L2), because (BLOCK_M, d) fp32 does not fit registers
for d = 1280. Splitting the vocabulary gives ~one wave of programs even for a few hundred rows; the
splits' (m, s, A, target logit) are merged afterwards with a log-sum-exp rescale (a small einsum).

Why dH in forward rather than recomputing it in backward: in training the loss is always
backpropagated, and a second pass would read the whole (V, d) weight again (128 MB in bf16 for
GPT-2 Large) and redo the logits GEMM. Saving dH costs rows * d * 4 bytes (1.7 MB at 330 rows) and
backward becomes one elementwise scale by the upstream per-row gradient. When no gradient is needed
(torch.no_grad, or h not requiring grad) the kernel skips the dH accumulation.

Dtypes: h and W both fp32 (IEEE fp32 dots), both 16-bit (tensor cores, fp32 accumulation), or h 16-bit
with W fp32 (autocast): W is then cast to h's dtype once per call, as autocast casts a matmul's operands.

Targets < 0 (e.g. -100) are ignored: loss 0 and zero gradient, as F.cross_entropy(reduction='none').
Targets >= V are not checked (that would need a host sync).
"""
from typing import Tuple

import torch

from ._common import check_float, interpreting, next_power_of_2, require_triton, tl, triton, use_lowp_dot


@triton.jit
def _lm_head_ce_fwd_kernel(
    H,  # (rows, d) hidden states
    W,  # (V, d) tied embedding / LM-head weight
    T,  # (rows,) int64 targets
    M_PART,  # (n_splits, rows) fp32 out: running max of each split
    S_PART,  # (n_splits, rows) fp32 out: sum exp(logit - m) of each split
    TGT_PART,  # (n_splits, rows) fp32 out: the target logit if it falls in this split, else 0
    A_PART,  # (n_splits, rows, d) fp32 out/scratch: sum exp(logit - m) * W_v of each split
    stride_h,  # elements between rows of H
    stride_w,  # elements between rows of W
    rows,  # number of rows
    V,  # vocabulary size
    d,  # hidden size
    blocks_per_split,  # vocabulary blocks (of BLOCK_V) per split
    COMPUTE_DH: tl.constexpr,  # accumulate A (skip when no gradient is needed)
    LOWP_DOT: tl.constexpr,  # tl.dot on 16-bit operands (GPU); else upcast to fp32 and dot in IEEE fp32
    BLOCK_M: tl.constexpr,  # rows per program (>= 16 for tl.dot)
    BLOCK_V: tl.constexpr,  # vocabulary columns per step
    BLOCK_D: tl.constexpr,  # hidden chunk per dot
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < rows
    row_off = offs_m.to(tl.int64)  # 64-bit offsets
    tgt = tl.load(T + row_off, mask=row_mask, other=-1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_M], tl.float32)
    t_i = tl.zeros([BLOCK_M], tl.float32)
    v_begin = pid_s * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
    a_base = A_PART + pid_s * rows * d
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < V
        # logits tile (BLOCK_M, BLOCK_V) = h (BLOCK_M, d) @ W_blk^T (d, BLOCK_V), in d-chunks
        logits = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        for d0 in range(0, d, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_mask = offs_d < d
            h = tl.load(H + row_off[:, None] * stride_h + offs_d[None, :],
                        mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            wt = tl.load(W + offs_v.to(tl.int64)[None, :] * stride_w + offs_d[:, None],
                         mask=v_mask[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_V)
            if LOWP_DOT:
                logits = tl.dot(h, wt, logits)
            else:
                logits = tl.dot(h.to(tl.float32), wt.to(tl.float32), logits, input_precision="ieee")
        logits = tl.where(v_mask[None, :], logits, float("-inf"))
        t_i += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], logits, 0.0), axis=1)
        # online log-sum-exp; every block has >= 1 valid column, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first block (m_i = -inf)
        p = tl.exp(logits - m_new[:, None])  # (BLOCK_M, BLOCK_V), 0 on masked columns
        s_i = s_i * alpha + tl.sum(p, axis=1)
        if COMPUTE_DH:
            not_first = (offs_m.to(tl.int64) * 0 + v0) > v_begin  # (BLOCK_M,) bool
            for d0 in range(0, d, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_mask = offs_d < d
                w = tl.load(W + offs_v.to(tl.int64)[:, None] * stride_w + offs_d[None, :],
                            mask=v_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_V, BLOCK_D)
                a_ptr = a_base + row_off[:, None] * d + offs_d[None, :]
                a_mask = row_mask[:, None] & d_mask[None, :]
                # first block: nothing accumulated yet (scratch is uninitialised): read nothing
                acc = tl.load(a_ptr, mask=a_mask & not_first[:, None], other=0.0) * alpha[:, None]
                if LOWP_DOT:
                    acc = tl.dot(p.to(w.dtype), w, acc)
                else:
                    acc = tl.dot(p, w.to(tl.float32), acc, input_precision="ieee")
                tl.store(a_ptr, acc, mask=a_mask)
        m_i = m_new
    part = pid_s * rows + row_off
    tl.store(M_PART + part, m_i, mask=row_mask)
    tl.store(S_PART + part, s_i, mask=row_mask)
    tl.store(TGT_PART + part, t_i, mask=row_mask)


_SM_COUNT = {}


def _num_programs_target(device):
    """About one wave of programs on the GPU; a few splits in the interpreter (exercises the merge)."""
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def lm_head_blocks(rows, V, lowp):
    """(BLOCK_M, BLOCK_V, BLOCK_D, num_warps) for ``rows`` target rows; ``lowp``: 16-bit dots.

    The launcher and benchmarks/compile_report.py both call this, so the report compiles what launches."""
    if interpreting():
        return 16, min(1024, next_power_of_2(V)), 64, 4
    # sm_90 compile report (GPT-2 Large): 16-bit with > 32 rows lowers to wgmma (204 registers with dH, no
    # spill); <= 32 rows to mma_v2, enough there: ~rows FLOP per byte of W, far below the bandwidth ridge.
    block_m = 64 if rows > 32 else (32 if rows > 16 else 16)
    # fp32 (IEEE FMA: no tensor core is IEEE fp32) at 64 rows: BLOCK_D 64 keeps the h and W chunks and the
    # (64, 128) logits tile in registers past the 255 cap (spills with dH); BLOCK_D 32 fits (218, none).
    # BLOCK_V stays 128 everywhere: the dH scratch is read and written once per BLOCK_V columns.
    block_d = 32 if (block_m == 64 and not lowp) else 64
    # <= 16 rows (a few examples, e.g. 8 target rows), 16-bit with dH: at 8 warps ptxas spills 8 B a thread;
    # 4 warps hold the mma_v2 tiles in 168 registers, no spills. fp32 (FMA dots) needs the 8 warps there:
    # at 4 it spills 36 B (compile report).
    warps = 4 if (block_m == 16 and lowp) else 8
    return block_m, 128, block_d, warps


def lm_head_ce_fwd(h, weight, targets, compute_dh):
    """h: (rows, d); weight: (V, d); targets: (rows,) int -> loss (rows,) fp32, dH (rows, d) fp32 or None."""
    require_triton(h, weight, targets)
    check_float(h, "h")
    rows, d = h.shape
    V = weight.shape[0]
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets = targets.to(torch.int64).contiguous()
    if h.dtype in (torch.bfloat16, torch.float16) and weight.dtype == torch.float32:
        # autocast: 16-bit h, fp32 frozen W. Cast W to h's dtype once per call, as autocast does for the
        # matmul (and the torch op does): logits and dH then use the same 16-bit W, on tensor cores
        # (mixed operands would upcast h and run every vocabulary dot as fp32 FMA).
        weight = weight.to(h.dtype)
    lowp = use_lowp_dot(h, weight) and h.dtype == weight.dtype
    block_m, block_v, block_d, warps = lm_head_blocks(rows, V, lowp)
    n_vblocks = triton.cdiv(V, block_v)
    row_blocks = triton.cdiv(rows, block_m)
    n_splits = max(1, min(n_vblocks, triton.cdiv(_num_programs_target(h.device), row_blocks)))
    blocks_per_split = triton.cdiv(n_vblocks, n_splits)
    n_splits = triton.cdiv(n_vblocks, blocks_per_split)  # every split gets >= 1 block
    f32 = dict(device=h.device, dtype=torch.float32)
    m_part = torch.empty(n_splits, rows, **f32)
    s_part = torch.empty(n_splits, rows, **f32)
    t_part = torch.empty(n_splits, rows, **f32)
    a_part = torch.empty(n_splits, rows, d, **f32) if compute_dh else m_part  # scratch, no memset
    if rows > 0:
        _lm_head_ce_fwd_kernel[(row_blocks, n_splits)](
            h, weight, targets, m_part, s_part, t_part, a_part,
            h.stride(0), weight.stride(0), rows, V, d, blocks_per_split,
            COMPUTE_DH=compute_dh, LOWP_DOT=lowp, BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_D=block_d,
            num_warps=warps,
        )
    # merge the splits: lse = m + log(sum_s s_s * exp(m_s - m))
    m = m_part.amax(dim=0)  # (rows,)
    scale = torch.exp(m_part - m)  # (n_splits, rows)
    s = (s_part * scale).sum(dim=0)
    valid = targets >= 0
    loss = torch.where(valid, m + torch.log(s) - t_part.sum(dim=0), 0.0)
    dh = None
    if compute_dh:
        dh = torch.einsum("srd,sr->rd", a_part, scale / s)  # softmax-weighted sum of W rows
        dh -= weight[targets.clamp(min=0)].float()
        dh *= valid[:, None]
    return loss, dh


# Registered as a torch.library custom op (``fastprompt::lm_head_ce``) with a fake implementation, for
# torch.compile and CUDA graphs. Whether to form dH is an argument (a custom op cannot see autograd's
# needs_input_grad): the public function passes grad-mode-and-h-requires-grad; without it dH is empty.
# Backward: dh_r = g_r * (sum_v softmax_v W_v - W_target), with g the upstream per-row gradient; the bracket
# was computed in forward, so this is one scale (plain torch ops). No dW (weight frozen), no dtargets.
@torch.library.custom_op("fastprompt::lm_head_ce", mutates_args=())
def _lm_head_ce_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   compute_dh: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    loss, dh = lm_head_ce_fwd(h, weight, targets, compute_dh)
    return loss, (dh if dh is not None else loss.new_empty(0))


@_lm_head_ce_op.register_fake
def _(h, weight, targets, compute_dh):
    rows, d = h.shape
    loss = h.new_empty(rows, dtype=torch.float32)
    return loss, (h.new_empty(rows, d, dtype=torch.float32) if compute_dh else h.new_empty(0, dtype=torch.float32))


def _lm_head_ce_setup(ctx, inputs, output):
    h, _, _, compute_dh = inputs
    ctx.h_dtype, ctx.compute_dh = h.dtype, compute_dh
    ctx.save_for_backward(output[1])


def _lm_head_ce_backward(ctx, dloss, _ddh):
    if not ctx.compute_dh:
        return None, None, None, None
    (dh,) = ctx.saved_tensors
    return (dh * dloss[:, None]).to(ctx.h_dtype), None, None, None


_lm_head_ce_op.register_autograd(_lm_head_ce_backward, setup_context=_lm_head_ce_setup)


def lm_head_ce(h, weight, targets):
    """Per-row cross-entropy of logits = h @ weight^T against targets, fp32, shape targets.shape.

    h: (..., d) fp32/bf16; weight: (V, d) frozen; targets: (...) int. Never materialises the logits.
    """
    d = h.shape[-1]
    compute_dh = torch.is_grad_enabled() and h.requires_grad
    loss, _ = _lm_head_ce_op(h.reshape(-1, d), weight.detach(), targets.reshape(-1), compute_dh)
    return loss.view(targets.shape)


# ------------------------------------------------------------------- torch reference (the CPU path)
VOCAB_CHUNK = 2048  # vocabulary rows per chunk of the one-pass LM head (a chunk of W stays in cache)


class _LMHeadCERef(torch.autograd.Function):
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


def lm_head_ce_ref(h, weight, targets):
    """Per-row cross-entropy of ``h @ weight^T`` against ``targets``, fp32 (fp64 for fp64 h). h: (rows, d) —
    only the rows that predict a target; weight: (V, d) frozen; targets: (rows,) -> (rows,)."""
    loss = _LMHeadCERef.apply(h.reshape(-1, h.shape[-1]), weight.detach(), targets.reshape(-1))
    return loss.view(targets.shape)


class _LMHeadCESoftcapRef(torch.autograd.Function):
    """loss_r = logsumexp_v(c_rv) - c_r,y_r with soft-capped logits c = cap * tanh(h W^T / cap) (Gemma).

    The same one pass over the vocabulary as ``_LMHeadCERef`` (chunks of W, online softmax, the gradient formed
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


def lm_head_ce_softcap_ref(h, weight, targets, cap):
    """``lm_head_ce`` on soft-capped logits ``cap * tanh(h @ weight^T / cap)`` (rows,) fp32."""
    loss = _LMHeadCESoftcapRef.apply(h.reshape(-1, h.shape[-1]), weight.detach(), targets.reshape(-1), float(cap))
    return loss.view(targets.shape)
