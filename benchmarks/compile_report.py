"""Compile every Triton kernel variant the fused engine launches for sm_90, without a GPU, and report what
the compiler says: registers, spills, shared memory, warps/stages, how each tl.dot lowers.

How the variants are found: the fused engine runs real training steps (forward + backward, and a no-grad
evaluation) on the CPU with kernels='triton' inside ``kernels.compile_check.compile_only``: every kernel
launch compiles for GPUTarget("cuda", 90, 32) and is recorded instead of run (outputs stay uninitialised;
nothing here checks values). So the variants are exactly the ones a real step launches: the launchers' own
block-size choice, the dtypes each precision gives each op, Triton's argument specialisation. Models:
GPT-2 small and Large architectures (random weights, 2 layers: the first layer, a middle boundary and the
last layer's row selection all occur); batch sizes chosen so the target rows hit every branch of the block
choice (~15 to ~410 packed rows, 5 to ~215 target rows).

These are compiler figures, not GPU timings: a kernel without spills can still be slow.

    python benchmarks/compile_report.py                        # all variants -> benchmarks/results/compile-sm90.{md,json}
    python benchmarks/compile_report.py --precisions bf16,fp32 --models gpt2-large --batches 2,64 --check --json X
    python benchmarks/compile_report.py --sweep tree_attention --precisions fp32   # candidate tiles, not shipped

``--arch 80`` compiles for sm_80 instead (the shared-memory limit and the residency estimate stay sm_90's).
``--check`` exits 1 on a compile error, a spill, or shared memory over the sm_90 limit. Triton's own disk
cache (~/.triton/cache, or TRITON_CACHE_DIR) keeps compiles between runs; ``--fresh-cache`` compiles
everything anew (honest compile times).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):  # must compile, not interpret: own process
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from archs import FAMILY_ARCHS, random_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"gpt2": "GPT-2 small (d 768, 12 heads of 64)", "gpt2-large": "GPT-2 Large (d 1280, 20 heads of 64)",
          "smollm2-135m": "SmolLM2-135M (Llama kind: d 576, 9 heads of 64, 3 K/V heads, V 49,152)",
          "qwen3-0.6b": "Qwen3-0.6B (d 1024, 16 heads of 128, 8 K/V heads, q/k norm, V 151,936)",
          "gemma3-270m": "Gemma 3 270M (d 640, 4 heads of 256, 1 K/V head, sliding layers, V 262,144)"}
PRECISIONS = ("fp32", "bf16", "autocast")
BATCHES = (2, 4, 10, 24, 64, 100)  # examples a step: 5, ~8, 20, 42, 138, ~215 target rows; ~15 to ~410 packed rows


def _kernel_modules():
    import fastprompt.kernels  # noqa: F401

    return {name: sys.modules[f"fastprompt.kernels.{name}"]
            for name in ("tree_attention", "lm_head_ce", "layer_norm", "bias_gelu", "rms_norm", "rotary", "gated_act")}


def _jit_functions():
    from triton.runtime.jit import JITFunction

    fns = []
    for mod in _kernel_modules().values():
        fns += [v for v in vars(mod).values() if isinstance(v, JITFunction) and v.fn.__name__.endswith("_kernel")]
    return fns


def _tuner(model_name: str, precision: str):
    import fastprompt as fp
    from fastprompt.models import gpt2_tokenizer, random_gpt2

    if model_name in FAMILY_ARCHS:
        model = random_model(model_name, n_layer=2)  # a sliding and a full layer for Gemma 3
    else:
        model = random_gpt2(model_name, n_layer=2)
    model = model.eval().requires_grad_(False)
    # GPT-2's tokenizer for every model: ids < 50,257 fit each vocabulary, and the shapes are the model's
    return fp.PromptTuner(model, gpt2_tokenizer(), prompt_len=4, engine="fused", precision=precision,
                          kernels="triton", cuda_graphs="off", self_check=False)


def engine_cases(models, precisions, batches):
    """Yield (case name, callable that runs it) for each engine step."""
    import fastprompt as fp

    pairs = fp.load_pairs("antonyms")
    current = {}  # {(model, precision): tuner}: one at a time (a GPT-2 Large tuner holds ~1 GB)
    for model_name in models:
        for precision in precisions:
            def step(n, train, key=(model_name, precision)):
                if key not in current:
                    current.clear()
                    current[key] = _tuner(*key)
                tuner = current[key]
                vocab = tuner.model.config.vocab_size  # GPT-2's ids: keep the examples inside the vocabulary
                batch = [e for e in tuner.encode(pairs[: 4 * n]) if max(e.ids) < vocab][:n]
                rows = tuner.engine.rows_per_example(batch) * n
                targets = sum(len(e.ids) - e.target_start for e in batch)
                if train:
                    tuner.prompt.grad = None
                    tuner.loss(batch).backward()
                else:
                    with torch.no_grad():
                        tuner.loss(batch)
                return f"~{rows:.0f} rows, {targets} targets"

            for n in batches:
                yield f"{model_name} {precision} train batch {n}", lambda s=step, n=n: s(n, True)
            yield f"{model_name} {precision} eval batch {batches[-1]}", lambda s=step, n=batches[-1]: s(n, False)


# ------------------------------------------------------------------------------------------- sweep
SWEEPS = {
    # kernel family -> (module, choice function name, candidates as the choice function's return values)
    "tree_attention": ("tree_attention", "attention_blocks",
                       [(bm, bn, w) for bm, bn in ((16, 16), (32, 32), (32, 64), (64, 32), (64, 64), (128, 64))
                        for w in (4, 8)]),
    "lm_head_ce": ("lm_head_ce", "lm_head_blocks",
                   [(bm, bv, bd, w) for bm in (16, 32, 64) for bv in (64, 128) for bd in (32, 64) for w in (4, 8)]),
}


@contextlib.contextmanager
def _forced_choice(module, fn_name, value):
    """The launcher's choice function replaced by a constant (sweeps only: never what ships)."""
    original = getattr(module, fn_name)
    setattr(module, fn_name, lambda *a, **k: value)
    try:
        yield
    finally:
        setattr(module, fn_name, original)


