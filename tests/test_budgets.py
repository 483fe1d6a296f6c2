"""Step and time budgets: ``fit(max_steps=, max_seconds=)`` and ``--max-steps/--max-seconds``. A budget
stop keeps the last completed step (prompt and checkpoint), and continuing gives the uninterrupted run."""
import json

import pytest
import torch
from safetensors.torch import load_file

import fastprompt as fp
from fastprompt.train import main

from helpers import tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small"), ("wet", "dry"), ("fast", "slow"),
         ("light", "dark"), ("open", "closed"), ("early", "late")]  # batch 2: 5 steps an epoch


def tuner():
    return fp.PromptTuner(tiny_gpt2(seed=1, initializer_range=0.2), tokenizer(), prompt_len=3, engine="fused",
                          seed=0)


def test_max_steps_stops_mid_epoch_and_the_next_fit_continues_exactly():
    whole = tuner()
    whole.fit(PAIRS, epochs=3, batch_size=2, lr=1e-2, progress=False)
    split = tuner()
    history = split.fit(PAIRS, epochs=3, batch_size=2, lr=1e-2, progress=False, max_steps=7)
    assert split.stopped == "max_steps" and len(history) == 1 and split.resume_at["step"] == 2
    assert split.optimizer.state[split.prompt]["step"].item() == 7
    split.fit(PAIRS, epochs=2, batch_size=2, lr=1e-2, progress=False)  # the rest: epoch 2 from step 3, epoch 3
    assert split.stopped is None
    assert torch.equal(split.prompt, whole.prompt)
    assert [r["train_loss"] for r in split.history] == [r["train_loss"] for r in whole.history]
    assert [r["step"] for r in split.history] == [5, 10, 15]


def test_max_seconds_zero_takes_no_step_and_a_budget_at_an_epoch_end_leaves_nothing_pending():
    t = tuner()
    before = t.prompt.detach().clone()
    assert t.fit(PAIRS, epochs=2, batch_size=2, progress=False, max_seconds=0) == []
    assert t.stopped == "max_seconds" and t.resume_at["step"] == 0 and torch.equal(t.prompt, before)
    t = tuner()
    t.fit(PAIRS, epochs=1, batch_size=2, progress=False, max_steps=5)
    assert t.stopped is None and t.resume_at is None and len(t.history) == 1


@pytest.mark.parametrize("kwargs", [{"max_steps": -1}, {"max_steps": 1.5}, {"max_seconds": float("nan")},
                                    {"eval_every": -2}, {"eval_size": 0}, {"max_steps": True}])
def test_bad_budgets_are_config_errors(kwargs):
    with pytest.raises(fp.ConfigError):
        tuner().fit(PAIRS, epochs=1, batch_size=2, progress=False, **kwargs)


def run(out, *extra):
    return main(["--model", "tiny", "--epochs", "2", "--train-size", "8", "--batch-size", "2", "--test-size", "0.005",
                 "--eval-size", "4", "--lr", "1e-2", "--samples", "2", "--no-progress", "--out", str(out), *extra])


def test_cli_max_steps_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    assert run(tmp_path / "whole") == 0
    assert run(tmp_path / "split", "--max-steps", "6") == 0  # epoch 1 (4 steps) and 2 steps of epoch 2
    out = capsys.readouterr().out
    assert "stopped by --max-steps at epoch 2, step 2" in out
    state = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 2)
    for name in ("prompt.safetensors", "samples.txt", "nearest.txt"):  # a finished run's outputs, as of step 6
        assert (tmp_path / "split" / name).stat().st_size > 0
    assert run(tmp_path / "split", "--resume", "--max-steps", "8") == 0
    a = load_file(str(tmp_path / "whole" / "prompt.safetensors"))["prompt"]
    b = load_file(str(tmp_path / "split" / "prompt.safetensors"))["prompt"]
    assert torch.equal(a, b)
    lines = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if "epoch" in r and "event" not in r] == [1, 2]


def test_cli_epoch_lines_have_the_test_loss_and_generation_metrics_at_eval_every(tmp_path):
    assert run(tmp_path / "o", "--eval-every", "2") == 0
    lines = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "epoch" in r and "event" not in r]
    assert all("test_loss" in r for r in epochs)
    assert ["test_exact_match" in r for r in epochs] == [False, True]
    final = [r for r in lines if r.get("event") == "final"][0]
    assert final["eval_size"] == 4 and "test_exact_match_strict" in final


@pytest.mark.parametrize("args", [["--max-steps", "-1"], ["--max-seconds", "nan"], ["--eval-size", "0"],
                                  ["--eval-every", "-1"]])
def test_cli_bad_budget_is_exit_2(tmp_path, capsys, args):
    assert run(tmp_path / "o", *args) == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "o").exists()
