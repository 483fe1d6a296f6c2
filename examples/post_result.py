"""The post's experiment on a real model, in one command and a time budget: the hand-written " antonyms"
against trained prompts, with loss curves and a sample-efficiency run.

    python examples/post_result.py --model smollm2 --steps 150 --minutes 25 --out runs/post_smollm2
    python examples/post_result.py --model gemma3-270m --minutes 60 --out runs/post_gemma
    python examples/post_result.py --model tiny --minutes 1 --curve-size 16 --eval-size 16 --out /tmp/post

Rows (the built-in antonyms, 80/20 split with --seed; every trained row gets the same share of the budget):

* hand-written: the soft prompt at the token embeddings of --words (0 steps);
* soft, random init (the post's), --prompt-len vectors;
* soft, initialised from --words (as many vectors as the words have tokens);
* hard (PEZ) and relaxed (vocabulary softmax), random init, --prompt-len; with --steps the relaxed
  temperature is annealed over the row's whole budget (one ``fit`` plans it), so it ends hard;
* prefix-tuning (per-layer K/V at the slot), initialised from --words, where the model supports it (a row
  saying why not, otherwise);
* sample efficiency: the random-init soft prompt again on the first 100 and 500 training pairs (the
  whole split is its row above).

Each row reports the test loss on the whole test split, the generation metrics (normalised exact match and
parrot rate, see fastprompt/metrics.py; strict ones in results.json) on its first --eval-size pairs, and
the steps it got. Loss curves: the train loss (mean of the steps since the last point) and the test loss on
the first --curve-size test pairs, every --curve-every steps. Outputs in --out: results.md, results.json,
loss_curves.png, sample_efficiency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--template", default="Here are two {prompt} {input} and {target}")
    p.add_argument("--words", default="antonyms", help="the hand-written prompt")
    p.add_argument("--minutes", type=float, default=60.0, help="training time of all rows together")
    p.add_argument("--steps", type=int, default=None, help="at most N steps a row (default: the time budget only)")
    p.add_argument("--test-limit", type=int, default=None, help="the first N pairs of the test split only")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--sizes", default="100,500", help="extra training-set sizes for the soft prompt")
    p.add_argument("--eval-size", type=int, default=300, help="generation metrics on the first N test pairs")
    p.add_argument("--curve-size", type=int, default=128, help="curve test loss on the first N test pairs")
    p.add_argument("--curve-every", type=int, default=10, help="a curve point every N steps")
    p.add_argument("--engine", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="runs/post_result")
    return p.parse_args(argv)


def rows_to_run(args, n_words: int) -> list[dict]:
    words = f"text: {args.words.strip()}"
    rows = [dict(name="hand-written", method="soft", init=words, prompt_len=n_words, train=False),
            dict(name="soft, random init", method="soft", init="random", prompt_len=args.prompt_len),
            dict(name=f"soft, init {args.words.strip()!r}", method="soft", init=words, prompt_len=n_words),
            dict(name="hard (PEZ)", method="hard", init="random", prompt_len=args.prompt_len),
            dict(name="relaxed", method="relaxed", init="random", prompt_len=args.prompt_len),
            dict(name=f"prefix-tuning, init {args.words.strip()!r}", method="prefix", init=words, prompt_len=n_words)]
    for size in (int(s) for s in args.sizes.split(",") if s.strip()):
        rows.append(dict(name=f"soft, random init, {size} pairs", method="soft", init="random",
                         prompt_len=args.prompt_len, train_size=size))
    return rows


def run(args) -> dict:
    import torch

    import fastprompt as fp

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    train, test = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=args.seed)
    test = test[: args.test_limit] if args.test_limit else test
    t0 = time.perf_counter()
    model, tok = fp.load_model(args.model, seed=args.seed)
    load_s = time.perf_counter() - t0
    n_words = len(tok(" " + args.words.strip(), add_special_tokens=False)["input_ids"])
    plan = rows_to_run(args, n_words)
    share = 60.0 * args.minutes / sum(1 for r in plan if r.get("train", True))
    results = []
    for spec in plan:
        t_row = time.perf_counter()
        try:
            tuner = fp.PromptTuner(model, tok, args.template, spec["prompt_len"], engine=args.engine,
                                   init=spec["init"], seed=args.seed, method=spec["method"])
        except fp.FastpromptError as e:  # a method this model does not support: said in the table
            results.append({"prompt": spec["name"], "method": spec["method"], "prompt_len": spec["prompt_len"],
                            "skipped": str(e), "curve": [], "steps": 0, "train_pairs": 0})
            print(f"{spec['name']}: skipped ({e})", flush=True)
            continue
        data = fp.subsample(train, spec.get("train_size"), seed=args.seed)
        curve = []
        if spec.get("train", True):
            curve = train_with_curve(tuner, data, test[: args.curve_size], args, share)
        metrics = tuner.evaluate(test, generation_size=args.eval_size)
        ids = tuner.method.token_ids(tuner.prompt)
        tokens = tok.decode(ids) if ids is not None else (" " + args.words.strip() if not curve else None)
        row = {"prompt": spec["name"], "method": spec["method"], "prompt_len": spec["prompt_len"],
               "train_pairs": len(data) if spec.get("train", True) else 0,
               "steps": curve[-1]["step"] if curve else 0, "seconds": time.perf_counter() - t_row,
               "tokens": tokens, "curve": curve,
               **{f"test_{k}": v for k, v in metrics.items()}}
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "curve"}), flush=True)
    report = {"args": vars(args), "model": args.model, "load_seconds": load_s, "rows": results,
              "test_pairs": len(test), "machine": machine(), "total_seconds": time.perf_counter() - started}
    write(args, report)
    return report


def train_with_curve(tuner, data, curve_test, args, seconds: float) -> list[dict]:
    """With ``--steps``: one ``fit`` of that many steps (stopped early after ``seconds``); without: ``fit`` one epoch
    at a time until ``seconds`` have passed (the relaxed temperature is then planned over an epoch). A curve
    point every ``--curve-every`` steps and at the end."""
    curve, last = [], {"ce": 0.0, "tokens": 0, "epoch": -1}
    steps = [0]

    def point(step):
        ce, n = last["ce"], last["tokens"]
        test_loss = tuner.evaluate(curve_test, generation=False)["loss"]
        curve.append({"step": step, "train_loss": ce / n if n else float("nan"), "test_loss": test_loss})
        last["ce"], last["tokens"] = 0.0, 0

    def after_step(info):
        if info["epoch"] != last["epoch"]:
            last["epoch"], last["epoch_ce"], last["epoch_tokens"] = info["epoch"], 0.0, 0
        ce_total = float(info["ce_sum"])  # the epoch's running sum: this step's share is the difference
        last["ce"] += ce_total - last["epoch_ce"]
        last["tokens"] += info["n_tokens"] - last["epoch_tokens"]
        last["epoch_ce"], last["epoch_tokens"] = ce_total, info["n_tokens"]
        steps[0] += 1
        if steps[0] % args.curve_every == 0:
            point(steps[0])

    point(0)
    t0 = time.perf_counter()
    if args.steps is not None:  # one fit over the whole row: a schedule (relaxed's temperature) spans it
        per_epoch = -(-len(data) // args.batch_size)
        tuner.fit(data, epochs=-(-args.steps // per_epoch), batch_size=args.batch_size, lr=args.lr, progress=False,
                  step_callback=after_step, max_seconds=seconds, max_steps=args.steps)
    while args.steps is None:
        left = seconds - (time.perf_counter() - t0)
        steps_left = None if args.steps is None else args.steps - steps[0]
        tuner.fit(data, epochs=1, batch_size=args.batch_size, lr=args.lr, progress=False, step_callback=after_step,
                  max_seconds=max(left, 0.0), max_steps=steps_left)
        if tuner.stopped or time.perf_counter() - t0 >= seconds:
            break
    if curve[-1]["step"] != steps[0]:
        point(steps[0])
    return curve


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def write(args, report) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    rows = report["rows"]
    lines = [f"Model `{report['model']}` (loaded in {report['load_seconds']:.0f} s) on {report['machine']}; "
             f"template `{args.template}`; {report['test_pairs']} test pairs (generation metrics on the first "
             f"{min(args.eval_size, report['test_pairs'])}); batch {args.batch_size}, Adam lr {args.lr}, "
             f"{args.minutes:g} minutes of training in all; whole run {report['total_seconds'] / 60:.0f} minutes.", "",
             "| prompt | length | train pairs | steps | test loss | exact match | parrot rate | tokens | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['prompt']} | {r['prompt_len']} | | | not run: {r['skipped']} | | | | |")
            continue
        tokens = f"`{r['tokens']!r}`" if r["tokens"] is not None else "—"
        lines.append(f"| {r['prompt']} | {r['prompt_len']} | {r['train_pairs']} | {r['steps']} | "
                     f"{r['test_loss']:.4f} | {100 * r['test_exact_match']:.1f}% | {100 * r['test_parrot_rate']:.1f}% "
                     f"| {tokens} | {r['seconds']:.0f} |")
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    plot(args, rows)


def plot(args, rows) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, plots skipped (pip install 'fastprompt[plot]')")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        if r.get("curve") and "pairs" not in r["prompt"]:
            steps = [p["step"] for p in r["curve"]]
            a.plot(steps[1:], [p["train_loss"] for p in r["curve"]][1:], label=r["prompt"])
            b.plot(steps, [p["test_loss"] for p in r["curve"]], label=r["prompt"])
    hand = [r for r in rows if r["steps"] == 0 and r["train_pairs"] == 0 and "skipped" not in r]
    for ax, title in ((a, "train loss (since the last point)"), (b, f"test loss (first {args.curve_size} pairs)")):
        for r in hand:
            ax.axhline(r["test_loss"], color="grey", linestyle="--", label=f"{r['prompt']} (whole test split)")
        ax.set_xlabel("step")
        ax.set_title(title)
    a.set_ylabel("target cross-entropy")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "loss_curves.png"), dpi=100)
    plt.close(fig)
    soft = [r for r in rows if r["method"] == "soft" and r["train_pairs"] and "init '" not in r["prompt"] and "skipped" not in r]
    soft.sort(key=lambda r: r["train_pairs"])
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([r["train_pairs"] for r in soft], [r["test_loss"] for r in soft], "o-")
    for r in hand:
        ax.axhline(r["test_loss"], color="grey", linestyle="--", label=r["prompt"])
    ax.set_xscale("log")
    ax.set_xlabel("training pairs")
    ax.set_ylabel("test loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "sample_efficiency.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from fastprompt.errors import exit_code

    return exit_code(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
