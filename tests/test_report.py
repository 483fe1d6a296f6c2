"""The CLI's final report: the last epoch's test loss reused (never a stale one), and the hand-written
baseline evaluated like the trained prompt, side by side."""
import pytest
import torch

import fastprompt as fp
from fastprompt.report import baseline_report, comparison_table, final_report


@pytest.fixture(scope="module")
def setup():
    model, tok = fp.load_model("tiny", seed=5)
    train, test = fp.train_test_split(fp.load_pairs("antonyms"), test_size=0.2, seed=1337)
    return model, tok, train[:45], test[:37]


def _count_loss_calls(tuner, monkeypatch):
    calls = []
    real = tuner.engine.loss_terms
    monkeypatch.setattr(tuner.engine, "loss_terms", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _fresh_loss(model, tok, tuner, test):
    probe = fp.PromptTuner(model, tok, prompt_len=tuner.prompt_len, prompt=tuner.prompt.detach().clone())
    return probe.evaluate(test, generation=False)["loss"]


def test_the_last_epochs_test_loss_is_reused_not_recomputed(setup, monkeypatch):
    model, tok, train, test = setup
    tuner = fp.PromptTuner(model, tok, prompt_len=3)
    tuner.fit(train, epochs=2, batch_size=16, lr=1e-2, eval_data=test, progress=False)
    calls = _count_loss_calls(tuner, monkeypatch)
    report = final_report(tuner, test, eval_size=5)
    assert calls == []  # the loss came from the last epoch's evaluation
    assert report["test_loss"] == tuner.history[-1]["test_loss"] == pytest.approx(_fresh_loss(model, tok, tuner, test), rel=1e-6)
    other = test[:20]  # other examples than the epoch was evaluated on: computed
    assert final_report(tuner, other, eval_size=0)["test_loss"] == pytest.approx(_fresh_loss(model, tok, tuner, other), rel=1e-6)
    assert calls


def _count_decodes(tuner, monkeypatch):
    decoded = []
    real = tuner._greedy
    monkeypatch.setattr(tuner, "_greedy", lambda encoded, *a, **k: decoded.append(len(encoded)) or real(encoded, *a, **k))
    return decoded


def test_the_last_epochs_generation_metrics_are_reused_where_they_cover_the_report(setup, monkeypatch):
    model, tok, train, test = setup
    tuner = fp.PromptTuner(model, tok, prompt_len=3)
    tuner.fit(train, epochs=2, batch_size=16, lr=1e-2, eval_data=test, eval_every=1, eval_size=5, progress=False)
    decoded, calls = _count_decodes(tuner, monkeypatch), _count_loss_calls(tuner, monkeypatch)
    last = tuner.history[-1]
    report = final_report(tuner, test, eval_size=5)
    assert decoded == [] and calls == []  # the last epoch decoded these 5 examples with this very prompt
    assert report["eval_size"] == 5
    for key in ("loss", "exact_match", "parrot_rate", "exact_match_strict", "parrot_rate_strict"):
        assert report[f"test_{key}"] == last[f"test_{key}"]
    probe = fp.PromptTuner(model, tok, prompt_len=3, prompt=tuner.prompt.detach().clone())
    fresh = probe.evaluate(test, generation_size=5)
    assert {k: report[f"test_{k}"] for k in fresh} == pytest.approx(fresh, rel=1e-6)
    wider = final_report(tuner, test, eval_size=6)  # more examples than the epoch decoded: decoded again
    assert decoded == [6] and calls == [] and wider["eval_size"] == 6
    assert wider["test_exact_match"] == probe.evaluate(test, generation_size=6)["exact_match"]
    assert final_report(tuner, test, eval_size=0)["eval_size"] == 0 and decoded == [6]  # nothing decoded
    tuner.fit(train, epochs=1, batch_size=16, lr=1e-1, eval_data=test, progress=False, max_steps=1)  # prompt moved
    final_report(tuner, test, eval_size=5)
    assert decoded == [6, 5] and calls


def test_a_step_after_the_last_evaluation_makes_it_stale(setup, monkeypatch):
    model, tok, train, test = setup
    tuner = fp.PromptTuner(model, tok, prompt_len=3)
    tuner.fit(train, epochs=1, batch_size=16, lr=1e-1, eval_data=test, progress=False)
    tuner.fit(train, epochs=1, batch_size=16, lr=1e-1, eval_data=test, progress=False, max_steps=1)  # stops mid-epoch
    assert tuner.stopped == "max_steps"
    calls = _count_loss_calls(tuner, monkeypatch)
    report = final_report(tuner, test, eval_size=0)
    assert calls and report["test_loss"] != tuner.history[-1]["test_loss"]
    assert report["test_loss"] == pytest.approx(_fresh_loss(model, tok, tuner, test), rel=1e-6)


def test_the_baseline_is_the_hand_written_prompt_on_the_same_examples(setup):
    model, tok, train, test = setup
    tuner = fp.PromptTuner(model, tok, prompt_len=2)
    tuner.fit(train, epochs=1, batch_size=16, lr=1e-2, eval_data=test, progress=False)
    base = baseline_report(tuner, " antonyms ", test, eval_size=6)
    n = len(tok(" antonyms", add_special_tokens=False)["input_ids"])
    hand = fp.PromptTuner(model, tok, prompt_len=n, init="text:antonyms")
    want = hand.evaluate(test, generation_size=6)
    assert base["prompt_len"] == n and base["text"] == " antonyms"
    assert base["test_loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert base["test_exact_match"] == want["exact_match"] and base["test_parrot_rate"] == want["parrot_rate"]
    final = final_report(tuner, test, eval_size=6)
    table = comparison_table(base, final, steps=3)
    assert f"{base['test_loss']:.4f}" in table and f"{final['test_loss']:.4f}" in table
    delta = base["test_loss"] - final["test_loss"]
    assert f"{abs(delta):.3f} nat {'below' if delta >= 0 else 'ABOVE'}" in table
    assert "(2 vectors, 3 steps)" in table
    tokens = dict(final, method="gcg", token_text=" outcomes gradu")  # a token prompt is named by its text
    assert "trained gcg prompt ' outcomes gradu' (2 tokens, 3 steps)" in comparison_table(base, tokens, steps=3)


def test_the_cli_shows_the_baseline_beside_the_trained_prompt(tmp_path, capsys):
    import json

    from fastprompt.train import main

    out = tmp_path / "run"
    args = ["--model", "tiny", "--epochs", "1", "--train-size", "32", "--batch-size", "16", "--test-size", "0.01",
            "--eval-size", "4", "--samples", "2", "--no-progress", "--baseline", "antonyms", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    baseline = [r for r in lines if r.get("event") == "baseline"]
    final = [r for r in lines if r.get("event") == "final"][0]
    assert len(baseline) == 1 and baseline[0]["text"] == " antonyms"
    assert f"{baseline[0]['test_loss']:.4f}" in printed and f"{final['test_loss']:.4f}" in printed
    assert "hand-written ' antonyms'" in printed and printed.count("Actual: ") == 2
    assert main(args[:-4] + ["--baseline", "  ", "--out", str(tmp_path / "bad")]) == 2
    assert "--baseline takes words" in capsys.readouterr().err and not (tmp_path / "bad").exists()
