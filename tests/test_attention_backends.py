"""The tree mask every backend shares (engines/tree.py), and the flash-attn varlen path's layout logic,
checked on the CPU with a torch stand-in for flash-attn."""
import pytest
import torch

from fastprompt.engines import tree
from fastprompt.engines.attention import varlen_attention_ref, varlen_layout, varlen_tree_attention
from fastprompt.engines.ops import tree_attention as torch_tree_attention

from helpers import rel_err


@pytest.mark.parametrize("n_context, n_trunk_rows, seg_lens", [
    (3, 4, [2, 1, 5]), (0, 7, [1]), (2, 0, [3, 4]), (3, 4, []), (1, 2, [0, 3, 0, 1]),
])
def test_varlen_gather_equals_tree_attention(n_context, n_trunk_rows, seg_lens):
    torch.manual_seed(0)
    n_trunk = n_context + n_trunk_rows
    nk = n_trunk + sum(seg_lens)
    nq = nk - n_context
    if nq == 0:
        pytest.skip("no queries")
    H, D = 3, 16
    q = torch.randn(nq, H, D, requires_grad=True)
    k = torch.randn(nk, H, D, requires_grad=True)
    v = torch.randn(nk, H, D, requires_grad=True)
    cu = torch.tensor([n_trunk] + [n_trunk + sum(seg_lens[: i + 1]) for i in range(len(seg_lens))])
    ref = torch_tree_attention(q, k, v, n_trunk, cu, 0.25)
    out = varlen_tree_attention(q, k, v, n_trunk, cu, 0.25, varlen_fn=varlen_attention_ref)
    assert rel_err(out, ref) < 1e-6
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    g_out = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(g_out, g_ref):
        assert rel_err(a, b) < 1e-6


def test_varlen_layout_offsets():
    cu = torch.tensor([5, 7, 8])  # trunk of 5 keys (2 of them prefix), segments of 2 and 1 rows
    key_index, cu_q, cu_k, max_q, max_k = varlen_layout(6, 8, 5, cu)
    assert cu_q.tolist() == [0, 3, 5, 6] and cu_k.tolist() == [0, 5, 12, 18]
    assert key_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 7]
    assert max_q >= 3 and max_k >= 7


def test_tree_mask_and_segment_bounds():
    # prefix 1, trunk 3, segments [2, 1]: key rows 0..5; queries at key indices 1..5
    cu = torch.tensor([3, 5, 6])
    m = tree.tree_mask(5, 6, 3, cu)
    expect = torch.tensor([
        [1, 1, 0, 0, 0, 0],  # trunk query at key 1: causal in the trunk
        [1, 1, 1, 0, 0, 0],  # trunk query at key 2
        [1, 1, 1, 1, 0, 0],  # segment 0, first row: whole trunk + itself
        [1, 1, 1, 1, 1, 0],  # segment 0, second row
        [1, 1, 1, 0, 0, 1],  # segment 1: trunk + itself, not segment 0
    ], dtype=torch.bool)
    assert torch.equal(m, expect)
    seg_start, seg_end = tree.segment_bounds(6, 3, cu)  # what the kernels walk: the same mask
    assert seg_start.tolist() == [0, 0, 0, 3, 3, 5] and seg_end.tolist() == [6, 6, 6, 5, 5, 6]
