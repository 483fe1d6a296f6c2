"""Attention backends for the fused engine's tree layout, behind the ``tree_attention`` signature.

Order of preference on CUDA: flash-attn's varlen kernel (optional extra, when installed) > our Triton
tree-attention kernel (fastprompt.kernels) > torch (dense tree mask). The CLI prints which one runs.

flash-attn knows nothing of trees, but its varlen API with a bottom-right-aligned causal mask (flash-attn
>= 2.1: "if seqlen_q != seqlen_k ... the causal mask is aligned to the bottom right corner") expresses
the tree exactly once each example's keys are gathered as [trunk keys; own segment keys]:

    sequence 0       queries: the trunk rows           keys: trunk keys [0, n_trunk)
    sequence 1 + b   queries: segment b's rows         keys: trunk keys, then segment b's keys

With the causal mask aligned bottom-right, query i of a sequence with q_len queries and k_len keys sees
keys j <= i + k_len - q_len: the whole trunk and its own earlier rows: the tree mask. The gather costs
B * n_trunk extra key rows (n_trunk is ~7 for the post's template) and autograd's index_select backward
sums the trunk keys' gradients over the examples. The index tensors are built on the device without a
host sync, so the call can sit inside a CUDA graph.

flash-attn cannot be installed on the machines this project is developed and tested on: this path is
written against its documented API (``flash_attn.flash_attn_varlen_func``) and its layout logic is
tested on the CPU with a reference varlen attention, but it has not run against flash-attn itself.
"""
from __future__ import annotations

import math

import torch

from .tree import key_segments

try:  # optional extra: pip install 'fastprompt[flash-attn]'
    from flash_attn import flash_attn_varlen_func
except Exception:  # ImportError, or a binary built for another torch
    flash_attn_varlen_func = None

FLASH_ATTN_AVAILABLE = flash_attn_varlen_func is not None


def varlen_layout(n_queries: int, n_keys: int, n_trunk: int, cu_seqlens: torch.Tensor):
    """Gather indices and offsets that turn the tree into B + 1 independent causal sequences.

    Returns ``key_index`` (total_k,), ``cu_q`` and ``cu_k`` (B + 2,) int32, ``max_q``, ``max_k`` (ints:
    upper bounds from the shapes, so nothing is read back from the device).
    """
    device = cu_seqlens.device
    cu = cu_seqlens.to(torch.long)
    n_context = n_keys - n_queries
    n_segments = cu.shape[0] - 1
    seg_len = cu[1:] - cu[:-1]  # (B,)
    trunk = torch.full((1,), n_trunk, dtype=torch.long, device=device)
    k_len = torch.cat([trunk, seg_len + n_trunk])  # (B + 1,)
    q_len = torch.cat([trunk - n_context, seg_len])
    zero = torch.zeros(1, dtype=torch.long, device=device)
    cu_k = torch.cat([zero, k_len.cumsum(0)])  # (B + 2,)
    cu_q = torch.cat([zero, q_len.cumsum(0)])
    total_k = n_trunk * (n_segments + 1) + (n_keys - n_trunk)
    key_index = torch.empty(total_k, dtype=torch.long, device=device)
    trunk_rows = torch.arange(n_trunk, device=device)
    trunk_slots = (cu_k[:-1, None] + trunk_rows[None, :]).flatten()  # each sequence starts with the trunk
    key_index[trunk_slots] = trunk_rows.repeat(n_segments + 1)
    own = torch.arange(n_trunk, n_keys, device=device)  # key rows in segments
    segment = key_segments(n_keys, n_trunk, cu)[n_trunk:]  # (Nk - n_trunk,)
    key_index[cu_k[segment + 1] + n_trunk + (own - cu[segment])] = own
    max_q = max(n_trunk - n_context, n_queries - (n_trunk - n_context))
    max_k = n_trunk + (n_keys - n_trunk)
    return key_index, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k


def varlen_tree_attention(q, k, v, n_trunk, cu_seqlens, scale=None, varlen_fn=None):
    """Tree attention through a varlen causal attention function (flash-attn's by default).
    ``varlen_fn`` has flash_attn_varlen_func's signature; tests pass a torch reference."""
    fn = varlen_fn or flash_attn_varlen_func
    if fn is None:
        raise RuntimeError("flash-attn is not installed: pip install 'fastprompt[flash-attn]' (needs a CUDA GPU), "
                           "or use the Triton/torch attention")
    n_queries, n_keys, _, head_dim = q.shape[0], k.shape[0], q.shape[1], q.shape[2]
    key_index, cu_q, cu_k, max_q, max_k = varlen_layout(n_queries, n_keys, n_trunk, cu_seqlens)
    # query rows are already ordered trunk, segment 0, segment 1, ...: no gather needed for q
    k_seq, v_seq = k.index_select(0, key_index), v.index_select(0, key_index)  # (total_k, H, D)
    return fn(q, k_seq, v_seq, cu_q, cu_k, max_q, max_k, dropout_p=0.0,
              softmax_scale=scale if scale is not None else 1.0 / math.sqrt(head_dim), causal=True)


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                         softmax_scale=None, causal=True):
    """Plain-torch stand-in for ``flash_attn_varlen_func`` (causal aligned bottom-right; GQA as flash-attn
    takes it: fewer K/V heads than query heads), for tests."""
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = torch.empty_like(q)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        qs, ks, vs = q[cq[s] : cq[s + 1]], k[ck[s] : ck[s + 1]], v[ck[s] : ck[s + 1]]
        n_q, n_k = qs.shape[0], ks.shape[0]
        if n_q == 0:
            continue
        scores = torch.einsum("qhd,khd->hqk", qs.float(), ks.float()) * scale
        if causal:
            allowed = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
            scores = scores.masked_fill(~allowed.to(scores.device), float("-inf"))
        out[cq[s] : cq[s + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs.float()).to(q.dtype)
    return out
