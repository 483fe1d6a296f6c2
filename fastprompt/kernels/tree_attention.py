"""Tree attention over a packed row block (shared trunk + independent segments), FlashAttention-style.

Rows. q: (Nq, H, D); k, v: (Nk, H, D), Nk >= Nq. Query row r sits at key index i = r + n_context,
n_context = Nk - Nq: the first n_context key rows are the constant context, keys without queries.
Key rows [0, n_trunk) are the shared trunk; cu_seqlens (B+1,) with cu[0] = n_trunk, cu[-1] = Nk cuts
the rest into segments b = [cu[b], cu[b+1]). Query at key index i sees key j iff

    j <= i  and  (j < n_trunk  or  j >= seg_start(i))

with seg_start(i) the first key row of i's segment (a trunk query has j <= i < n_trunk anyway; the
bounds come from fastprompt/engines/tree.py, which states the mask for every backend). So a
trunk query is plain causal over the trunk; a segment query sees the whole trunk and its own segment
causally. Every query sees at least itself: no empty softmax rows.

Forward: one program per (query block, head); two key loops, one over the trunk [0, min(n_trunk,
last query + 1)) and one from the earliest segment start of the block to the last query, with the
mask above applied per element; online softmax in base 2, fp32 accumulators, LSE saved for backward.
Backward: a dq kernel (same loops as forward) and a dk/dv kernel parallel over key blocks that loops
over every query able to see its keys (key j: queries [max(j, n_context), seg_end(j)), with seg_end = Nk
for trunk keys), so trunk keys' dk/dv sum over all segments without atomics: race-free, deterministic.
"""
import math
from typing import Tuple

import torch

from ._common import check_float, interpreting, next_power_of_2, require_triton, tl, triton, use_lowp_dot

_LOG2E = 1.4426950408889634


