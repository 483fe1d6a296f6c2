"""The default GPU path's Triton kernels compile for Hopper (sm_90) without spills: checked on the CPU.

benchmarks/compile_report.py runs fused-engine training and evaluation steps at GPT-2 Large shapes in bf16,
fp32 and autocast under a stand-in driver (every launch compiles for sm_90, nothing runs), in a process of
its own (this suite's TRITON_INTERPRET would make interpreted functions that never compile). Each variant
then goes through ptxas -v. A kernel change that fails to compile, spills, or needs more shared memory than
an sm_90 block may use fails here, before any GPU sees it. Compiler figures only: no timing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_or_skip():
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001 - no triton, or a triton without the NVIDIA backend
        pytest.skip(f"needs triton with its NVIDIA backend ({type(e).__name__}: {e})")
    try:
        path = get_ptxas(90).path
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"needs ptxas for sm_90 (Triton ships one; {type(e).__name__}: {e})")
    if not path or not os.path.exists(path):
        pytest.skip("needs ptxas for sm_90 (Triton ships one; not found)")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    _ptxas_or_skip()
    out = tmp_path_factory.mktemp("compile") / "sm90.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # target rows ~5, ~22 and ~50: every branch of the LM head's row-block choice
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--models", "gpt2-large",
           "--precisions", "bf16,fp32,autocast", "--batches", "2,10,24", "--json", str(out)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


def test_default_gpu_path_compiles_for_sm90(report):
    assert not report["errors"], report["errors"]
    kernels = {(v["kernel"], v["constexprs"].get("LOWP_DOT")) for v in report["variants"]}
    for name in ("_tree_attn_fwd_kernel", "_tree_attn_dq_kernel", "_tree_attn_dkdv_kernel", "_lm_head_ce_fwd_kernel"):
        assert (name, True) in kernels and (name, False) in kernels, name  # bf16 and fp32 both compiled
    for name in ("_add_ln_fwd_kernel", "_add_ln_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel"):
        assert any(k == name for k, _ in kernels), name


def test_no_spills_and_shared_memory_fits(report):
    from fastprompt.kernels.compile_check import SM90_MAX_SHARED

    for v in report["variants"]:
        tag = f"{v['kernel']} {v['constexprs']} ({', '.join(v['cases'][:2])})"
        assert v["registers"] > 0, tag  # ptxas really ran on it
        assert v["spill_stores"] == 0 and v["spill_loads"] == 0, f"{tag}: spills {v['spill_stores']}/{v['spill_loads']} B"
        assert v["shared"] <= SM90_MAX_SHARED, f"{tag}: {v['shared']} B shared memory"


def test_16bit_dots_use_tensor_cores(report):
    """bf16 and autocast (W cast to bf16 like autocast does): every tl.dot on tensor cores, none on FMA."""
    for v in report["variants"]:
        if v["constexprs"].get("LOWP_DOT"):
            assert v["dots"] and "fma" not in v["dots"], (v["kernel"], v["constexprs"], v["dots"])
    autocast_heads = [v for v in report["variants"] if v["kernel"] == "_lm_head_ce_fwd_kernel"
                      and any(" autocast " in c for c in v["cases"])]
    assert autocast_heads and all(v["constexprs"]["LOWP_DOT"] for v in autocast_heads)


@pytest.mark.slow
def test_family_kernels_compile_for_sm90_without_spills(tmp_path):
    """The other families' steps at real shapes (SmolLM2-135M: head dim 64, GQA 3; Qwen3-0.6B: 128, q/k norm;
    Gemma 3 270M: 256, vocabulary 262,144), bf16 and fp32, batches of 4 (~8 target rows: the LM head's
    smallest row block) and 24: RMSNorm, RoPE, gated MLP, tree attention and the LM head compile for sm_90
    without spills, 16-bit dots on tensor cores."""
    _ptxas_or_skip()
    from fastprompt.kernels.compile_check import SM90_MAX_SHARED

    out = tmp_path / "families.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--models",
           "smollm2-135m,qwen3-0.6b,gemma3-270m", "--precisions", "bf16,fp32", "--batches", "4,24", "--json", str(out)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert not report["errors"], report["errors"]
    names = {v["kernel"] for v in report["variants"]}
    for name in ("_add_rms_fwd_kernel", "_add_rms_bwd_kernel", "_rotary_kernel", "_gated_act_kernel",
                 "_tree_attn_fwd_kernel", "_lm_head_ce_fwd_kernel"):
        assert name in names, name
    spilled = set()
    for v in report["variants"]:
        tag = f"{v['kernel']} {v['constexprs']} ({', '.join(v['cases'][:2])})"
        if v["spill_stores"] or v["spill_loads"]:
            spilled.add((v["kernel"], v["constexprs"].get("BLOCK_D")))
        else:
            assert v["registers"] > 0, tag
        assert v["shared"] <= SM90_MAX_SHARED, tag
        if v["constexprs"].get("LOWP_DOT"):
            assert v["dots"] and "fma" not in v["dots"], (tag, v["dots"])
    # Nothing spills: the dK/dV kernel at head dim 256 (Gemma 3) in bf16 runs its 32 x 32 tile at 8 warps, the
    # 16-bit LM head with <= 16 target rows at 4 (fastprompt/kernels/tree_attention.py, fastprompt/kernels/lm_head_ce.py).
    assert not spilled, spilled