# ------------------------------------------------------------------------------------------- run
def run_cases(cases, arch: int):
    """Run each case under compile_only; returns (variants, case notes, case errors)."""
    from fastprompt.kernels.compile_check import compile_only, compiled_kernels, describe, set_case

    notes, errors = {}, {}
    with compile_only(arch) as launches:
        for name, fn in cases:
            set_case(name)
            t0 = time.perf_counter()
            try:
                notes[name] = fn()
            except Exception as e:  # noqa: BLE001 - a compile error is a row of the report
                errors[name] = f"{type(e).__name__}: {str(e).strip()[-1500:]}"
            print(f"  {time.perf_counter() - t0:6.1f}s  {name}"
                  + (f"  ERROR {errors[name].splitlines()[0]}" if name in errors else ""), file=sys.stderr, flush=True)
        kernels = compiled_kernels(_jit_functions(), arch)
    variants = {}
    for launch in launches:
        v = variants.get(launch.hash)
        if v is None:
            v = variants[launch.hash] = describe(kernels[launch.hash], arch)
            v.compile_s = round(launch.seconds, 2)
        if launch.case not in v.cases:
            v.cases.append(launch.case)
        if list(launch.grid) not in v.grids:
            v.grids.append(list(launch.grid))
    return list(variants.values()), notes, errors


def problems(variants, errors) -> list[str]:
    from fastprompt.kernels.compile_check import SM90_MAX_SHARED

    out = [f"compile error in '{case}': {err.splitlines()[0]}" for case, err in errors.items()]
    for v in variants:
        tag = f"{v.kernel} {_config(v)}"
        if v.spill_stores or v.spill_loads:
            out.append(f"{tag}: spills {v.spill_stores} B stores / {v.spill_loads} B loads per thread")
        if v.shared > SM90_MAX_SHARED:
            out.append(f"{tag}: shared memory {v.shared} B over the sm_90 limit {SM90_MAX_SHARED} B")
    return out


def _config(v) -> str:
    c = ", ".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v.constexprs.items()
                  if k not in ("K", "C", "BETA1", "BETA2"))
    return c


def _precisions_of(v) -> str:
    seen = []
    for case in v.cases:
        parts = case.split()
        tag = parts[1] if parts[0] in MODELS else "fp32"
        if tag not in seen:
            seen.append(tag)
    return "/".join(seen)


def table(variants) -> str:
    head = ("| kernel | precision | constexprs | specialised | warps/stages | regs | spill st/ld B | smem KB "
            "| blocks (warps)/SM | dots | compile s |")
    lines = [head, "|" + "---|" * 11]
    for v in sorted(variants, key=lambda v: (v.kernel, _precisions_of(v), str(v.constexprs), v.specialisation)):
        dots = ", ".join(f"{k}×{n}" for k, n in sorted(v.dots.items())) or "—"
        lines.append(f"| {v.kernel.removeprefix('_')} | {_precisions_of(v)} | {_config(v)} | "
                     f"{' '.join(v.specialisation) or '—'} | {v.num_warps}/{v.num_stages} | {v.registers} | "
                     f"{v.spill_stores}/{v.spill_loads} | {v.shared / 1024:.1f} | {v.blocks_per_sm} ({v.warps_per_sm}) | "
                     f"{dots} | {v.compile_s:.1f} |")
    return "\n".join(lines)


def versions() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas, get_ptxas_version

    return {"triton": triton.__version__, "torch": torch.__version__,
            "ptxas": next((line.split(", ", 1)[-1] for line in get_ptxas_version(90).splitlines() if "release" in line),
                          get_ptxas_version(90).strip().splitlines()[-1]), "ptxas_path": Path(get_ptxas(90).path).name,
            "python": platform.python_version()}


