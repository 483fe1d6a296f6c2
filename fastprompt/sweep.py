"""Several prompts in one run (docs/ARCHITECTURE.md, 'K prompts in one pass'): ``--sweep KEY=V1,V2`` (a product
grid) and ``--data`` given several times (one prompt per task), trained together, one pass over the weights a
step (``PromptTuner.fit_many``).

    python -m fastprompt.train --model tiny --sweep lr=1e-3,1e-2 --sweep init=random,text:antonyms --out runs/s

Every point is an ordinary run in its own folder of ``--out`` (``lr-0.001_init-random/``: metrics.jsonl,
prompt.safetensors, checkpoint, samples.txt, nearest.txt, loss.png), made by the single run's code
(``train.run_many``: ``train.open_run``, ``session.Session``, ``train.write_final``); beside them ``sweep.md`` and ``sweep.json``
(each point's settings, final test loss, exact match, parrot rate, steps; the best point named) and
``sweep.png`` (every point's test-loss curve). ``--resume`` continues every point from its own checkpoint.

What a point may change: the keys of ``SWEEP_KEYS`` (the prompt's init and seed, its optimizer's learning rate,
its batches and budgets, and its length). The points of one prompt length share one engine and train in one
pass; each other length is a group of its own, trained after the previous one (``train.run_many``). The model,
template, method, engine and precision are the run's (``parse_sweep`` says so for any other key). The model is
loaded once, with the run's ``--seed`` (a random ``tiny`` model is the same for every point); a point's seed sets its
split, init and shuffling.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import re
from typing import Any

from .errors import ConfigError
from .options import BY_NAME
from .outputs import atomic_write, import_pyplot, write_text

SWEEP_KEYS = ("lr", "init", "seed", "batch_size", "epochs", "max_steps", "prompt_len")
NOT_SWEPT = "the points share one engine: model, template, method, engine and precision are the run's"


def parse_sweep(items) -> list[tuple[str, list]]:
    """``["lr=1e-3,1e-2", "init=random,text:antonyms"]`` -> ``[("lr", [0.001, 0.01]), ("init", [...])]``, each
    value parsed and checked as its option's (``ConfigError`` naming ``--sweep``)."""
    grid: list[tuple[str, list]] = []
    for item in items or []:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not values.strip():
            raise ConfigError(f"--sweep takes KEY=V1,V2,..., got {item!r}")
        if key not in SWEEP_KEYS:
            known = key in BY_NAME
            raise ConfigError(f"--sweep {key}: {'not a per-prompt option; ' + NOT_SWEPT if known else 'no such option'}"
                              f" (sweep keys: {', '.join(SWEEP_KEYS)})")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--sweep {key} given twice: put every value in one --sweep {key}=V1,V2")
        option = BY_NAME[key]
        parsed = []
        for raw in values.split(","):
            try:
                value = option.type(raw.strip()) if option.type not in (None, str) else raw.strip()
            except ValueError:
                raise ConfigError(f"--sweep {key}: {raw.strip()!r} is not a value of {option.cli}") from None
            problem = option.problem(value, f"--sweep {key}")
            if problem:
                raise ConfigError(problem)
            parsed.append(value)
        if len(set(map(str, parsed))) != len(parsed):
            raise ConfigError(f"--sweep {key}: a value is given twice")
        grid.append((key, parsed))
    return grid


def point_name(settings: dict[str, Any]) -> str:
    """A folder name for a point's settings: ``lr-0.001_init-text-antonyms``."""
    parts = [f"{k}-{v:g}" if isinstance(v, float) else f"{k}-{v}" for k, v in settings.items()]
    return re.sub(r"[^A-Za-z0-9.+_-]+", "-", "_".join(parts)) or "point"


def points_of(config) -> list[tuple[str, dict[str, Any]]]:
    """``(name, settings)`` of every point: the tasks of ``--data`` times the ``--sweep`` grid."""
    tasks = list(config.data) if isinstance(config.data, (list, tuple)) else [config.data]
    if len(set(tasks)) != len(tasks):
        raise ConfigError("--data names a task twice")
    if len(tasks) > 1 and config.eval_data is not None:
        raise ConfigError("--eval-data with several --data: each task is evaluated on its own split; leave it out")
    grid = parse_sweep(config.sweep)
    points = []
    for values in itertools.product(*[vs for _, vs in grid]):
        settings = dict(zip([k for k, _ in grid], values))
        for t in tasks:
            task = {"task": _task_name(t, tasks)} if len(tasks) > 1 else {}
            points.append((point_name({**task, **settings}), {**task, "data": t, **settings}))
    return points


