"""fastprompt.kernels against the torch ops (fastprompt.engines.ops: the one torch implementation of each op).

CPU: Triton runs in the interpreter (the root conftest.py sets TRITON_INTERPRET=1), shapes stay small.
fp32: kernel vs the torch op in fp64, ~1e-5 relative. bf16: kernel on bf16 inputs vs the fp64
torch op on the same (bf16-rounded) inputs, error at most 2x the torch op's own error in bf16 (+ one bf16 ulp
of the output's scale). Backward always driven by a random upstream gradient; NaN never passes.
`gpu` tests repeat the bf16 checks on CUDA (compiled kernels, 16-bit tensor-core dots).
"""
import os
import subprocess
import sys

import pytest
import torch

from fastprompt import kernels as K
from fastprompt.engines import ops as T
from fastprompt.engines import tree

K_tree_attention = T.bounded_tree_attention(K.tree_attention)  # the kernel takes the bounds tree.py computes

pytestmark = pytest.mark.skipif(not K.TRITON_AVAILABLE, reason="needs triton")

DTYPES = [torch.float32, torch.bfloat16]
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _grads(outs, ins, gouts):
    ins = [t for t in ins if t is not None]
    return torch.autograd.grad(outs, ins, gouts, allow_unused=True)


def _leaf(t, dtype, device="cpu"):
    return t.to(device=device, dtype=dtype).detach().requires_grad_(t.requires_grad)


def _check(out, ref_hi, base=None, name=""):
    """out vs high-precision reference; base = plain torch at out's precision (None for fp32)."""
    assert out is not None, name
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    out, ref_hi = out.double(), ref_hi.double()
    scale = ref_hi.abs().max().item() + 1e-12
    err = (out - ref_hi).abs().max().item()
    if base is None:  # fp32 kernel vs fp64 reference
        assert err <= 1e-5 * scale + 1e-6, f"{name}: max error {err:.3g} (scale {scale:.3g})"
    else:
        base_err = (base.double() - ref_hi).abs().max().item()
        # + the output's own rounding: half a bf16 ulp of its largest value on the GPU (round to
        # nearest); a whole ulp in the interpreter, whose fp32 -> bf16 conversion truncates.
        tol = 2.0 * base_err + (2.0**-7 if _INTERPRET else 2.0**-8) * scale
        assert err <= tol, f"{name}: max error {err:.3g} > {tol:.3g} (torch bf16: {base_err:.3g})"


def _compare(fn, ref_fn, inputs, dtype, device="cpu", n_outs=1, base_fn=None):
    """Run fn on inputs cast to dtype, ref_fn in fp64 on the same rounded values (and base_fn, by default
    ref_fn, at dtype as the bf16 baseline); compare outputs and input gradients under a random upstream
    gradient."""
    rounded = [t.to(dtype) if t is not None and t.is_floating_point() else t for t in inputs]
    hi = torch.float64

    def prep(dt):
        return [(_leaf(t, dt, device) if t.is_floating_point() else t.to(device)) if t is not None else None
                for t in rounded]

    xs, xs_hi = prep(dtype), prep(hi)
    outs = fn(*xs)
    outs_hi = ref_fn(*xs_hi)
    outs, outs_hi = (outs, outs_hi) if n_outs > 1 else ((outs,), (outs_hi,))
    gouts = [torch.randn(o.shape, dtype=torch.float64, device=device) for o in outs_hi]
    grad_in = [t for t in xs if t is not None and t.requires_grad]
    grad_in_hi = [t for t in xs_hi if t is not None and t.requires_grad]
    g = _grads(outs, grad_in, [go.to(o.dtype) for go, o in zip(gouts, outs)])
    g_hi = _grads(outs_hi, grad_in_hi, gouts)
    base_outs, base_g = [None] * n_outs, [None] * len(g)
    if dtype != torch.float32:
        xs_lo = prep(dtype)
        base_outs = (base_fn or ref_fn)(*xs_lo)
        base_outs = base_outs if n_outs > 1 else (base_outs,)
        base_g = _grads(base_outs, [t for t in xs_lo if t is not None and t.requires_grad],
                        [go.to(o.dtype) for go, o in zip(gouts, base_outs)])
    for i, (o, oh, b) in enumerate(zip(outs, outs_hi, base_outs)):
        _check(o, oh, b, f"output {i}")
    for i, (gi, gh, b) in enumerate(zip(g, g_hi, base_g)):
        _check(gi, gh, b, f"grad {i}")


