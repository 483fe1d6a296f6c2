#!/usr/bin/env bash
# The whole GPU check in one call (benchmarks/README.md), about 10.5 minutes at most:
#
#   OUT=/path/to/out bash benchmarks/gpu_check.sh          # $OUT defaults to ./gpu_out
#
# 1. install the checkout without network, building csrc (fastprompt.kernels._C) with FASTPROMPT_BUILD_CUDA=1;
#    if that build fails, install without it and go on (reported, and the exit status says so)
# 2. versions (python, torch, CUDA, triton, transformers, peft) and the GPU (nvidia-smi)
# 3. the `gpu` tests:            python -m pytest -m gpu tests
# 4. the GPU benchmark suite:    python -m pytest benchmarks/test_epoch.py --benchmark-only
#    (GPT-2 Large architecture, batch 64, the whole training split; JSON in $OUT/bench.json,
#    one record a line in $OUT/epoch_results.jsonl as soon as each engine is measured), then the family rows
#    (SmolLM2-135M, Qwen3-0.6B, Gemma 3 270M architectures; $OUT/bench_families.json)
# 5. optional (FASTPROMPT_GPU_CHECK_OPS=1): the per-op benchmarks, benchmarks/bench_ops.py
# 6. a stage summary, then the epoch table, last.
#
# Every stage has its own time limit (the worst case sums to under 10.5 minutes) and its log under $OUT;
# a failing stage does not stop the later ones; the exit status is 1 if any stage failed.
#
# Knobs: FASTPROMPT_BENCH_SCALE (fraction of the split, default 1), FASTPROMPT_BENCH_NAIVE_STEPS (steps of
# naive/PEFT timed and extrapolated, default 16), FASTPROMPT_BENCH_ROUNDS (default 3).
# FASTPROMPT_GPU_CHECK_DRY=1: a quick rehearsal on a CPU machine (no install, the CPU configuration of
# the suite on a few batches at prompt_len 4), to test this script itself.
set -u
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DRY=${FASTPROMPT_GPU_CHECK_DRY:-0}
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export FASTPROMPT_BENCH_RESULTS="$OUT/epoch_results.jsonl"
rm -f "$FASTPROMPT_BENCH_RESULTS" "$OUT/bench.json" "$OUT/stages.txt"

failed=0
# stage NAME LIMIT_S COMMAND...: run with a time limit, log to $OUT/NAME.log, show its tail, record the outcome
stage() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local dt=$((SECONDS - t0))
    tail -n "${TAIL_LINES:-15}" "$OUT/$name.log" | sed 's/^/    /'
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then what="TIMED OUT"; elif [ "$rc" -ne 0 ]; then what="FAILED"; fi
    printf '%-14s %-9s rc=%-3s %4ss  (limit %ss, log %s.log)\n' "$name" "$what" "$rc" "$dt" "$limit" "$name" >>"$OUT/stages.txt"
    [ "$rc" -eq 0 ] || failed=1
    return "$rc"
}

# 1. install (no network there: no dependencies, no build isolation); csrc is compiled here, where CUDA torch + nvcc exist
if [ "$DRY" = "1" ]; then
    echo "=== install: skipped (dry run; would run FASTPROMPT_BUILD_CUDA=1 pip install --no-deps --no-build-isolation -e .)"
    export FASTPROMPT_BENCH_CONFIG=cpu FASTPROMPT_BENCH_SCALE=${FASTPROMPT_BENCH_SCALE:-0.2} FASTPROMPT_BENCH_ROUNDS=${FASTPROMPT_BENCH_ROUNDS:-1}
    BENCH_SELECT=(-k "L4 and (naive or fused) and not (llama or qwen3 or mistral or gemma3)")
    FAMILY_SELECT=(-k "cpu-qwen3")
else
    BENCH_SELECT=(-k "not (llama or qwen3 or mistral or gemma3)")
    FAMILY_SELECT=(-k "gpu-llama or gpu-qwen3 or gpu-gemma3")
    if ! FASTPROMPT_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} stage install 140 \
            "$PY" -m pip install --no-deps --no-build-isolation -v -e .; then
        echo "!!! csrc build or install failed (see $OUT/install.log); installing without the CUDA extension"
        FASTPROMPT_BUILD_CUDA=0 stage install_nocsrc 45 "$PY" -m pip install --no-deps --no-build-isolation -e .
    fi
fi

# 2. versions and the GPU
stage versions 30 "$PY" - <<'EOF'
import sys, platform
print("python", sys.version.split()[0], platform.platform())
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "transformers", "peft", "flash_attn", "nvtx"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:
        print(name, "not available:", type(e).__name__)
try:
    import fastprompt.kernels._C
    print("fastprompt.kernels._C (csrc) built:", fastprompt.kernels._C.__file__)
except Exception as e:
    print("fastprompt.kernels._C (csrc) not available:", e)
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/versions.log"
else
    echo "nvidia-smi: not found" | tee -a "$OUT/versions.log"
fi

# 3. the gpu tests (they skip without CUDA: the dry run only checks they collect)
stage gpu_tests 90 "$PY" -m pytest -m gpu tests -v -p no:cacheprovider -rfEs --durations=5

# 4. the GPU benchmark suite
TAIL_LINES=30 stage bench 200 "$PY" -m pytest benchmarks/test_epoch.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench.json" "${BENCH_SELECT[@]}"

# 4b. the family rows (SmolLM2-135M, the Qwen3-0.6B and Gemma 3 270M architectures: naive autocast, generic,
#     the packed engine with CUDA graphs off and on), appended to the same records
TAIL_LINES=30 stage bench_families 150 "$PY" -m pytest benchmarks/test_epoch.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json "$OUT/bench_families.json" "${FAMILY_SELECT[@]}"

# 5. per-op benchmarks, opt-in (they need the minutes the budget does not have by default)
if [ "${FASTPROMPT_GPU_CHECK_OPS:-0}" = "1" ]; then
    stage bench_ops 90 "$PY" -m pytest benchmarks/bench_ops.py --benchmark-only -m gpu -q -p no:cacheprovider \
        --benchmark-json "$OUT/bench_ops.json"
fi

# 6. summary: stages, then the epoch table (from the records, so a run cut short still shows what it measured)
echo
echo "=== stages (logs in $OUT)"
cat "$OUT/stages.txt"
echo
echo "=== epoch table"
if [ -s "$FASTPROMPT_BENCH_RESULTS" ]; then
    "$PY" benchmarks/epoch_report.py "$FASTPROMPT_BENCH_RESULTS" | tee "$OUT/epoch_table.txt"
else
    echo "(no epoch results: see $OUT/bench.log)"
fi
exit "$failed"