def markdown(variants, notes, errors, meta) -> str:
    out = [f"# Triton kernels compiled for sm_{meta['arch']} (compiler figures, not GPU timings)", "",
           f"`python benchmarks/compile_report.py` on a CPU-only machine: triton {meta['versions']['triton']}, "
           f"ptxas {meta['versions']['ptxas']} ({meta['versions']['ptxas_path']} -v --gpu-name=sm_{meta['arch']}a), "
           f"torch {meta['versions']['torch']}. Each row is one compiled variant (deduplicated over the cases "
           "that launched it). regs and spills from ptxas -v (bytes per thread); smem: shared memory per "
           "block as Triton allocated it; blocks (warps)/SM: residency estimate from registers, shared memory "
           "and warps against sm_90 limits (64K registers, 228 KB, 64 warps); dots: how each tl.dot lowered "
           "(wgmma = Hopper warpgroup MMA, mma_v2 = mma.sync, fma = CUDA cores). compile s: wall time of the "
           "first launch (includes Triton's disk cache when warm).", "",
           table(variants), ""]
    bad = problems(variants, errors)
    out += ["**Problems** (compile errors, spills, shared memory over 227 KB): "
            + ("none." if not bad else ""), ""]
    out += [f"- {p}" for p in bad]
    out += ["", "Cases (engine steps: rows = packed rows computed, targets = LM-head rows):", ""]
    out += [f"- {case}: {notes.get(case) or 'ERROR ' + errors.get(case, '')}" for case in meta["cases"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="comma list of %s" % ", ".join(MODELS))
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma list of fp32, bf16, autocast")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)), help="examples a step, comma list")
    p.add_argument("--arch", type=int, default=90, help="compute capability to compile for (default: 90)")
    p.add_argument("--out", default=None, metavar="STEM",
                   help="write the table and the JSON to STEM plus .md and .json (default with no --json: "
                   "benchmarks/results/compile-smARCH)")
    p.add_argument("--json", default=None, help="write only this JSON file")
    p.add_argument("--check", action="store_true", help="exit 1 on a compile error, spill or shared memory over the limit")
    p.add_argument("--sweep", choices=sorted(SWEEPS), help="compile candidate tiles of one kernel family instead")
    p.add_argument("--candidates", default=None, help="with --sweep: the candidates, e.g. '64,64,4;64,64,8'")
    p.add_argument("--fresh-cache", action="store_true", help="compile into an empty Triton cache (real compile times)")
    args = p.parse_args(argv)
    if args.fresh_cache:
        fresh = tempfile.TemporaryDirectory(prefix="fastprompt-compile-")  # removed when the process ends
        os.environ["TRITON_CACHE_DIR"] = fresh.name
    torch.manual_seed(0)
    models = [m for m in args.models.split(",") if m]
    precisions = [x for x in args.precisions.split(",") if x]
    batches = [int(b) for b in args.batches.split(",") if b]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}")
    cases = list(engine_cases(models, precisions, batches))
    meta = {"arch": args.arch, "versions": versions(), "models": models, "precisions": precisions,
            "batches": batches, "cases": [c[0] for c in cases]}
    if args.sweep:
        return sweep(args, cases, meta)
    variants, notes, errors = run_cases(cases, args.arch)
    print(table(variants))
    bad = problems(variants, errors)
    print("\nproblems: " + ("none" if not bad else ""))
    for line in bad:
        print("  " + line)
    record = {**meta, "notes": notes, "errors": errors, "variants": [v.as_dict() for v in variants]}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    else:
        out = Path(args.out) if args.out else RESULTS / f"compile-sm{args.arch}"
        out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(variants, notes, errors, meta))
        print(f"\nwrote {out.with_suffix('.md')} and .json", file=sys.stderr)
    return 1 if (args.check and bad) else 0


def sweep(args, cases, meta) -> int:
    """Compile each candidate of a kernel family's choice function over the same cases; one table."""
    module_name, fn_name, candidates = SWEEPS[args.sweep]
    if args.candidates:
        candidates = [tuple(int(x) for x in c.split(",")) for c in args.candidates.split(";") if c]
    module = _kernel_modules()[module_name]
    rows = []
    for cand in candidates:
        with _forced_choice(module, fn_name, cand):
            variants, _, errors = run_cases(cases, args.arch)
        for v in variants:
            if v.kernel.startswith(f"_{module_name.split('_')[0]}"):
                rows.append((cand, v))
        for case, err in errors.items():
            print(f"{cand}: {case}: {err.splitlines()[0]}")
    print(f"| candidate | {table([]).splitlines()[0][2:]}")
    for cand, v in rows:
        print(f"| {cand} " + table([v]).splitlines()[2])
    if args.json:
        Path(args.json).write_text(json.dumps({**meta, "sweep": args.sweep, "rows": [
            {"candidate": list(c), **v.as_dict()} for c, v in rows]}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