def _rand(*shape, requires_grad=True, std=1.0):
    return (torch.randn(*shape) * std).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------- add + LayerNorm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 64), (7, 80), (97, 64)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm(dtype, rows, d, with_residual):
    x, r = _rand(rows, d), (_rand(rows, d) if with_residual else None)
    w, b = _rand(d, requires_grad=False) * 0.5 + 1, _rand(d, requires_grad=False)
    _compare(K.add_layer_norm, T.add_layer_norm, [x, r, w, b], dtype, n_outs=2)


def test_add_layer_norm_y_only_and_frozen_weights():
    x, r = _rand(7, 80), _rand(7, 80)
    w, b = torch.randn(80, requires_grad=True), torch.randn(80, requires_grad=True)
    y, h = K.add_layer_norm(x, r, w, b)
    gy = torch.randn_like(y)
    gx, gr, gw, gb = torch.autograd.grad(y, (x, r, w, b), gy, allow_unused=True)  # h unused: dh None
    assert gw is None and gb is None
    y2, _ = T.add_layer_norm(x, r, w, b)
    ex, = torch.autograd.grad(y2, (x,), gy)
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gr, ex, rtol=1e-5, atol=1e-5)
    assert gx.data_ptr() != gr.data_ptr()  # separate buffers for x and residual


# ----------------------------------------------------------------------------------- bias + GELU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 64), (7, 320), (97, 80)])
def test_bias_gelu(dtype, rows, n):
    x, b = _rand(rows, n, std=2.0), _rand(n, requires_grad=False)
    _compare(K.bias_gelu, T.bias_gelu, [x, b], dtype)


def test_bias_gelu_matches_hf_gelu_new():
    from transformers.activations import NewGELUActivation

    x, b = torch.randn(7, 64) * 3, torch.randn(64)
    torch.testing.assert_close(K.bias_gelu(x, b), NewGELUActivation()(x + b), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,din,dout", [(1, 64, 80), (7, 80, 64), (97, 64, 256)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear(dtype, rows, din, dout, with_bias):
    x, w = _rand(rows, din), _rand(din, dout, requires_grad=False, std=din**-0.5)
    b = _rand(dout, requires_grad=False) if with_bias else None
    _compare(K.linear, T.linear, [x, w, b], dtype)


def test_linear_never_computes_weight_grad():
    x = torch.randn(2, 3, 64, requires_grad=True)
    w, b = torch.randn(64, 80, requires_grad=True), torch.randn(80, requires_grad=True)
    y = K.linear(x, w, b)
    assert y.shape == (2, 3, 80)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), torch.randn_like(y), allow_unused=True)
    assert gw is None and gb is None and gx.shape == x.shape


# ----------------------------------------------------------------------------------- LM head + CE
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,V,d", [(1, 1000, 64), (7, 1000, 80), (97, 1000, 64), (3, 50257, 64)])
def test_lm_head_ce(dtype, rows, V, d):
    h, w = _rand(rows, d), _rand(V, d, requires_grad=False, std=0.5)
    t = torch.randint(0, V, (rows,))
    _compare(K.lm_head_ce, T.lm_head_ce, [h, w, t], dtype)


def test_lm_head_ce_autocast_casts_weight_like_autocast():
    """16-bit h with an fp32 W (autocast): W is cast to h's dtype, exactly as autocast casts a matmul's
    operands, so the result equals the all-bf16 call bit for bit (and the GPU runs it on tensor cores)."""
    h = _rand(7, 64).to(torch.bfloat16).detach().requires_grad_(True)
    w = torch.randn(1000, 64) * 0.5  # fp32 values that bf16 cannot hold exactly
    t = torch.randint(0, 1000, (7,))
    g = torch.randn(7)
    mixed = K.lm_head_ce(h, w, t)
    (g_mixed,) = torch.autograd.grad(mixed, h, g)
    cast = K.lm_head_ce(h, w.to(torch.bfloat16), t)
    (g_cast,) = torch.autograd.grad(cast, h, g)
    assert torch.isfinite(mixed).all() and torch.equal(mixed, cast) and torch.equal(g_mixed, g_cast)