@triton.jit
def _fwd_block(acc, m_i, l_i, q, K, V, k_head, v_head, stride_kr, stride_vr, j0, j_lo, j_hi,
               qi, seg_lo, row_mask, offs_d, d_mask, n_trunk, qk_scale,
               LOWP_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block [j0, j0 + BLOCK_N) clipped to [j_lo, j_hi) into the online softmax."""
    offs_n = j0 + tl.arange(0, BLOCK_N)
    n_ok = (offs_n >= j_lo) & (offs_n < j_hi)
    kt = tl.load(K + k_head + offs_n.to(tl.int64)[None, :] * stride_kr + offs_d[:, None],
                 mask=n_ok[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
    v = tl.load(V + v_head + offs_n.to(tl.int64)[:, None] * stride_vr + offs_d[None, :],
                mask=n_ok[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    if LOWP_DOT:
        s = tl.dot(q, kt)
    else:
        s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
    s = s * qk_scale  # base-2 logits
    vis = (n_ok[None, :] & row_mask[:, None] & (offs_n[None, :] <= qi[:, None])
           & ((offs_n[None, :] < n_trunk) | (offs_n[None, :] >= seg_lo[:, None])))
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet: no NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if LOWP_DOT:
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    else:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _tree_attn_fwd_kernel(
    Q, K, V,  # (Nq, H, D), (Nk, H, D), (Nk, H, D); last dim contiguous
    O,  # (Nq, H, D) output
    LSE,  # (H, Nq) fp32 out: log2-sum-exp of the base-2 logits (for backward)
    SEG_START,  # (Nk,) int32 first visible key row of each key row's segment (0 in the trunk)
    stride_qr, stride_qh,  # elements between rows / heads of Q
    stride_kr, stride_kh,  # ... of K
    stride_vr, stride_vh,  # ... of V
    stride_or, stride_oh,  # ... of O
    Nq,  # query rows
    n_context,  # Nk - Nq: key rows without queries
    n_trunk,  # shared trunk rows
    D,  # head dim
    qk_scale,  # softmax scale * log2(e)
    LOWP_DOT: tl.constexpr,  # 16-bit tl.dot (GPU) or fp32 IEEE
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # query / key tile
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    qi = offs_m + n_context  # key index of each query
    q = tl.load(Q + head * stride_qh + offs_m.to(tl.int64)[:, None] * stride_qr + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    if not LOWP_DOT:
        q = q.to(tl.float32)
    seg_lo = tl.load(SEG_START + qi, mask=row_mask, other=0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_head = head * stride_kh
    v_head = head * stride_vh
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Nq) + n_context  # one past the block's last query
    trunk_hi = tl.minimum(n_trunk, hi)
    for j0 in range(0, trunk_hi, BLOCK_N):  # trunk keys
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, k_head, v_head, stride_kr, stride_vr,
                                   j0, 0, trunk_hi, qi, seg_lo, row_mask, offs_d, d_mask, n_trunk,
                                   qk_scale, LOWP_DOT, BLOCK_N)
    seg_lo_min = tl.min(tl.where(row_mask, seg_lo, hi), axis=0)
    for j0 in range(tl.maximum(n_trunk, seg_lo_min), hi, BLOCK_N):  # the block's segments' keys
        acc, m_i, l_i = _fwd_block(acc, m_i, l_i, q, K, V, k_head, v_head, stride_kr, stride_vr,
                                   j0, n_trunk, hi, qi, seg_lo, row_mask, offs_d, d_mask, n_trunk,
                                   qk_scale, LOWP_DOT, BLOCK_N)
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + head * stride_oh + offs_m.to(tl.int64)[:, None] * stride_or + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LSE + head * Nq + offs_m, m_i + tl.log2(l_safe), mask=row_mask)


# Backward. With s_ij = scale * q_i . k_j over visible pairs, P_ij = exp(s_ij - lse_i), O_i = sum_j P_ij v_j:
#     dv_j  = sum_i P_ij dO_i
#     dP_ij = dO_i . v_j
#     dS_ij = P_ij (dP_ij - Delta_i),     Delta_i = sum_j P_ij dP_ij = dO_i . O_i
#     dq_i  = scale * sum_j dS_ij k_j
#     dk_j  = scale * sum_i dS_ij q_i
# (base 2 internally: P = exp2(s * log2(e) - lse2)). Invisible pairs have P = 0 and contribute nothing.
@triton.jit
def _dq_block(dq, q, do, lse2, delta, K, V, k_head, v_head, stride_kr, stride_vr, j0, j_lo, j_hi,
              qi, seg_lo, row_mask, offs_d, d_mask, n_trunk, qk_scale,
              LOWP_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = j0 + tl.arange(0, BLOCK_N)
    n_ok = (offs_n >= j_lo) & (offs_n < j_hi)
    k = tl.load(K + k_head + offs_n.to(tl.int64)[:, None] * stride_kr + offs_d[None, :],
                mask=n_ok[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    vt = tl.load(V + v_head + offs_n.to(tl.int64)[None, :] * stride_vr + offs_d[:, None],
                 mask=n_ok[None, :] & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
    if not LOWP_DOT:
        k = k.to(tl.float32)
        vt = vt.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        dp = tl.dot(do, vt, input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
        dp = tl.dot(do, vt)
    vis = (n_ok[None, :] & row_mask[:, None] & (offs_n[None, :] <= qi[:, None])
           & ((offs_n[None, :] < n_trunk) | (offs_n[None, :] >= seg_lo[:, None])))
    p = tl.exp2(tl.where(vis, s * qk_scale - lse2[:, None], float("-inf")))  # 0 where invisible, no overflow
    ds = p * (dp - delta[:, None])
    if LOWP_DOT:
        dq = tl.dot(ds.to(k.dtype), k, dq)
    else:
        dq = tl.dot(ds, k, dq, input_precision="ieee")
    return dq


@triton.jit
def _tree_attn_dq_kernel(
    Q, K, V, DO,  # (Nq, H, D), (Nk, H, D), (Nk, H, D), (Nq, H, D)
    DQ,  # (Nq, H, D) output
    LSE,  # (H, Nq) fp32 saved log2-sum-exp
    DELTA,  # (H, Nq) fp32 rowsum(dO * O)
    SEG_START,  # (Nk,) int32
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,  # row / head strides
    stride_dor, stride_doh, stride_dqr, stride_dqh,
    Nq, n_context, n_trunk, D,
    scale,  # softmax scale (natural units)
    qk_scale,  # scale * log2(e)
    LOWP_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < Nq
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    qd_mask = row_mask[:, None] & d_mask[None, :]
    qi = offs_m + n_context
    rows64 = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + head * stride_qh + rows64 * stride_qr + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + head * stride_doh + rows64 * stride_dor + offs_d[None, :], mask=qd_mask, other=0.0)
    if not LOWP_DOT:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + head * Nq + offs_m, mask=row_mask, other=0.0)
    delta = tl.load(DELTA + head * Nq + offs_m, mask=row_mask, other=0.0)
    seg_lo = tl.load(SEG_START + qi, mask=row_mask, other=0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_head = head * stride_kh
    v_head = head * stride_vh
    hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, Nq) + n_context
    trunk_hi = tl.minimum(n_trunk, hi)
    for j0 in range(0, trunk_hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, K, V, k_head, v_head, stride_kr, stride_vr, j0, 0, trunk_hi,
                       qi, seg_lo, row_mask, offs_d, d_mask, n_trunk, qk_scale, LOWP_DOT, BLOCK_N)
    seg_lo_min = tl.min(tl.where(row_mask, seg_lo, hi), axis=0)
    for j0 in range(tl.maximum(n_trunk, seg_lo_min), hi, BLOCK_N):
        dq = _dq_block(dq, q, do, lse2, delta, K, V, k_head, v_head, stride_kr, stride_vr, j0, n_trunk, hi,
                       qi, seg_lo, row_mask, offs_d, d_mask, n_trunk, qk_scale, LOWP_DOT, BLOCK_N)
    tl.store(DQ + head * stride_dqh + rows64 * stride_dqr + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _tree_attn_dkdv_kernel(
    Q, K, V, DO,  # (Nq, H, D), (Nk, H, D), (Nk, H, D), (Nq, H, D)
    DK, DV,  # (Nk, H, D) outputs
    LSE, DELTA,  # (H, Nq) fp32
    SEG_START,  # (Nk,) int32 per key row: first key row of its segment (0 in the trunk)
    SEG_END,  # (Nk,) int32 per key row: one past the last key index whose query sees it (Nk in trunk)
    stride_qr, stride_qh, stride_kr, stride_kh, stride_vr, stride_vh,
    stride_dor, stride_doh, stride_dkr, stride_dkh, stride_dvr, stride_dvh,
    Nq, Nk, n_context, n_trunk, D, scale, qk_scale,
    LOWP_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Nk
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    kd_mask = n_mask[:, None] & d_mask[None, :]
    keys64 = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + head * stride_kh + keys64 * stride_kr + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + head * stride_vh + keys64 * stride_vr + offs_d[None, :], mask=kd_mask, other=0.0)
    if not LOWP_DOT:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # queries (as key indices) that can see any key of this block: [max(first key, n_context), max seg_end)
    i_lo = tl.maximum(pid_n * BLOCK_N, n_context)
    i_hi = tl.max(tl.load(SEG_END + offs_n, mask=n_mask, other=0), axis=0)
    for i0 in range(i_lo, i_hi, BLOCK_M):
        offs_i = i0 + tl.arange(0, BLOCK_M)  # key index of the queries
        i_mask = offs_i < i_hi
        rows = offs_i - n_context  # query rows, >= 0
        rows64 = rows.to(tl.int64)[:, None]
        qd_mask = i_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + head * stride_qh + rows64 * stride_qr + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + head * stride_doh + rows64 * stride_dor + offs_d[None, :], mask=qd_mask, other=0.0)
        lse2 = tl.load(LSE + head * Nq + rows, mask=i_mask, other=0.0)
        delta = tl.load(DELTA + head * Nq + rows, mask=i_mask, other=0.0)
        seg_lo = tl.load(SEG_START + offs_i, mask=i_mask, other=0)
        if LOWP_DOT:
            st = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M)
            dpt = tl.dot(v, tl.trans(do))
        else:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            st = tl.dot(k, tl.trans(q), input_precision="ieee")
            dpt = tl.dot(v, tl.trans(do), input_precision="ieee")
        vis = (n_mask[:, None] & i_mask[None, :] & (offs_n[:, None] <= offs_i[None, :])
               & ((offs_n[:, None] < n_trunk) | (offs_n[:, None] >= seg_lo[None, :])))
        pt = tl.exp2(tl.where(vis, st * qk_scale - lse2[None, :], float("-inf")))  # P^T (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        if LOWP_DOT:
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dk = tl.dot(dst.to(q.dtype), q, dk)
        else:
            dv = tl.dot(pt, do, dv, input_precision="ieee")
            dk = tl.dot(dst, q, dk, input_precision="ieee")
    tl.store(DK + head * stride_dkh + keys64 * stride_dkr + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + head * stride_dvh + keys64 * stride_dvr + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kd_mask)


def attention_blocks(block_d, kernel, lowp):
    """(BLOCK_M, BLOCK_N, num_warps) of ``kernel`` ('fwd' | 'dq' | 'dkdv') for head dim ``block_d``.

    The launchers and benchmarks/compile_report.py both call this, so the report compiles what launches."""
    if interpreting():
        return 16, 16, 4  # tl.dot needs >= 16; small tiles keep the interpreter quick
    if not lowp:
        # fp32: IEEE dots on CUDA cores (no tensor core is IEEE fp32), every tile operand in registers.
        # sm_90 compile report, D = 64: 64x64 at 4 warps spills 30-50 KB a thread (fwd, dq) and 4.6 KB
        # (dkdv); 32-query tiles at 8 warps fit: fwd/dq 32x64 78 registers, dkdv 32x32 76, no spills,
        # 16-24 warps an SM, and 32-row tiles give more programs to fill 132 SMs at a few hundred rows.
        if block_d > 64:
            return 16, 32, 8
        return (32, 32, 8) if kernel == "dkdv" else (32, 64, 8)
    if kernel == "dkdv" and block_d > 128:
        # D = 256 (Gemma 3): 32x32 at 4 warps needs 255 registers and spills 12 B a thread (dK, dV, K, V
        # tiles of 32 x 256 in fp32/bf16); 8 warps spread them: 139 registers, no spills (compile report).
        return 32, 32, 8
    if kernel != "fwd" and block_d > 64:
        return 32, 32, 4
    # 16-bit, D = 64: 64x64 tiles lower to wgmma (64-row warpgroup tiles). A step's grid is about
    # cdiv(rows, 64) x heads, ~100 programs at ~260 rows and 20 heads: under one wave on 132 SMs, so an
    # SM mostly runs one program and its warps are all the latency hiding there is. 8 warps instead of 4:
    # fwd/dq 166 -> 128 registers, dkdv 226 -> 215, no spills (compile report).
    return 64, 64, 8


def tree_attn_fwd(q, k, v, n_trunk, seg_start, seg_end, scale):
    """Returns o (Nq, H, D), lse2 (H, Nq) fp32."""
    require_triton(q, k, v)
    check_float(q, "q")
    nq, nh, d = q.shape
    nk = k.shape[0]
    if k.shape != (nk, nh, d) or v.shape != k.shape or nk < nq:
        raise ValueError(f"tree_attention: bad shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    block_d = next_power_of_2(d)
    if block_d > 256:
        raise ValueError(f"tree_attention supports head dim <= 256, got {d}")
    _check_bounds(seg_start, seg_end, nk, q.device)
    o = torch.empty_like(q)
    lse = torch.empty(nh, nq, device=q.device, dtype=torch.float32)
    lowp = use_lowp_dot(q, k, v)
    bm, bn, warps = attention_blocks(block_d, "fwd", lowp)
    if nq > 0:
        _tree_attn_fwd_kernel[(triton.cdiv(nq, bm), nh)](
            q, k, v, o, lse, seg_start,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            o.stride(0), o.stride(1), nq, nk - nq, n_trunk, d, scale * _LOG2E,
            LOWP_DOT=lowp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps,
        )
    return o, lse


def tree_attn_bwd(do, q, k, v, o, lse, seg_start, seg_end, n_trunk, scale, need_dq, need_dkdv):
    nq, nh, d = q.shape
    nk = k.shape[0]
    block_d = next_power_of_2(d)
    do = do.contiguous()
    delta = (o.float() * do.float()).sum(-1).t().contiguous()  # (H, Nq) fp32
    lowp = use_lowp_dot(q, k, v, do)
    dq = dk = dv = None
    if need_dq:
        bm, bn, warps = attention_blocks(block_d, "dq", lowp)
        dq = torch.empty_like(q)
        if nq > 0:
            _tree_attn_dq_kernel[(triton.cdiv(nq, bm), nh)](
                q, k, v, do, dq, lse, delta, seg_start,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
                nq, nk - nq, n_trunk, d, scale, scale * _LOG2E,
                LOWP_DOT=lowp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps,
            )
    if need_dkdv:
        bm, bn, warps = attention_blocks(block_d, "dkdv", lowp)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        if nk > 0:
            _tree_attn_dkdv_kernel[(triton.cdiv(nk, bn), nh)](
                q, k, v, do, dk, dv, lse, delta, seg_start, seg_end,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                nq, nk, nk - nq, n_trunk, d, scale, scale * _LOG2E,
                LOWP_DOT=lowp, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, num_warps=warps,
            )
    return dq, dk, dv


# Registered as torch.library custom ops (``fastprompt::tree_attention``, ``fastprompt::tree_attention_bwd``)
# with fake implementations, for torch.compile and CUDA graphs. Gradients not asked for come back empty.
@torch.library.custom_op("fastprompt::tree_attention", mutates_args=())
def _tree_attn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_trunk: int, seg_start: torch.Tensor,
                  seg_end: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    return tree_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), n_trunk, seg_start, seg_end, scale)


@torch.library.custom_op("fastprompt::tree_attention_bwd", mutates_args=())
def _tree_attn_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                      lse: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor, n_trunk: int, scale: float,
                      need_dq: bool, need_dkdv: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = tree_attn_bwd(do, q.contiguous(), k.contiguous(), v.contiguous(), o, lse, seg_start, seg_end,
                               n_trunk, scale, need_dq, need_dkdv)
    empty = q.new_empty(0)
    return (dq if dq is not None else empty), (dk if dk is not None else empty.clone()), \
        (dv if dv is not None else empty.clone())


@_tree_attn_op.register_fake
def _(q, k, v, n_trunk, seg_start, seg_end, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@_tree_attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, seg_start, seg_end, n_trunk, scale, need_dq, need_dkdv):
    return (q.new_empty(q.shape) if need_dq else q.new_empty(0), k.new_empty(k.shape) if need_dkdv else q.new_empty(0),
            v.new_empty(v.shape) if need_dkdv else q.new_empty(0))


def _tree_attn_setup(ctx, inputs, output):
    q, k, v, n_trunk, seg_start, seg_end, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seg_start, seg_end)
    ctx.n_trunk, ctx.scale = n_trunk, scale


def _tree_attn_backward(ctx, do, _dlse):
    q, k, v, o, lse, seg_start, seg_end = ctx.saved_tensors
    need_dq = ctx.needs_input_grad[0]
    need_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dq, dk, dv = _tree_attn_bwd_op(do, q, k, v, o, lse, seg_start, seg_end, ctx.n_trunk, ctx.scale,
                                   need_dq, need_dkdv)
    return (dq if need_dq else None, dk if ctx.needs_input_grad[1] else None,
            dv if ctx.needs_input_grad[2] else None, None, None, None, None)


_tree_attn_op.register_autograd(_tree_attn_backward, setup_context=_tree_attn_setup)


def _check_bounds(seg_start, seg_end, n_keys, device):
    for name, t in (("seg_start", seg_start), ("seg_end", seg_end)):
        if t.shape != (n_keys,) or t.dtype != torch.int32 or t.device != device:
            raise ValueError(f"tree_attention: {name} must be an int32 ({n_keys},) tensor on {device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def tree_attention(q, k, v, n_trunk, seg_start, seg_end, scale=None):
    """Attention over a packed row block shaped as a tree (see the module docstring for the mask).

    q: (Nq, H, D); k, v: (Nk, H, D) with Nk >= Nq, fp32/bf16; n_trunk: int; seg_start, seg_end: (Nk,)
    int32 per-key-row bounds of the tree mask, as fastprompt/engines/tree.py ``segment_bounds`` computes
    them from the segments' offsets (this folder imports nothing from fastprompt). Returns o (Nq, H, D)
    in q's dtype.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _tree_attn_op(q, k, v, int(n_trunk), seg_start, seg_end, float(scale))[0]
