"""Per-rank memory (and, with --speed, step time) of sharded vs replicated frozen weights on CPU processes.

    python benchmarks/shard_memory.py                      # memory: 1 process, then 2 and 3 sharded (~2 min)
    python benchmarks/shard_memory.py --speed              # step time: 2 processes replicated vs sharded
    python benchmarks/shard_memory.py --json OUT.json      # also write the records
    python benchmarks/shard_memory.py --engines fused      # one engine only (default: generic,fused)

GPT-2 small architecture with random weights, saved once with ``save_pretrained`` to a temporary directory
(``--model-dir`` to keep or reuse one), loaded by ``fastprompt.sharding.load_sharded`` (the meta device,
each rank reading its chunks) for sharded runs and by ``load_model`` otherwise. Each rank reports: RSS after
the imports (the baseline), peak RSS after loading, anonymous resident memory (``RssAnon``: no file pages)
right after loading and after the steps, the steps' own peak RSS (``VmHWM`` reset after loading), peak RSS
after the training steps (``ru_maxrss``: the process's high-water mark), and the parameter bytes it holds
(layer chunks + table chunks, the embeddings and tied head + the unsharded rest). Training:
each engine of ``--engines`` (generic, and the packed ``fused`` engine whose layers ``sharding.LayerGather``
gathers), fp32, batch 16 of the built-in antonyms, the default template, prompt_len 4.
``--speed`` times ``--steps`` steps after one warm-up, median seconds a step, replicated
(``DataParallelEngine``) and sharded in the same run; run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MB = 1 << 20


def rss_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (resident now) or ``RssAnon`` (resident anonymous memory now: no file pages) in MiB."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> bool:
    """Reset the kernel's high-water mark (``VmHWM``; Linux: ``clear_refs`` 5), so that ``rss_mb("VmHWM")``
    reads the peak since now. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    base = rss_mb()
    import torch

    from fastprompt import PromptTuner, load_model, load_pairs
    from fastprompt.distributed import setup
    from fastprompt.sharding import load_sharded, sharded_weights

    base = max(base, rss_mb())
    ctx, device = setup(torch.device("cpu"))
    if args.shard:
        model, tokenizer = load_sharded(args.model_dir)
    else:
        model, tokenizer = load_model(args.model_dir)
    after_load, anon_load = peak_mb(), rss_mb("RssAnon")
    step_peak = reset_peak()  # the steps' own peak: VmHWM from here
    weights = sharded_weights(model)
    held = weights.local_bytes(model) if weights is not None else \
        {"layer_shards": 0, "table_shards": 0,
         "unsharded": sum(p.numel() * p.element_size() for p in model.parameters())}
    tuner = PromptTuner(model, tokenizer, prompt_len=4, engine=args.engine, precision="fp32", seed=0)
    ctx.wrap(tuner)
    tuner.optimizer = tuner.make_optimizer(1e-3)
    examples = load_pairs("antonyms")[: args.batch_size * (args.steps + 1)]
    batches = [tuner.encode(examples[i: i + args.batch_size]) for i in range(0, len(examples), args.batch_size)]
    times = []
    for batch in batches:
        ctx.barrier()
        t0 = time.perf_counter()
        tuner.train_step(batch)
        times.append(time.perf_counter() - t0)
    record = {"rank": ctx.rank, "world_size": ctx.world_size, "sharded": bool(args.shard),
              "rss_baseline_mb": round(base, 1), "peak_rss_after_load_mb": round(after_load, 1),
              "peak_rss_after_steps_mb": round(peak_mb(), 1),
              "peak_rss_of_steps_mb": round(rss_mb("VmHWM"), 1) if step_peak else None, "anon_after_load_mb": round(anon_load, 1),
              "anon_after_steps_mb": round(rss_mb("RssAnon"), 1),
              "param_mb": {k: round(v / MB, 1) for k, v in held.items()},
              "step_s_median": statistics.median(times[1:]) if len(times) > 1 else None,
              "steps": len(times) - 1, "torch_threads": torch.get_num_threads(),
              "engine": tuner.engine.name, "engine_described": tuner.engine.describe()}
    with open(os.path.join(args.records, f"rank{ctx.rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)  # a file a rank: torchrun interleaves the ranks' stdout
    ctx.close()


def launch(n: int, shard: bool, engine: str, args) -> list[dict]:
    records = tempfile.mkdtemp(prefix="shard-records-")
    cmd = [__file__, "--worker", "--model-dir", args.model_dir, "--batch-size", str(args.batch_size),
           "--steps", str(args.steps), "--engine", engine, "--records", records] + (["--shard"] if shard else [])
    # a fixed mmap threshold: freed blocks of 1 MiB and more go back to the OS at once, so the high-water
    # mark counts live memory, not glibc's heap grown by the all-gathers' freed buffers
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    if n == 1:
        full = [sys.executable, *cmd]
    else:
        full = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *cmd]
    result = subprocess.run(full, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(full)} failed:\n{result.stderr[-3000:]}")
    rows = []
    for name in sorted(os.listdir(records)):
        with open(os.path.join(records, name), encoding="utf-8") as f:
            rows.append(json.load(f))
    shutil.rmtree(records)
    if len(rows) != n:
        raise SystemExit(f"{' '.join(full)}: {len(rows)} records of {n} ranks")
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help="GPT-2 small (random) saved here once, reused if present")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=None, help="timed steps after one warm-up (memory: 1, speed: 10)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process (default 1)")
    p.add_argument("--speed", action="store_true", help="time 2 processes, replicated vs sharded")
    p.add_argument("--engines", default="generic,fused", help="comma-separated engines, each a set of runs")
    p.add_argument("--engine", default="generic", help=argparse.SUPPRESS)  # the worker's
    p.add_argument("--records", default=None, help=argparse.SUPPRESS)  # where the worker writes its record
    p.add_argument("--json", default=None, help="write the records to this file")
    args = p.parse_args()
    if args.steps is None:
        args.steps = 10 if args.speed else 1
    if args.worker:
        return worker(args)
    tmp = None
    if args.model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="shard-memory-")
        args.model_dir = os.path.join(tmp.name, "gpt2-small-random")
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        from fastprompt.models import gpt2_tokenizer, random_gpt2

        random_gpt2("gpt2", seed=0).save_pretrained(args.model_dir)
        gpt2_tokenizer().save_pretrained(args.model_dir)
    sizes = [(2, False), (2, True)] if args.speed else [(1, False), (2, True), (3, True)]
    runs = [(n, shard, engine) for engine in args.engines.split(",") for n, shard in sizes]
    records = []
    for n, shard, engine in runs:
        rows = launch(n, shard, engine, args)
        records += rows
        for r in rows:
            held = r["param_mb"]
            line = (f"{engine:7s} {n} process{'es' * (n > 1)} {'sharded   ' if shard else 'replicated'} rank {r['rank']}: "
                    f"params held {sum(held.values()):.0f} MB (layer chunks {held['layer_shards']:.0f} + table "
                    f"chunks {held['table_shards']:.0f} + unsharded {held['unsharded']:.0f}); peak RSS "
                    f"{r['peak_rss_after_load_mb']:.0f} MB after load, {r['peak_rss_after_steps_mb']:.0f} MB after "
                    f"{r['steps'] + 1} steps (baseline {r['rss_baseline_mb']:.0f} MB; the steps' own peak "
                    f"{r['peak_rss_of_steps_mb'] or float('nan'):.0f} MB); anonymous now "
                    f"{r['anon_after_load_mb']:.0f} MB after load, {r['anon_after_steps_mb']:.0f} MB after the steps")
            if args.speed:
                line += f"; median step {r['step_s_median']:.3f} s"
            print(line, flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"model": "gpt2 (random, save_pretrained)", "batch_size": args.batch_size,
                       "threads": args.threads, "load_average": os.getloadavg(), "records": records}, f, indent=1)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
