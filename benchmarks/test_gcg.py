"""GCG's candidate evaluation (issue 24, item 5): candidate token prompts evaluated a second, through
``Engine.loss_terms_many`` (the K candidates on one batch: one pass where the engine packs K prompts) against a
loop of single ``loss_terms`` forwards, side by side in one run, under ``no_grad`` as ``GcgMethod`` runs them.

    pytest benchmarks/test_gcg.py --benchmark-only        # tiny GPT-2 and, with its weights cached, SmolLM2-135M

The candidates are a real GCG step's (``sample_candidates`` from the current prompt's gradient); the losses of
the two paths must agree (fp32 <= 1e-5 relative). Each record carries the 1-minute load average.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

import fastprompt as fp

CANDIDATES, BATCH = 16, 64


def _load(name):
    try:
        return fp.load_model(name, seed=1337)
    except Exception as e:  # SmolLM2's weights not cached here
        pytest.skip(f"{name}: {type(e).__name__}")


@pytest.mark.parametrize("name", ["tiny", "smollm2"])
def test_candidate_evaluations_per_second(benchmark, name):
    model, tok = _load(name)
    train, _ = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=1337)
    tuner = fp.PromptTuner(model, tok, prompt_len=4, method="gcg", method_options={"candidates": CANDIDATES})
    batch = tuner.encode(train[:BATCH])
    method = tuner.method
    ids = method.ids(tuner.prompt)
    _, grad = method.token_gradient(tuner.engine, ids, batch)
    candidates = method.sample_candidates(ids, grad, torch.Generator().manual_seed(0))

    @torch.no_grad()
    def loop():
        E = method.table()
        return [tuner.engine.loss_terms(E[c], batch) for c in candidates]

    loop()  # warm-up
    t0 = time.perf_counter()
    looped = loop()
    loop_s = time.perf_counter() - t0
    many = benchmark.pedantic(lambda: method.candidate_losses(tuner.engine, candidates, batch), rounds=3,
                              iterations=1, warmup_rounds=1)
    for (ce, n), loss in zip(looped, many):
        assert abs(ce.item() / n - loss.item()) <= 1e-5 * abs(loss.item())
    many_s = benchmark.stats.stats.median
    benchmark.extra_info.update(model=name, engine=tuner.engine.describe(), candidates=len(candidates), batch=BATCH,
                                many_in_one_pass=tuner.engine.many_in_one_pass,
                                many_candidates_per_s=len(candidates) / many_s,
                                loop_candidates_per_s=len(candidates) / loop_s, load_1min=os.getloadavg()[0])
