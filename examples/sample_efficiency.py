"""Sample efficiency (the post: "100 training pairs are enough"): train at several training-set sizes on
the same test split and write a markdown table and a plot of test loss and exact match.

    python examples/sample_efficiency.py --model gpt2-large --epochs 10 --out runs/sample_efficiency
    python examples/sample_efficiency.py --model tiny --sizes 16,32 --epochs 1 --test-limit 16 --out /tmp/se

Outputs in --out: results.md (the table), results.json, sample_efficiency.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2-large", help="as for fastprompt.train (tiny, gemma3-270m, ...)")
    p.add_argument("--data", default="antonyms")
    p.add_argument("--template", default="Here are two {prompt} {input} and {target}")
    p.add_argument("--sizes", default="100,500,all", help="comma-separated training-set sizes; 'all' = the split")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--method", default="soft", help="soft | relaxed | hard | prefix")
    p.add_argument("--init", default="random")
    p.add_argument("--engine", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test pairs only")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/sample_efficiency")
    return p.parse_args(argv)


def run(args) -> list[dict]:
    import fastprompt as fp
    from fastprompt.train import resolve_device

    device = resolve_device(args.device)
    train, test = fp.train_test_split(fp.load_pairs(args.data), test_size=0.2, seed=args.seed)
    if args.test_limit:
        test = test[: args.test_limit]
    model, tokenizer = fp.load_model(args.model, seed=args.seed, device=device)
    rows = []
    for size in args.sizes.split(","):
        n = len(train) if size.strip() == "all" else int(size)
        subset = fp.subsample(train, min(n, len(train)), seed=args.seed)
        tuner = fp.PromptTuner(model, tokenizer, args.template, args.prompt_len, engine=args.engine,
                               precision=args.precision, init=args.init, seed=args.seed, method=args.method)
        t0 = time.perf_counter()
        tuner.fit(subset, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, progress=False)
        metrics = tuner.evaluate(test)
        rows.append({"train_size": len(subset), "epochs": args.epochs, "steps": tuner.method.step,
                     "test_loss": metrics["loss"], "test_exact_match": metrics["exact_match"],
                     "test_parrot_rate": metrics["parrot_rate"], "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    meta = {"model": args.model, "method": args.method, "template": args.template, "test_size": len(test),
            "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed}
    write_outputs(args.out, rows, meta)
    return rows


def write_outputs(out: str, rows: list[dict], meta: dict) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"Model `{meta['model']}`, method `{meta['method']}`, {meta['epochs']} epochs, lr {meta['lr']}, "
             f"batch {meta['batch_size']}, {meta['test_size']} test pairs, seed {meta['seed']}.", "",
             "| train pairs | steps | test loss | exact match | parrot rate | seconds |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['train_size']} | {r['steps']} | {r['test_loss']:.4f} | {100 * r['test_exact_match']:.1f}% | "
              f"{100 * r['test_parrot_rate']:.1f}% | {r['seconds']:.0f} |" for r in rows]
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["train_size"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(sizes, [r["test_loss"] for r in rows], "o-")
    ax1.set_xscale("log")
    ax1.set_xlabel("training pairs")
    ax1.set_ylabel("test loss")
    ax2.plot(sizes, [100 * r["test_exact_match"] for r in rows], "o-")
    ax2.set_xscale("log")
    ax2.set_xlabel("training pairs")
    ax2.set_ylabel("exact match (%)")
    fig.suptitle(f"{meta['model']} ({meta['method']}), {meta['epochs']} epochs")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "sample_efficiency.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    from fastprompt.errors import exit_code

    return exit_code(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
