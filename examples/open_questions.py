"""The post's open questions on one model, one data split: the hand-written prompt (no training) against a
trained soft prompt, a PEZ hard prompt and a vocabulary-relaxed prompt; writes a markdown table.

    python examples/open_questions.py --model gemma3-270m --train-size 64 --test-limit 64 --epochs 3 \
        --batch-size 16 --lr 1e-2 --out runs/open_questions_gemma
    python examples/open_questions.py --model tiny --train-size 16 --test-limit 8 --epochs 1 --out /tmp/oq

The model is loaded once. The hand-written prompt uses its own token length (" antonyms": 4 GPT-2 tokens,
3 Gemma tokens); the trained prompts use --prompt-len. Outputs in --out: results.md, results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--template", default="Here are two {prompt} {input} and {target}")
    p.add_argument("--words", default="antonyms", help="the hand-written prompt")
    p.add_argument("--methods", default="soft,hard,relaxed")
    p.add_argument("--prompt-len", type=int, default=4)
    p.add_argument("--train-size", type=int, default=64)
    p.add_argument("--test-limit", type=int, default=64, help="the first N pairs of the 20%% test split")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--engine", default="auto")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", default="runs/open_questions")
    return p.parse_args(argv)


def run(args) -> list[dict]:
    import torch

    import fastprompt as fp

    torch.manual_seed(args.seed)
    train, test = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=args.seed)
    train, test = fp.subsample(train, args.train_size, seed=args.seed), test[: args.test_limit]
    t0 = time.perf_counter()
    model, tok = fp.load_model(args.model, seed=args.seed)
    load_s = time.perf_counter() - t0
    rows = []
    words = " " + args.words.strip()
    n_words = len(tok(words, add_special_tokens=False)["input_ids"])
    runs = [("hand-written", "soft", f"text:{args.words}", n_words, 0)]
    runs += [(m, m, "random", args.prompt_len, args.epochs) for m in args.methods.split(",") if m]
    for label, method, init, length, epochs in runs:
        t0 = time.perf_counter()
        tuner = fp.PromptTuner(model, tok, args.template, length, engine=args.engine, init=init, seed=args.seed,
                               method=method)
        before = tuner.evaluate(test)
        if epochs:
            tuner.fit(train, epochs=epochs, batch_size=args.batch_size, lr=args.lr, progress=False)
        after = tuner.evaluate(test)
        ids = tuner.method.token_ids(tuner.prompt)
        row = {"prompt": label, "method": method, "prompt_len": length, "epochs": epochs,
               "steps": tuner.method.step, "test_loss_before": before["loss"], "test_loss": after["loss"],
               "test_exact_match": after["exact_match"], "test_parrot_rate": after["parrot_rate"],
               "tokens": tok.decode(ids) if ids is not None else (words if epochs == 0 else None),
               "seconds": time.perf_counter() - t0}
        if method == "relaxed":
            from fastprompt.report import hard_prompt_metrics

            argmax = hard_prompt_metrics(tuner, ids, test)
            row.update({"argmax_test_loss": argmax["loss"], "argmax_test_exact_match": argmax["exact_match"],
                        "tau": tuner.method.tau})
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(args, rows, load_s, len(train), len(test))
    return rows


def write(args, rows, load_s, n_train, n_test):
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "rows": rows, "load_seconds": load_s}, f, indent=1)
    lines = [f"Model `{args.model}` (loaded in {load_s:.0f} s), template `{args.template}`, {n_train} training "
             f"pairs, {n_test} test pairs, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
             f"seed {args.seed}.", "",
             "| prompt | length | steps | test loss (before) | test loss | exact match | tokens | seconds |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        tokens = f"`{r['tokens']!r}`" if r["tokens"] is not None else "—"
        lines.append(f"| {r['prompt']} | {r['prompt_len']} | {r['steps']} | {r['test_loss_before']:.4f} | "
                     f"{r['test_loss']:.4f} | {100 * r['test_exact_match']:.1f}% | {tokens} | {r['seconds']:.0f} |")
        if "argmax_test_loss" in r:
            lines.append(f"| relaxed, argmax tokens as a hard prompt | {r['prompt_len']} | | | "
                         f"{r['argmax_test_loss']:.4f} | {100 * r['argmax_test_exact_match']:.1f}% | {tokens} | |")
    with open(os.path.join(args.out, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    from fastprompt.errors import exit_code

    return exit_code(lambda: run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
