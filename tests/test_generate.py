"""Cached greedy decoding (fastprompt/generate.py) gives the words of the former uncached decoder, computes
the shared context once, and the generation metrics compare words as documented (fastprompt/metrics.py)."""
import functools

import pytest
import torch

import fastprompt as fp
from fastprompt.generate import shared_len, greedy_words, greedy_words_uncached, sliding_window
from fastprompt.metrics import normalize_word, word_metrics

from helpers import tiny_causal_lm, tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("benevolent", "malevolent"), ("a", "b"), ("underestimate", "x"),
         ("taciturn", "gregarious"), ("perennial", "ephemeral"), ("win", "lose"), ("dense", "sparse"),
         ("symmetric", "asymmetric"), ("early", "late")]
TEMPLATES = ["Here are two {prompt} {input} and {target}",  # prompt inside the shared context
             "{prompt} {input} ->{target}",  # prompt first
             "Q: {input} {prompt} A:{target}"]  # prompt after a field: no prompt in the context


@functools.lru_cache(maxsize=None)
def model_of(kind: str):
    """Tiny random causal LMs with GPT-2's vocabulary; weights large enough for varied, multi-token words."""
    if kind == "gpt2":
        return tiny_gpt2(seed=1, initializer_range=0.2)
    if kind == "llama":
        return tiny_causal_lm("llama", initializer_range=0.2)
    return tiny_causal_lm("gemma3", initializer_range=0.2, sliding_window=4 if kind == "gemma3_window4" else 64)


def prefixes_and_prompt(model, template, n=len(PAIRS), scale=10.0):
    tuner = fp.PromptTuner(model, tokenizer(), template, prompt_len=3, engine="naive", seed=0)
    encoded = tuner.encode([PAIRS[i % len(PAIRS)] for i in range(n)])
    return [(e.ids[: e.target_start], e.prompt_start) for e in encoded], tuner.prompt.detach() * scale


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3_window4", "gemma3_window64"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_cached_decoding_gives_the_uncached_words(kind, template):
    model = model_of(kind)
    prefixes, prompt = prefixes_and_prompt(model, template)
    for batch_size in (4, 64):  # batches of mixed lengths, a partial last batch; one batch
        cached = greedy_words(model, tokenizer(), prefixes, prompt, batch_size=batch_size)
        assert cached == greedy_words_uncached(model, tokenizer(), prefixes, prompt, batch_size=batch_size)
    if template == TEMPLATES[0]:  # (tiny Gemma repeats the template's last token for the others)
        assert len(set(cached)) > 1  # the comparison is not between constant outputs


def test_words_of_several_tokens_and_early_finishers():
    model = model_of("gpt2")
    prefixes, prompt = prefixes_and_prompt(model, TEMPLATES[0], n=40)
    for max_new_tokens in (1, 2, 6):
        cached = greedy_words(model, tokenizer(), prefixes, prompt, max_new_tokens=max_new_tokens, batch_size=16)
        assert cached == greedy_words_uncached(model, tokenizer(), prefixes, prompt, max_new_tokens=max_new_tokens,
                                               batch_size=16)
        tokens = [len(tokenizer()(" " + w)["input_ids"]) for w in cached if w]
        assert max(tokens) <= max_new_tokens
    assert max(tokens) > 1 and min(tokens) == 1  # some words finish early, others run on: rows leave the batch


def test_the_shared_context_runs_once_per_call():
    """Rows through the model: the context once (batch 1), then per batch only the examples' own tokens and one
    row per undecided example and new token; the uncached decoder re-runs whole sequences every token."""
    model = model_of("gpt2")
    prefixes, prompt = prefixes_and_prompt(model, TEMPLATES[0], n=24)
    C = shared_len(prefixes)
    assert C == 3 + 3  # "Here are two" + the 3 prompt rows, shared by every prefix
    calls = []
    hook = model.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True)
    try:
        greedy_words(model, tokenizer(), prefixes, prompt, batch_size=8)
        cached_calls, calls[:] = list(calls), []
        greedy_words_uncached(model, tokenizer(), prefixes, prompt, batch_size=8)
        uncached_calls = list(calls)
    finally:
        hook.remove()
    assert cached_calls[0] == (1, C)
    assert sum(1 for b, t in cached_calls if t == C) == 1
    longest = max(len(ids) for ids, _ in prefixes)
    assert all(t <= longest - C for _, t in cached_calls[1:])
    rows = lambda calls: sum(b * t for b, t in calls)  # noqa: E731
    assert rows(cached_calls) < rows(uncached_calls) / 2