def test_lm_head_ce_ignore_index_and_no_grad():
    """A negative target (-100) gives loss 0 and no gradient, as F.cross_entropy; the other rows are those
    of the torch op (which the engine never calls with an ignored row)."""
    h, w = _rand(7, 64), torch.randn(1000, 64) * 0.5
    t = torch.randint(0, 1000, (7,))
    t[2] = -100
    kept = t >= 0
    loss = K.lm_head_ce(h, w, t)
    ref = T.lm_head_ce(h[kept], w, t[kept])
    g = torch.randn(7)
    gh, = torch.autograd.grad(loss, h, g)
    eh, = torch.autograd.grad(ref, h, g[kept])
    assert loss[2] == 0 and (gh[2] == 0).all()
    torch.testing.assert_close(loss[kept], ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, eh, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(K.lm_head_ce(h, w, t)[kept], ref.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- tree attention
def _cu(n_trunk, seg_lens, dtype=torch.int32):
    offs = [n_trunk]
    for n in seg_lens:
        offs.append(offs[-1] + n)
    return torch.tensor(offs, dtype=dtype)


# (constant prefix rows without queries, trunk rows, segment lengths, heads, head dim)
TREE_CASES = [
    (3, 7, [1, 5, 3, 2], 2, 64),  # prefix + trunk + mixed segments incl. length 1
    (0, 5, [], 2, 80),  # B = 0: trunk only, D = 80 (padded to 128)
    (4, 4, [6, 1, 1], 1, 16),  # whole trunk is constant prefix
    (2, 9, [1, 1, 20], 2, 128),  # long segment spanning several key blocks
    (0, 0, [3, 4], 1, 32),  # no trunk at all
    (5, 20, [2, 17, 1], 3, 64),  # trunk spanning >1 key block, queries straddling blocks
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TREE_CASES, ids=lambda c: f"P{c[0]}-T{c[1]}-S{len(c[2])}-H{c[3]}-D{c[4]}")
def test_tree_attention(dtype, case):
    n_context, n_trunk, segs, nh, d = case
    nk = n_trunk + sum(segs)
    nq = nk - n_context
    cu = _cu(n_trunk, segs, torch.int64 if d == 16 else torch.int32)
    q, k, v = _rand(nq, nh, d), _rand(nk, nh, d), _rand(nk, nh, d)
    _compare(lambda q, k, v: K_tree_attention(q, k, v, n_trunk, cu),
             lambda q, k, v: T.tree_attention(q, k, v, n_trunk, cu), [q, k, v], dtype,
             base_fn=lambda q, k, v: _attention_in_dtype(q, k, v, n_trunk, cu))


def _attention_in_dtype(q, k, v, n_trunk, cu):
    """The bf16 check's baseline: plain torch attention with every step in the inputs' dtype. The torch op
    computes in fp32 on the CPU (rounding only its output), which is no bf16 baseline for a kernel that,
    like any FlashAttention-style one, keeps O in bf16 for its backward (on CUDA it runs SDPA in bf16)."""
    mask = tree.tree_mask(q.shape[0], k.shape[0], n_trunk, cu)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5  # (H, Nq, Nk)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def _gpu_choices(module_name, choose, monkeypatch):
    """The tiles a launcher's choice function gives on the GPU (its interpreter branch switched off)."""
    module = sys.modules[f"fastprompt.kernels.{module_name}"]
    with monkeypatch.context() as m:
        m.setattr(module, "interpreting", lambda: False)
        return module, sorted(set(choose(module)))


def test_tree_attention_exact_at_gpu_tiles(monkeypatch):
    """Every tile shape the launcher picks on the GPU (fp32 and 16-bit, each kernel) computes the same
    attention: run here in the interpreter with that tile forced (fp32 math, ~1e-5 against fp64)."""
    module, tiles = _gpu_choices("tree_attention", lambda mod: [
        mod.attention_blocks(64, kernel, lowp) for kernel in ("fwd", "dq", "dkdv") for lowp in (False, True)],
        monkeypatch)
    n_context, n_trunk, segs, nh, d = 3, 37, [1, 40, 9, 2], 1, 64  # several tiles; partial last tiles
    nk = n_trunk + sum(segs)
    cu = _cu(n_trunk, segs)
    q, k, v = _rand(nk - n_context, nh, d), _rand(nk, nh, d), _rand(nk, nh, d)
    for tile in tiles:
        with monkeypatch.context() as m:
            m.setattr(module, "attention_blocks", lambda *_, tile=tile: tile)
            _compare(lambda q, k, v: K_tree_attention(q, k, v, n_trunk, cu),
                     lambda q, k, v: T.tree_attention(q, k, v, n_trunk, cu), [q, k, v], torch.float32)


def test_lm_head_ce_exact_at_gpu_tiles(monkeypatch):
    """The same for the LM head's GPU tiles (every row branch, fp32 and 16-bit choices)."""
    rows_cases = (7, 24, 97)
    module, tiles = _gpu_choices("lm_head_ce", lambda mod: [
        mod.lm_head_blocks(r, 1000, lowp) for r in rows_cases for lowp in (False, True)], monkeypatch)
    w = _rand(1000, 64, requires_grad=False, std=0.5)
    for tile in tiles:
        rows = next(r for r in rows_cases if r >= tile[0] // 2)  # > one row block for small tiles
        h, t = _rand(rows, 64), torch.randint(0, 1000, (rows,))
        with monkeypatch.context() as m:
            m.setattr(module, "lm_head_blocks", lambda *_, tile=tile: tile)
            _compare(K.lm_head_ce, T.lm_head_ce, [h, w, t], torch.float32)


def test_tree_attention_custom_scale_and_partial_grads():
    n_trunk, segs = 6, [3, 1]
    cu = _cu(n_trunk, segs)
    q, k = torch.randn(10, 2, 32, requires_grad=True), torch.randn(10, 2, 32, requires_grad=True)
    v = torch.randn(10, 2, 32)  # no grad for v
    o = K_tree_attention(q, k, v, n_trunk, cu, scale=0.3)
    o2 = T.tree_attention(q, k, v, n_trunk, cu, scale=0.3)
    go = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k), go), torch.autograd.grad(o2, (q, k), go)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- packaging
def test_import_without_triton_fails_only_at_use():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from fastprompt import kernels as K\n"
        "assert not K.TRITON_AVAILABLE\n"
        "x = torch.randn(2, 8); w = torch.ones(8); b = torch.zeros(8)\n"
        "K.linear(x, torch.randn(8, 4))\n"
        "try:\n"
        "    K.add_layer_norm(x, None, w, b)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------- GPU (bf16)
GPU_CASES = ["layer_norm", "bias_gelu", "linear", "lm_head_ce", "tree_attention"]


@pytest.mark.gpu
@pytest.mark.parametrize("op", GPU_CASES)
def test_gpu_bf16_vs_fp32_reference(op):
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    rows, d = 97, 1280
    if op == "layer_norm":
        args = [_rand(rows, d), _rand(rows, d), _rand(d, requires_grad=False) * 0.5 + 1, _rand(d, requires_grad=False)]
        fn, ref, n_outs = K.add_layer_norm, T.add_layer_norm, 2
    elif op == "bias_gelu":
        args, fn, ref, n_outs = [_rand(rows, 4 * d, std=2.0), _rand(4 * d, requires_grad=False)], K.bias_gelu, T.bias_gelu, 1
    elif op == "linear":
        args = [_rand(rows, d), _rand(d, 3 * d, requires_grad=False, std=d**-0.5), _rand(3 * d, requires_grad=False)]
        fn, ref, n_outs = K.linear, T.linear, 1
    elif op == "lm_head_ce":
        V = 50257
        args = [_rand(rows, d), _rand(V, d, requires_grad=False, std=0.05), torch.randint(0, V, (rows,))]
        fn, ref, n_outs = K.lm_head_ce, T.lm_head_ce, 1
    else:
        n_trunk, segs = 70, [1, 9, 33, 64, 2, 150]
        nk = n_trunk + sum(segs)
        cu = _cu(n_trunk, segs).to(dev)
        args = [_rand(nk - 3, 20, 64), _rand(nk, 20, 64), _rand(nk, 20, 64)]
        fn = lambda q, k, v: K_tree_attention(q, k, v, n_trunk, cu)  # noqa: E731
        ref = lambda q, k, v: T.tree_attention(q, k, v, n_trunk, cu)  # noqa: E731
        n_outs = 1
    _compare(fn, ref, args, bf, device=dev, n_outs=n_outs)
