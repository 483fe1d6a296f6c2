"""Per-op micro-benchmarks at GPT-2 Large (and, for the other families' ops, SmolLM2-135M) shapes: Triton
kernel vs the torch reference (fastprompt.engines.ops, from each op's fastprompt/kernels/<op>.py).

    pytest benchmarks/bench_ops.py --benchmark-only -m gpu

Each op is timed forward + input-gradient backward (the fused engine's use), bf16, on CUDA; the
torch op (what kernels='torch' runs) is timed the same way in the same run (same warm-up, CUDA-synchronised rounds).
benchmark.extra_info records the device, dtype, and achieved GB/s (memory-bound ops) or TFLOP/s
(GEMM-bound ops) from the median. On a machine without CUDA every test skips (no device query at
import time: the `cuda` fixture checks lazily).
"""
import pytest
import torch

ROWS, D, V, HEADS = 330, 1280, 50257, 20  # GPT-2 Large, a batch-64 packed row block
HEAD_DIM = D // HEADS
DTYPE = torch.bfloat16

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from fastprompt import kernels

    if not kernels.TRITON_AVAILABLE:
        pytest.skip("needs triton")
    return torch.device("cuda")


def _run(benchmark, step, *, bytes_moved=None, flops=None, warmup=5, rounds=50):
    """Warm up (compiles Triton), then time `step` with a synchronise at the end of each call."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)
    med = benchmark.stats.stats.median
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    benchmark.extra_info["dtype"] = str(DTYPE)
    if bytes_moved is not None:
        benchmark.extra_info["GB/s"] = round(bytes_moved / med / 1e9, 1)
    if flops is not None:
        benchmark.extra_info["TFLOP/s"] = round(flops / med / 1e12, 2)


def _fwd_bwd(fn, inputs, n_outs=1):
    """Forward + backward w.r.t. `inputs` under fixed random upstream gradients."""
    grads_out = {}

    def step():
        outs = fn()
        outs = outs if n_outs > 1 else (outs,)
        if not grads_out:
            grads_out["g"] = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, inputs, grads_out["g"])

    return step


def _ln_bytes():
    e = ROWS * D * 2
    return e * 3 + e * 5  # fwd: x, r in, y, h out (+h reread); bwd: dy, dh, h in, dx, dr out (approx.)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_add_layer_norm(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.add_layer_norm if impl == "triton" else ops.add_layer_norm
    x = torch.randn(ROWS, D, device=cuda, dtype=DTYPE, requires_grad=True)
    r = torch.randn(ROWS, D, device=cuda, dtype=DTYPE, requires_grad=True)
    w, b = torch.ones(D, device=cuda, dtype=DTYPE), torch.zeros(D, device=cuda, dtype=DTYPE)
    _run(benchmark, _fwd_bwd(lambda: fn(x, r, w, b), (x, r), n_outs=2), bytes_moved=_ln_bytes())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bias_gelu(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.bias_gelu if impl == "triton" else ops.bias_gelu
    x = torch.randn(ROWS, 4 * D, device=cuda, dtype=DTYPE, requires_grad=True)
    b = torch.randn(4 * D, device=cuda, dtype=DTYPE)
    e = ROWS * 4 * D * 2
    _run(benchmark, _fwd_bwd(lambda: fn(x, b), (x,)), bytes_moved=2 * e + 3 * e)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_mlp_up(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.linear if impl == "triton" else ops.linear
    x = torch.randn(ROWS, D, device=cuda, dtype=DTYPE, requires_grad=True)
    w = torch.randn(D, 4 * D, device=cuda, dtype=DTYPE) * D**-0.5
    b = torch.zeros(4 * D, device=cuda, dtype=DTYPE)
    # both compute dx only (w is frozen)
    _run(benchmark, _fwd_bwd(lambda: fn(x, w, b), (x,)), flops=2 * 2 * ROWS * D * 4 * D)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_lm_head_ce(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.lm_head_ce if impl == "triton" else ops.lm_head_ce
    h = torch.randn(ROWS, D, device=cuda, dtype=DTYPE, requires_grad=True)
    w = torch.randn(V, D, device=cuda, dtype=DTYPE) * 0.05
    t = torch.randint(0, V, (ROWS,), device=cuda)
    # logits GEMM + dH GEMM (both form dH in the forward's pass over the vocabulary)
    _run(benchmark, _fwd_bwd(lambda: fn(h, w, t), (h,)), flops=2 * 2 * ROWS * V * D)


def _tree(device):
    n_context, n_trunk = 3, 7  # "Here are two" + 4 prompt rows
    seg_lens = [5 + (i % 3) for i in range(64)]  # batch 64, 5-7 suffix rows each
    cu = [n_trunk]
    for n in seg_lens:
        cu.append(cu[-1] + n)
    return n_context, n_trunk, torch.tensor(cu, device=device, dtype=torch.int32)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_tree_attention(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops
    from fastprompt.engines.tree import tree_mask

    fn = ops.bounded_tree_attention(kernels.tree_attention) if impl == "triton" else ops.tree_attention
    n_context, n_trunk, cu = _tree(cuda)
    nk = int(cu[-1])
    nq = nk - n_context
    q = torch.randn(nq, HEADS, HEAD_DIM, device=cuda, dtype=DTYPE, requires_grad=True)
    k = torch.randn(nk, HEADS, HEAD_DIM, device=cuda, dtype=DTYPE, requires_grad=True)
    v = torch.randn(nk, HEADS, HEAD_DIM, device=cuda, dtype=DTYPE, requires_grad=True)
    visible = int(tree_mask(nq, nk, n_trunk, cu).sum())
    # useful FLOPs only (visible pairs): fwd 2 GEMMs, bwd 5 GEMM-equivalents (incl. recompute of S)
    flops = 2 * HEAD_DIM * HEADS * visible * (2 + 5)
    _run(benchmark, _fwd_bwd(lambda: fn(q, k, v, n_trunk, cu), (q, k, v)), flops=flops)


# The other families' ops at SmolLM2-135M shapes (d 576, 9 query heads of 64, 3 K/V heads, MLP 1536).
S_D, S_HEADS, S_KV, S_HEAD_DIM, S_MLP = 576, 9, 3, 64, 1536


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_add_rms_norm(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.add_rms_norm if impl == "triton" else ops.add_rms_norm
    x = torch.randn(ROWS, S_D, device=cuda, dtype=DTYPE, requires_grad=True)
    r = torch.randn(ROWS, S_D, device=cuda, dtype=DTYPE, requires_grad=True)
    w = torch.ones(S_D, device=cuda, dtype=DTYPE)
    e = ROWS * S_D * 2
    _run(benchmark, _fwd_bwd(lambda: fn(x, r, w, 1e-5), (x, r), n_outs=2), bytes_moved=e * 4 + e * 4)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rotary(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.rotary if impl == "triton" else ops.rotary
    q = torch.randn(ROWS, S_HEADS, S_HEAD_DIM, device=cuda, dtype=DTYPE, requires_grad=True)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, S_HEAD_DIM, 2, device=cuda) / S_HEAD_DIM)
    cos, sin = ops.rotary_tables(torch.arange(ROWS, device=cuda), inv_freq)
    e = q.numel() * 2
    _run(benchmark, _fwd_bwd(lambda: fn(q, cos, sin), (q,)), bytes_moved=4 * e)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gated_act(benchmark, cuda, impl):
    from fastprompt import kernels
    from fastprompt.engines import ops

    fn = kernels.gated_act if impl == "triton" else ops.gated_act
    gu = torch.randn(ROWS, 2 * S_MLP, device=cuda, dtype=DTYPE, requires_grad=True)
    e = ROWS * S_MLP * 2
    _run(benchmark, _fwd_bwd(lambda: fn(gu, "silu"), (gu,)), bytes_moved=3 * e + 5 * e)