def _task_name(path: str, tasks: list[str]) -> str:
    name = os.path.splitext(os.path.basename(path))[0] or path
    return name if sum(os.path.splitext(os.path.basename(t))[0] == name for t in tasks) == 1 else path


def final_line(out: str) -> dict | None:
    """The point's final record (the ``final`` event of its metrics.jsonl)."""
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            finals = [r for r in map(json.loads, f) if r.get("event") == "final"]
    except (OSError, ValueError):
        return None
    return finals[-1] if finals else None


def row_of(name: str, settings: dict, tuner, final: dict | None, error: str | None) -> dict[str, Any]:
    last = tuner.history[-1] if tuner.history else {}
    final = final or {}
    return {"point": name, "settings": {k: v for k, v in settings.items()},
            "test_loss": final.get("test_loss", last.get("test_loss")),
            "exact_match": final.get("test_exact_match"), "parrot_rate": final.get("test_parrot_rate"),
            "steps": last.get("step", 0) + (tuner.resume_at["step"] if tuner.resume_at else 0),
            "stopped": error}


def best_point(rows: list[dict]) -> dict | None:
    """The point of lowest final test loss (a stopped point, or one without a test loss, never)."""
    scored = [r for r in rows if r["stopped"] is None and r["test_loss"] is not None and math.isfinite(r["test_loss"])]
    return min(scored, key=lambda r: r["test_loss"]) if scored else None


def write_table(out: str, rows: list[dict]) -> dict:
    """sweep.json and sweep.md: every point's settings and results, the best point named."""
    best = best_point(rows)
    summary = {"points": rows, "best": best["point"] if best else None}
    # strict JSON: a stopped point's NaN/inf test loss is written as null (its "stopped" says why)
    finite = {"points": [{**r, **{k: None for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}}
                         for r in rows], "best": summary["best"]}
    write_text(os.path.join(out, "sweep.json"), json.dumps(finite, indent=1, allow_nan=False) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r["settings"] if k != "data"))  # "task" names the data

    def cell(v, pct=False):
        if v is None:
            return "–"
        if pct:
            return f"{100 * v:.1f}%"
        if not isinstance(v, float):
            return str(v)
        if not math.isfinite(v):
            return str(v).replace("nan", "NaN")
        return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e4 else f"{v:.4g}"  # 1e-05, 1e+30: not 0.0000

    lines = ["| point | " + " | ".join(keys) + " | test loss | exact match | parrot rate | steps |",
             "|---" * (len(keys) + 5) + "|"]
    for r in rows:
        mark = " **best**" if best is r else (" (stopped: NaN/inf)" if r["stopped"] else "")
        lines.append(f"| {r['point']}{mark} | " + " | ".join(cell(r["settings"].get(k)) for k in keys)
                     + f" | {cell(r['test_loss'])} | {cell(r['exact_match'], True)} | "
                       f"{cell(r['parrot_rate'], True)} | {r['steps']} |")
    lines.append("")
    lines.append(f"best: {best['point']} (test loss {best['test_loss']:.4f})" if best else "best: none (no test loss)")
    write_text(os.path.join(out, "sweep.md"), "\n".join(lines) + "\n")
    return summary


def plot_sweep(path: str, rows: list[dict], histories: dict[str, list[dict]]) -> None:
    """Every point's test loss an epoch in one figure (matplotlib, the ``plot`` extra; skipped with a note
    without it, as loss.png is)."""
    plt = import_pyplot("sweep.png")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = 0
    for r in rows:
        h = [e for e in histories.get(r["point"], []) if "test_loss" in e]
        if h:
            ax.plot([e["epoch"] for e in h], [e["test_loss"] for e in h], label=r["point"])
            curves += 1
    ax.set_xlabel("epoch")
    ax.set_ylabel("test target cross-entropy")
    if curves:
        ax.legend(fontsize="small")
    else:  # no point finished an epoch with a test split (a budget stop in the first epoch, --test-size 0)
        ax.text(0.5, 0.5, "no epoch's test loss yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
