"""The other families' Triton kernels (fastprompt/kernels/rms_norm.py, rotary.py, gated_act.py) against their torch ops
(fastprompt.engines.ops), under Triton's interpreter on the CPU: fp32 to ~1e-5 of the fp64 torch op, bf16
within 2x plain torch bf16's error; backward under a random upstream gradient; no weight gradient ever."""
import pytest
import torch

from fastprompt import kernels as K
from fastprompt.engines import ops as T

from test_kernels import DTYPES, _compare, _rand

pytestmark = pytest.mark.skipif(not K.TRITON_AVAILABLE, reason="needs triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 64), (7, 80), (97, 48)])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_add_rms_norm(dtype, rows, d, with_residual, offset):
    x, r = _rand(rows, d), (_rand(rows, d) if with_residual else None)
    w = _rand(d, requires_grad=False) * 0.5 + (0.0 if offset else 1.0)

    def kernel(x, r, w):
        return K.add_rms_norm(x, r, w, 1e-6, offset)

    def ref(x, r, w):
        return T.add_rms_norm(x, r, w, 1e-6, offset)

    _compare(kernel, ref, [x, r, w], dtype, n_outs=2)


def test_rms_norm_per_head_and_frozen_weight():
    """q/k norm: rows of head_dim inside (rows, heads, D); the weight never gets a gradient."""
    x = _rand(5, 3, 16)
    w = torch.randn(16, requires_grad=True)
    y, _ = K.add_rms_norm(x, None, w, 1e-6, 1.0)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g, allow_unused=True)
    assert gw is None
    y_ref, _ = T.add_rms_norm(x, None, w, 1e-6, 1.0)
    (ex,) = torch.autograd.grad(y_ref, (x,), g)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_hugging_face():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(7, 80)
    llama, gemma = LlamaRMSNorm(80, eps=1e-5), Gemma3RMSNorm(80, eps=1e-6)
    with torch.no_grad():
        llama.weight.normal_()
        gemma.weight.normal_()
    torch.testing.assert_close(K.add_rms_norm(x, None, llama.weight, 1e-5, 0.0)[0], llama(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(K.add_rms_norm(x, None, gemma.weight, 1e-6, 1.0)[0], gemma(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,heads,D", [(1, 2, 64), (7, 3, 16), (97, 1, 256), (5, 4, 20)])
def test_rotary(dtype, rows, heads, D):
    x = _rand(rows, heads, D)
    positions = torch.randint(0, 300, (rows,))
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    cos, sin = T.rotary_tables(positions, inv_freq, 1.3)
    _compare(lambda x: K.rotary(x, cos, sin), lambda x: T.rotary(x, cos.double(), sin.double()), [x], dtype,
             base_fn=lambda x: T.rotary(x, cos, sin))


def test_rotary_on_a_strided_view_matches_hugging_face():
    """q and k are views into the fused q/k/v projection; HF's apply_rotary_pos_emb is the reference."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rows, H, G, D = 9, 4, 2, 16
    qkv = torch.randn(rows, (H + 2 * G) * D, requires_grad=True)
    q = qkv[:, : H * D].view(rows, H, D)
    k = qkv[:, H * D : (H + G) * D].view(rows, G, D)
    cos, sin = T.rotary_tables(torch.arange(3, 3 + rows), torch.rand(D // 2), 1.0)
    ours = K.rotary(q, cos, sin), K.rotary(k, cos, sin)
    theirs = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
    g = [torch.randn_like(t) for t in ours]
    (got,) = torch.autograd.grad(ours, qkv, g)
    (ref,) = torch.autograd.grad([T.rotary(q, cos, sin), T.rotary(k, cos, sin)], qkv, g)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner", [(1, 64), (7, 200), (97, 48)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_gated_act(dtype, rows, inner, activation):
    gu = _rand(rows, 2 * inner, std=2.0)
    _compare(lambda t: K.gated_act(t, activation), lambda t: T.gated_act(t, activation), [gu], dtype)


def test_gated_act_matches_hugging_face_mlps():
    from transformers.activations import ACT2FN

    gu = torch.randn(7, 2 * 48) * 2
    gate, up = gu.chunk(2, dim=-1)
    for name, act in (("silu", "silu"), ("gelu_tanh", "gelu_pytorch_tanh")):
        torch.testing.assert_close(K.gated_act(gu, name), ACT2FN[act](gate) * up, rtol=1e-5, atol=1e-6)


def test_registry_takes_the_family_kernels():
    ops = T.get_ops("triton", torch.device("cpu"))
    assert {ops.sources[n] for n in ("add_rms_norm", "rotary", "gated_act")} == {"triton"}
    assert ops.sources["window_attention"] == "torch" and ops.sources["lm_head_ce_softcap"] == "torch"
