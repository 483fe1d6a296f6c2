"""The ops register themselves (torch.library custom ops, for torch.compile and CUDA graphs) and never form
weight gradients. Triton runs in the interpreter here (the root conftest.py sets TRITON_INTERPRET=1)."""
import pytest
import torch

from fastprompt.engines import ops as T

kernels = pytest.importorskip("fastprompt.kernels")
if not kernels.TRITON_AVAILABLE:
    pytest.skip("needs Triton (interpreter or GPU)", allow_module_level=True)

REGISTERED = ("add_layer_norm", "add_layer_norm_bwd", "bias_gelu", "bias_gelu_bwd", "add_rms_norm", "add_rms_norm_bwd", "rotary", "rotary_bwd", "gated_act", "gated_act_bwd",
              "lm_head_ce", "tree_attention", "tree_attention_bwd")


def test_ops_are_registered_custom_ops():
    for name in REGISTERED:
        assert hasattr(torch.ops.fastprompt, name), name


def _samples():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
    rows, H, D = 7, 3, 16
    cos, sin = T.rotary_tables(torch.arange(rows), 1.0 / 10000 ** (torch.arange(0, D, 2) / D))
    seg_start = torch.tensor([0, 0, 0, 3, 3, 5, 5], dtype=torch.int32)  # trunk 3, segments [3, 5), [5, 7)
    seg_end = torch.tensor([7, 7, 7, 5, 5, 7, 7], dtype=torch.int32)
    return {
        "add_rms_norm": (torch.ops.fastprompt.add_rms_norm, (r(rows, 24).requires_grad_(), r(rows, 24).requires_grad_(),
                                                             r(24), 1e-6, 1.0)),
        "add_layer_norm": (torch.ops.fastprompt.add_layer_norm, (r(rows, 24).requires_grad_(), r(rows, 24).requires_grad_(),
                                                                 r(24), r(24), 1e-5, "triton")),
        "bias_gelu": (torch.ops.fastprompt.bias_gelu, (r(rows, 40).requires_grad_(), r(40))),
        "rotary": (torch.ops.fastprompt.rotary, (r(rows, H, D).requires_grad_(), cos, sin)),
        "gated_act": (torch.ops.fastprompt.gated_act, (r(rows, 2 * 20).requires_grad_(), "silu")),
        "lm_head_ce": (torch.ops.fastprompt.lm_head_ce, (r(rows, 24).requires_grad_(), r(97, 24),
                                                         torch.randint(0, 97, (rows,), generator=g), True)),
        "tree_attention": (torch.ops.fastprompt.tree_attention, (r(rows, H, D).requires_grad_(), r(rows, H, D).requires_grad_(),
                                                                 r(rows, H, D).requires_grad_(), 3, seg_start, seg_end, 0.25)),
    }


@pytest.mark.parametrize("name", ["add_layer_norm", "bias_gelu", "add_rms_norm", "rotary", "gated_act", "lm_head_ce", "tree_attention"])
def test_fake_implementation_matches_the_real_op(name):
    """Shapes and dtypes of the fake (what torch.compile traces with) equal the real op's outputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op, args = _samples()[name]
    real = op(*args)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
    real = real if isinstance(real, (tuple, list)) else (real,)
    fake = fake if isinstance(fake, (tuple, list)) else (fake,)
    assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_norms_form_no_weight_gradient(impl, offset):
    """The weights are frozen: even a weight with requires_grad gets no .grad (no dW, no dbeta), and x's
    gradient is the same as with a weight that does not require grad."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 24, generator=g, requires_grad=True)
    res = torch.randn(7, 24, generator=g, requires_grad=True)
    w = torch.randn(24, generator=g, requires_grad=True)
    b = torch.randn(24, generator=g, requires_grad=True)
    dy = torch.randn(7, 24, generator=g)
    rms = T.add_rms_norm if impl == "torch" else kernels.add_rms_norm
    ln = T.add_layer_norm if impl == "torch" else kernels.add_layer_norm
    for y, h in (rms(x, res, w, 1e-6, offset), ln(x, res, w, b, 1e-5)):
        (y * dy).sum().backward(retain_graph=True)
        assert w.grad is None and b.grad is None
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = res.grad = None