def test_context_len():
    assert shared_len([((1, 2, 3, 4), 1), ((1, 2, 3, 5, 6), 1)]) == 3
    assert shared_len([((1, 2, 3), 1), ((1, 2, 3), 1)]) == 2  # each prefix keeps its last token
    assert shared_len([((1, 0, 0, 4), 1), ((1, 2, 0, 0), 2)]) == 1  # prompts at different places: stop before
    assert shared_len([((7, 2), None), ((8, 2), None)]) == 0


def test_sliding_window_is_read_from_the_config():
    assert sliding_window(model_of("gemma3_window4").config) == 4
    assert sliding_window(model_of("gpt2").config) is None
    import transformers as tf

    assert sliding_window(tf.Qwen2Config(sliding_window=8, use_sliding_window=False)) is None


def test_tuner_generate_uses_the_cached_decoder():
    model = model_of("gpt2")
    tuner = fp.PromptTuner(model, tokenizer(), prompt_len=3, engine="fused", seed=0)
    with torch.no_grad():
        tuner.prompt.mul_(10)
    inputs = [a for a, _ in PAIRS]
    encoded = [tuner.encoder.encode({"input": x, "target": "x"}) for x in inputs]
    prefixes = [(e.ids[: e.target_start], e.prompt_start) for e in encoded]
    assert tuner.generate(inputs) == greedy_words_uncached(model, tokenizer(), prefixes, tuner.prompt)


# ------------------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize("word, expected", [("matte.", "matte"), ("Matte", "matte"), ("(matte)", "matte"),
                                            ("«matte»!", "matte"), (" well-known, ", "well-known"),
                                            ("o'clock", "o'clock"), ("...", ""), ("ÉTÉ", "été"), ("", "")])
def test_normalize_word(word, expected):
    assert normalize_word(word) == expected


def test_word_metrics_normalised_and_strict():
    words = ["Cold.", "down", "hot", "small", ""]
    refs = [("cold", ["hot"]), ("down", ["up"]), ("bad", ["hot"]), ("large", ["Small!"]), ("dry", ["wet"])]
    m = word_metrics(words, refs)
    assert m["exact_match"] == pytest.approx(2 / 5) and m["exact_match_strict"] == pytest.approx(1 / 5)
    assert m["parrot_rate"] == pytest.approx(2 / 5) and m["parrot_rate_strict"] == pytest.approx(1 / 5)


def test_evaluate_reports_normalised_and_strict_rates(monkeypatch):
    tuner = fp.PromptTuner(model_of("gpt2"), tokenizer(), prompt_len=3, engine="naive")
    monkeypatch.setattr(tuner, "_greedy", lambda encoded, max_new_tokens=6, progress=None: ["Cold.", "up", "x"])
    metrics = tuner.evaluate(PAIRS[:3])
    assert metrics["exact_match"] == pytest.approx(1 / 3) and metrics["exact_match_strict"] == 0
    assert metrics["parrot_rate"] == pytest.approx(1 / 3) and metrics["parrot_rate_strict"] == pytest.approx(1 / 3)


def test_evaluate_generation_size_and_loss_only():
    tuner = fp.PromptTuner(model_of("gpt2"), tokenizer(), prompt_len=3, engine="fused")
    seen = []
    tuner._greedy = lambda encoded, max_new_tokens=6, progress=None: seen.append(len(encoded)) or ["x"] * len(encoded)
    full = tuner.evaluate(PAIRS)
    assert seen == [len(PAIRS)]
    part = tuner.evaluate(PAIRS, generation_size=4)
    assert seen[-1] == 4 and part["loss"] == pytest.approx(full["loss"], rel=1e-6)  # the loss: every example
    loss_only = tuner.evaluate(PAIRS, generation=False)
    assert set(loss_only) == {"loss"} and len(seen) == 2
