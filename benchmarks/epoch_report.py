"""The epoch benchmark's summary table, from the result records test_epoch.py writes.

Used by benchmarks/conftest.py (printed at the end of ``pytest benchmarks --benchmark-only``) and by
benchmarks/gpu_check.sh (``python benchmarks/epoch_report.py RESULTS.jsonl``: the table from the
records of a run, even one cut short by its time limit).

Speedups are computed here, within one run, against the baselines of that run: ``naive fp32`` (and on
the GPU also ``naive autocast``) at the same prompt length.
"""
from __future__ import annotations

import json
import math
import sys
from typing import Iterable


def with_speedups(records: Iterable[dict]) -> list[dict]:
    """Records with ``speedup_vs_naive_fp32`` / ``speedup_vs_naive_autocast`` filled in where the
    baseline of the same config, model family, method and prompt length was measured in the same run."""
    records = [dict(r) for r in records]
    base = {}
    for r in records:
        if r.get("engine") == "naive" and r.get("epoch_s"):
            base[(r.get("config"), r.get("family", ""), r.get("method", "soft"), r.get("prompt_len"),
                  r.get("precision"))] = r["epoch_s"]
    for r in records:  # family rows against their own model's naive row
        for precision in ("fp32", "autocast"):
            ref = base.get((r.get("config"), r.get("family", ""), r.get("method", "soft"), r.get("prompt_len"), precision))
            key = f"speedup_vs_naive_{precision}"
            r[key] = ref / r["epoch_s"] if ref and r.get("epoch_s") else None
    peft = {(r.get("config"), r.get("prompt_len")): r["epoch_s"] for r in records
            if r.get("engine") == "peft" and r.get("epoch_s")}
    for r in records:  # fastprompt training a PEFT model against PEFT's own loop of the same run
        ref = peft.get((r.get("config"), r.get("prompt_len")))
        if r.get("engine") == "from_peft" and ref and r.get("epoch_s"):
            r["speedup_vs_peft"] = ref / r["epoch_s"]
    return records


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def table(records: Iterable[dict]) -> str:
    """A fixed-width table, one line per measured (or unavailable) engine, then the notes."""
    records = with_speedups(records)
    if not records:
        return "(no epoch benchmark results)"
    gpu = any(r.get("config") == "gpu" for r in records)
    cols = ["engine", "precision", "L", "epoch s", "x naive fp32"]
    if gpu:
        cols += ["x naive autocast", "ms/step", "floor ms", "x floor", "peak GB"]
    else:
        cols += ["cpu s"]
    cols += ["rows/ex", "GFLOP/s", "note"]
    rows = []
    for r in records:
        row = [r.get("label") or r.get("engine", "?"), r.get("precision", "?"), str(r.get("prompt_len", "?"))]
        if r.get("status", "ok") != "ok":
            row += [r["status"]] + [""] * (len(cols) - 5) + [r.get("note", "")]
            rows.append(row)
            continue
        row += [_fmt(r.get("epoch_s"), ".2f"), _fmt(r.get("speedup_vs_naive_fp32"), ".2f")]
        if gpu:
            floor = r.get("floor_ms")
            step = r.get("ms_per_step")
            row += [_fmt(r.get("speedup_vs_naive_autocast"), ".2f"), _fmt(step, ".2f"), _fmt(floor, ".2f"),
                    _fmt(step / floor if step and floor else None, ".1f"), _fmt(r.get("peak_mem_gb"), ".2f")]
        else:
            row += [_fmt(r.get("process_cpu_s"), ".2f")]
        note = r.get("note", "")
        if r.get("speedup_vs_peft"):  # from_peft rows: the ratio the target is about
            note = "; ".join(x for x in (f"{r['speedup_vs_peft']:.2f}x PEFT's loop", note) if x)
        row += [_fmt(r.get("rows_per_example"), ".2f"), _fmt(r.get("gflop_per_s"), ".1f"), note]
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    widths[-1] = len(cols[-1])  # the note runs free at the end of the line
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, len(cols) - 1) else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(cols), line(["-" * w for w in widths])] + [line(row) for row in rows]
    first = records[0]
    out.append("")
    model = first.get('model', '?')
    weights = "real weights" if model in ("smollm2-135m", "gemma3-270m") else "random weights"
    out.append(f"device: {first.get('device', '?')}; model: {model} ({weights}); "
               f"batch {first.get('batch_size', '?')}; {first.get('n_examples', '?')} training examples an epoch; "
               f"torch {first.get('torch', '?')}, {first.get('threads', '?')} threads")
    out.append("epoch s: median over rounds of one epoch of Adam steps (tokenisation done once before timing); "
               "x naive: speedup over that baseline measured in this run; rows/ex: transformer rows computed "
               "per example per step (naive, PEFT: padded length; generic, fused: engine.rows_per_example)")
    loads = [x for r in records for x in (r.get("loadavg_1min") or []) if x is not None]
    if not gpu:
        out.append("cpu s: this process's CPU time for the same epoch (median round); it shows how much of the "
                   "wall time the process actually ran" + (f"; 1-minute load average during the run "
                                                           f"{min(loads):.1f}-{max(loads):.1f}" if loads else ""))
    if gpu:
        bw = first.get("copy_GBps")
        out.append(f"floor ms: 2 x bf16 weight bytes / measured device-to-device copy bandwidth "
                   f"({_fmt(bw, '.0f')} GB/s); peak GB: torch.cuda.max_memory_allocated, reset per engine "
                   "(includes the fp32 model every engine is built from)")
    return "\n".join(out)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/epoch_report.py RESULTS.jsonl")
    print(table(read_jsonl(sys.argv[1])))
