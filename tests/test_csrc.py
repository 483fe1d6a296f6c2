"""The CUDA C++ extension fastprompt.kernels._C (csrc/, loaded by fastprompt.kernels.cuda_ext) and the op that runs it,
fastprompt.kernels.add_layer_norm_cuda: the Triton op's autograd function with _C's launchers.

On CPU: the .cu sources compile (nvcc, no GPU needed), the missing extension fails loudly, and the autograd
wiring plus the backward formula of the kernel are checked against autograd through a torch stand-in for
_C. On a GPU (`gpu` marker): the real kernels against the torch op (fastprompt.engines.ops) on fp32 copies.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastprompt.kernels import cuda_ext as cuda_ops
from fastprompt.engines.ops import add_layer_norm as torch_add_layer_norm
from fastprompt.kernels import add_layer_norm_cuda

REPO = Path(__file__).resolve().parents[1]
COMPILE_CHECK = REPO / "csrc" / "compile_check.sh"

ROWS = [1, 7, 97]
HIDDEN = [64, 80, 1280]  # 80: not a power of two; 1280: GPT-2 large
# (dtype, atol, rtol): fp32 against the fp32 reference directly; bf16 against the fp32 truth, allowed
# 2x the error of plain torch in bf16 plus atol.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 0.0)]


def _inputs(rows, d, dtype, with_residual, device):
    """Fresh random inputs; an offset mean and a non-unit scale so that centring and scaling matter."""
    x = (torch.randn(rows, d, device=device) * 2 + 0.5).to(dtype)
    residual = (torch.randn(rows, d, device=device) * 2 - 0.25).to(dtype) if with_residual else None
    weight = (1 + 0.2 * torch.randn(d, device=device)).to(dtype)
    bias = (0.2 * torch.randn(d, device=device)).to(dtype)
    return x, residual, weight, bias


def _leaves(x, residual, dtype=None):
    """Detached copies that require grad (cast to `dtype` if given)."""
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    x = cast(x.detach()).requires_grad_()
    residual = None if residual is None else cast(residual.detach()).requires_grad_()
    return x, residual


def _run(fn, x, residual, weight, bias, dy, dh, eps=1e-5):
    """Forward and backward (random upstream dy and dh; dh may be None) -> (y, h, dx, dresidual)."""
    y, h = fn(x, residual, weight, bias, eps)
    inputs = [x] if residual is None else [x, residual]
    outputs, grads = ([y], [dy]) if dh is None else ([y, h], [dy, dh])
    d_inputs = torch.autograd.grad(outputs, inputs, grads)
    return y.detach(), h.detach(), d_inputs[0], (d_inputs[1] if residual is not None else None)


def _check(name, out, truth, baseline, dtype, atol, rtol):
    """fp32: close to the fp32 truth. bf16: max error at most 2x plain torch bf16's, plus atol."""
    out, truth, baseline = out.float(), truth.float(), baseline.float()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    assert torch.isfinite(truth).all(), f"{name}: non-finite reference"
    if dtype == torch.float32:
        torch.testing.assert_close(out, truth, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
        return
    err = (out - truth).abs().max().item()
    base_err = (baseline - truth).abs().max().item()
    assert err <= 2 * base_err + atol, f"{name}: max error {err:.3g} vs plain torch bf16's {base_err:.3g}"


def _compare_to_reference(fn, rows, d, dtype, atol, rtol, with_residual, with_dh, device):
    x, residual, weight, bias = _inputs(rows, d, dtype, with_residual, device)
    dy = torch.randn(rows, d, device=device).to(dtype)
    dh = torch.randn(rows, d, device=device).to(dtype) if with_dh else None

    got = _run(fn, *_leaves(x, residual), weight, bias, dy, dh)
    # Truth: the torch op on fp32 copies. Baseline: the torch op in the inputs' dtype.
    truth = _run(torch_add_layer_norm, *_leaves(x, residual, torch.float32), weight.float(), bias.float(),
                 dy.float(), None if dh is None else dh.float())
    baseline = _run(torch_add_layer_norm, *_leaves(x, residual), weight, bias, dy, dh)

    for i, name in enumerate(["y", "h", "dx", "dresidual"]):
        if got[i] is None:
            continue
        assert got[i].dtype == dtype and got[i].shape == (rows, d), f"{name}: {got[i].dtype} {got[i].shape}"
        _check(name, got[i], truth[i], baseline[i], dtype, atol, rtol)
    if with_residual:  # h = x + residual: one gradient for both
        torch.testing.assert_close(got[2], got[3], atol=0, rtol=0)


# ---- CPU: compile check -------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which(os.environ.get("NVCC", "nvcc")) is None, reason="nvcc not installed")
def test_cuda_sources_compile():
    result = subprocess.run(["bash", str(COMPILE_CHECK)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK     layer_norm.cu" in result.stdout, result.stdout


def _host_build_tools_present():
    import sysconfig

    python_h = Path(sysconfig.get_paths()["include"]) / "Python.h"
    tools = [os.environ.get("NVCC", "nvcc"), os.environ.get("CXX", "g++")]
    return all(shutil.which(tool) for tool in tools) and python_h.exists()


@pytest.mark.slow  # ~70 s of g++ on 2 cores; CI runs csrc/compile_check.sh --bindings directly
@pytest.mark.skipif(not _host_build_tools_present(), reason="needs nvcc, a C++ compiler and Python.h")
def test_bindings_compile_against_torch_headers():
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(COMPILE_CHECK), "--bindings"], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK     bindings.cpp" in result.stdout, result.stdout


# ---- CPU: the Python side -----------------------------------------------------------------------------


def test_missing_extension_raises_with_build_hint(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_C", None)
    x, residual, weight, bias = _inputs(2, 8, torch.float32, True, "cpu")
    hint = r"fastprompt\.kernels\._C.*FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation -e \."
    with pytest.raises(RuntimeError, match=hint):
        add_layer_norm_cuda(x, residual, weight, bias)


def _fake_fwd(x, residual, weight, bias, eps):
    """torch stand-in for _C.add_layer_norm_fwd: the binding's contract (h is x when residual is None;
    fp32 (rows,) statistics) and the kernel's arithmetic (fp32 math, one rounding on store)."""
    d = x.shape[-1]
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float().reshape(-1, d)
    mean = hf.mean(dim=1)
    rstd = torch.rsqrt(((hf - mean[:, None]) ** 2).mean(dim=1) + eps)
    y = ((hf - mean[:, None]) * rstd[:, None] * weight.float() + bias.float()).to(x.dtype).reshape(x.shape)
    return y, h, mean, rstd


def _fake_bwd(dy, dh, h, weight, mean, rstd):
    """torch stand-in for _C.add_layer_norm_bwd, term for term the formula in csrc/layer_norm.cu."""
    d = h.shape[-1]
    g = dy.float().reshape(-1, d) * weight.float()
    xhat = (h.float().reshape(-1, d) - mean[:, None]) * rstd[:, None]
    dx = rstd[:, None] * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    if dh is not None:
        dx = dx + dh.float().reshape(-1, d)
    return dx.to(h.dtype).reshape(h.shape)


@pytest.fixture
def fake_ext(monkeypatch):
    monkeypatch.setattr(cuda_ops, "_C", SimpleNamespace(add_layer_norm_fwd=_fake_fwd, add_layer_norm_bwd=_fake_bwd))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_dh", [False, True])
@pytest.mark.parametrize("rows, d", [(1, 64), (7, 80), (97, 1280)])
def test_autograd_wiring_and_backward_formula_with_stand_in(
    fake_ext, rows, d, dtype, atol, rtol, with_residual, with_dh
):
    _compare_to_reference(add_layer_norm_cuda, rows, d, dtype, atol, rtol, with_residual, with_dh, "cpu")


def test_unused_outputs_and_frozen_weights_with_stand_in(fake_ext):
    x, residual, weight, bias = _inputs(3, 16, torch.float32, True, "cpu")
    x, residual = _leaves(x, residual)
    weight.requires_grad_()  # even if a caller left it trainable, the op gives it no gradient
    y, h = add_layer_norm_cuda(x, residual, weight, bias)
    dh = torch.randn_like(h)
    dx, dres, dw = torch.autograd.grad([h], [x, residual, weight], [dh], allow_unused=True)
    torch.testing.assert_close(dx, dh, atol=0, rtol=0)  # y unused: h's gradient passes straight through
    torch.testing.assert_close(dres, dh, atol=0, rtol=0)
    assert dw is None

    y, h = add_layer_norm_cuda(x, None, weight, bias)  # no residual: h is x itself, as in the Triton op
    assert h is x
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad([y, h], [x], [dy, dh])
    (dx_ref,) = torch.autograd.grad(torch_add_layer_norm(x, None, weight, bias), [x], [dy, dh])
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)


def test_nan_fails_the_check():
    truth = torch.ones(4, 8)
    out = truth.clone()
    out[1, 2] = float("nan")
    for dtype, atol, rtol in DTYPES:
        with pytest.raises(AssertionError):
            _check("y", out, truth, truth, dtype, atol, rtol)


# ---- GPU: the real kernels ----------------------------------------------------------------------------


@pytest.fixture
def ext():
    if not cuda_ops.CUDA_EXT_AVAILABLE:
        if os.environ.get("FASTPROMPT_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"fastprompt.kernels._C is not importable; {cuda_ops.BUILD_HINT}")
        pytest.skip(f"fastprompt.kernels._C not built; {cuda_ops.BUILD_HINT}")
    return cuda_ops._C


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("d", HIDDEN)
@pytest.mark.parametrize("rows", ROWS)
def test_add_layer_norm_cuda_matches_reference(ext, rows, d, dtype, atol, rtol, with_residual):
    _compare_to_reference(add_layer_norm_cuda, rows, d, dtype, atol, rtol, with_residual, True, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_add_layer_norm_cuda_without_dh_and_3d(ext, dtype, atol, rtol):
    """Only y used downstream (dh is None in the kernel); a (batch, seq, d) input."""
    def fn_3d(x, residual, weight, bias, eps):
        y, h = add_layer_norm_cuda(x.view(2, 5, 80), residual.view(2, 5, 80), weight, bias, eps)
        return y.view(10, 80), h.view(10, 80)

    x, residual, weight, bias = _inputs(10, 80, dtype, True, "cuda")
    dy = torch.randn(10, 80, device="cuda").to(dtype)
    got = _run(fn_3d, *_leaves(x, residual), weight, bias, dy, None)
    truth = _run(torch_add_layer_norm, *_leaves(x, residual, torch.float32), weight.float(), bias.float(),
                 dy.float(), None)
    baseline = _run(torch_add_layer_norm, *_leaves(x, residual), weight, bias, dy, None)
    for i, name in enumerate(["y", "h", "dx", "dresidual"]):
        _check(name, got[i], truth[i], baseline[i], dtype, atol, rtol)


@pytest.mark.gpu
def test_add_layer_norm_cuda_unaligned_rows_use_scalar_path(ext):
    """A view starting one element in: the launchers must fall back from 16-byte vectors."""
    x, residual, weight, bias = _inputs(7, 65, torch.float32, True, "cuda")
    x, residual = x[:, 1:], residual[:, 1:]  # non-contiguous: add_layer_norm_cuda makes contiguous copies
    buf = torch.empty(7 * 64 + 1, device="cuda")
    x_unaligned = buf[1:].view(7, 64).copy_(x)  # contiguous but 4 bytes past a 16-byte boundary
    weight, bias, residual = weight[1:].contiguous(), bias[1:].contiguous(), residual.contiguous()
    y, h, mean, rstd = ext.add_layer_norm_fwd(x_unaligned, residual, weight, bias, 1e-5)
    y_ref, h_ref = torch_add_layer_norm(x_unaligned, residual, weight, bias)
    torch.testing.assert_close(h, h_ref, atol=0, rtol=0)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_add_layer_norm_cuda_rejects_bad_inputs(ext):
    x, residual, weight, bias = _inputs(4, 64, torch.float32, True, "cuda")
    with pytest.raises(RuntimeError, match="dtype"):
        ext.add_layer_norm_fwd(x, residual.bfloat16(), weight, bias, 1e-5)
    with pytest.raises(RuntimeError, match="contiguous"):
        ext.add_layer_norm_fwd(x.t(), None, weight[:4], bias[:4], 1e-5)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ext.add_layer_norm_fwd(x.half(), None, weight.half(), bias.half(), 1e-5)
