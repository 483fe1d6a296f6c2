"""``--sweep`` and several ``--data`` (issue 24): one folder per point with the usual outputs, the sweep table,
``--resume`` of every point, each task on its own split; the prompts equal separate runs of the points."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fastprompt.errors import ConfigError
from fastprompt.promptfile import read_prompt_file
from fastprompt.sweep import parse_sweep, points_of
from fastprompt.options import parse_config
from fastprompt.train import main

from helpers import rel_err

POINT_FILES = {"metrics.jsonl", "prompt.safetensors", "checkpoint.safetensors", "checkpoint.json", "samples.txt",
               "nearest.txt"}


def task(tmp_path, name, pairs):
    path = tmp_path / f"{name}.csv"
    path.write_text("word1,word2\n" + "".join(f"{a},{b}\n" for a, b in pairs))
    return str(path)


@pytest.fixture
def data(tmp_path):
    words = ["hot", "up", "big", "dry", "new", "high", "fast", "old", "light", "open", "early", "full"]
    return task(tmp_path, "opposites", [(w, w[::-1]) for w in words]), \
        task(tmp_path, "copies", [(w, w) for w in words])


def cli(out, *args):
    return main(["--model", "tiny", "--prompt-len", "2", "--batch-size", "4", "--test-size", "0.25",
                 "--eval-size", "3", "--samples", "1", "--no-progress", "--out", str(out), *args])


def prompt(path):
    return read_prompt_file(str(path))[0]["prompt"]


def test_sweep_outputs_table_and_resume(tmp_path, data):
    out = tmp_path / "s"
    grid = ["--data", data[0], "--sweep", "lr=1e-2,3e-2", "--sweep", "init=random,text:antonyms"]
    assert cli(out, "--epochs", "1", *grid) == 0
    names = ["lr-0.01_init-random", "lr-0.01_init-text-antonyms", "lr-0.03_init-random", "lr-0.03_init-text-antonyms"]
    assert sorted(os.listdir(out)) == sorted(names + ["sweep.json", "sweep.md", "sweep.png"])
    for name in names:
        assert POINT_FILES <= set(os.listdir(out / name))
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["point"] for r in summary["points"]] == names
    assert all(r["steps"] == 3 and r["test_loss"] > 0 and r["stopped"] is None for r in summary["points"])
    best = min(summary["points"], key=lambda r: r["test_loss"])
    assert summary["best"] == best["point"]
    md = (out / "sweep.md").read_text()
    assert f"| {best['point']} **best** |" in md and "| 0.0300 | text:antonyms |" in md
    # --resume: every point continues from its checkpoint to epoch 2
    assert cli(out, "--epochs", "2", "--resume", *grid) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert all(r["steps"] == 6 for r in summary["points"])
    # a point equals its run alone (same seed, lr, init; 2 epochs at once)
    alone = tmp_path / "alone"
    assert cli(alone, "--epochs", "2", "--data", data[0], "--lr", "3e-2", "--init", "text:antonyms") == 0
    assert rel_err(prompt(out / names[3] / "prompt.safetensors"), prompt(alone / "prompt.safetensors")) <= 1e-5


def test_several_tasks_each_on_its_own_split(tmp_path, data):
    out = tmp_path / "t"
    assert cli(out, "--epochs", "1", "--data", data[0], "--data", data[1], "--sweep", "seed=1,2") == 0
    names = ["task-opposites_seed-1", "task-copies_seed-1", "task-opposites_seed-2", "task-copies_seed-2"]
    assert sorted(n for n in os.listdir(out) if not n.startswith("sweep")) == sorted(names)
    for name, path in zip(names, [data[0], data[1]] * 2):
        header = json.loads((out / name / "metrics.jsonl").read_text().splitlines()[0])
        assert header["config"]["data"] == path and header["config"]["sweep"] is None
        samples = (out / name / "samples.txt").read_text()
        word = samples.split("Actual: ")[1].split("\n")[0].split()[-3:]
        if "copies" in name:  # its own test split: an input equal to its target
            assert word[0] == word[2]
        else:
            assert word[0] == word[2][::-1] and word[0] != word[2]
    md = (out / "sweep.md").read_text()
    assert "| point | task | seed |" in md


@pytest.mark.parametrize("items,message", [
    (["template={prompt} {input} {target}"], "not a per-prompt option; the points share one engine"),
    (["nope=1"], "no such option"),
    (["lr=1e-3,abc"], "'abc' is not a value of --lr"),
    (["lr=-1"], "--sweep lr must be a finite number > 0"),
    (["lr"], "takes KEY=V1,V2"),
    (["lr=1e-3", "lr=1e-2"], "given twice"),
])
def test_sweep_refuses_what_it_cannot_do(items, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(items)


def test_sweep_grid_is_the_product():
    config = parse_config(["--sweep", "lr=1e-3,1e-2", "--sweep", "seed=1,2,3"])
    points = points_of(config)
    assert len(points) == 6 and points[0][1] == {"data": "antonyms", "lr": 1e-3, "seed": 1}
    assert parse_config([]).data == "antonyms" and parse_config(["--data", "a.csv"]).data == "a.csv"
    assert parse_config(["--data", "a.csv", "--data", "b.csv"]).data == ("a.csv", "b.csv")


def test_sweep_refuses_options_it_does_not_carry(tmp_path, capsys):
    assert cli(tmp_path / "x", "--sweep", "lr=1e-3,1e-2", "--peft-out", str(tmp_path / "p")) == 2
    assert "--peft-out does not work with --sweep" in capsys.readouterr().err


def test_a_nan_point_stops_alone_from_the_cli(tmp_path, data, capsys):
    """A point whose steps go NaN (lr 1e30: the prompt overflows after one step) stops alone: the other point
    trains to the end, the table and the JSON (strict: null for its loss) mark it, and the run exits 3."""
    out = tmp_path / "n"
    assert cli(out, "--epochs", "2", "--data", data[0], "--sweep", "lr=1e-2,1e30") == 3
    err = capsys.readouterr().err
    assert "1 of 2 points stopped on NaN/inf (lr-1e+30)" in err
    summary = json.loads((out / "sweep.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"sweep.json holds {c}: not strict JSON"))
    good, bad = summary["points"]
    assert good["stopped"] is None and good["steps"] == 6 and good["test_loss"] > 0 and summary["best"] == "lr-0.01"
    assert "NaN/inf" in bad["stopped"] and bad["steps"] == 3 and bad["test_loss"] is None
    md = (out / "sweep.md").read_text()
    assert "| lr-1e+30 (stopped: NaN/inf) | 1e+30 | NaN |" in md and "| lr-0.01 **best** | 0.0100 |" in md
    assert POINT_FILES - {"samples.txt", "nearest.txt"} <= set(os.listdir(out / "lr-1e+30"))
    assert POINT_FILES <= set(os.listdir(out / "lr-0.01"))
    # the finished point equals its run alone
    alone = tmp_path / "alone"
    assert cli(alone, "--epochs", "2", "--data", data[0], "--lr", "1e-2") == 0
    assert rel_err(prompt(out / "lr-0.01" / "prompt.safetensors"), prompt(alone / "prompt.safetensors")) <= 1e-5


def test_prompt_lengths_share_one_pass_each_equal_to_its_run_alone(tmp_path, data, capsys):
    """``--sweep prompt_len=2,3``: an engine per length, every point's step in the first one's pass; every
    point ends at the prompt of its run alone, and --resume continues all of them."""
    out = tmp_path / "l"
    grid = ["--data", data[0], "--sweep", "prompt_len=2,3", "--sweep", "lr=1e-2,3e-2"]
    assert cli(out, "--epochs", "1", *grid) == 0
    assert "sweep of 4 prompts of 2 prompt lengths in one pass" in capsys.readouterr().out
    summary = json.loads((out / "sweep.json").read_text())
    names = [r["point"] for r in summary["points"]]
    assert names == ["prompt_len-2_lr-0.01", "prompt_len-2_lr-0.03", "prompt_len-3_lr-0.01", "prompt_len-3_lr-0.03"]
    assert cli(out, "--epochs", "2", "--resume", *grid) == 0
    for name, length, lr in [(names[1], "2", "3e-2"), (names[2], "3", "1e-2")]:
        got = prompt(out / name / "prompt.safetensors")
        assert got.shape[0] == int(length)
        alone = tmp_path / f"alone-{name}"
        args = ["--epochs", "2", "--data", data[0], "--lr", lr]
        assert main(["--model", "tiny", "--prompt-len", length, "--batch-size", "4", "--test-size", "0.25",
                     "--eval-size", "3", "--samples", "1", "--no-progress", "--out", str(alone), *args]) == 0
        assert rel_err(got, prompt(alone / "prompt.safetensors")) <= 1e-5


def test_a_signal_mid_sweep_of_two_lengths_checkpoints_every_point(tmp_path, data, capsys, monkeypatch):
    """SIGINT inside the second step of a sweep over two prompt lengths (one pass for all): every point is
    checkpointed after that step, the run exits 130, and --resume ends each point at its run alone's prompt."""
    import signal

    from fastprompt.engines.fused import FusedEngine

    original, calls = FusedEngine.loss_terms_many, []

    def loss_terms_many(self, inputs, batches, encoders=None):
        calls.append(torch.is_grad_enabled())
        if sum(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, inputs, batches, encoders)

    out = tmp_path / "sig"
    grid = ["--epochs", "2", "--data", data[0], "--sweep", "prompt_len=2,3", "--sweep", "lr=1e-2,3e-2"]
    monkeypatch.setattr(FusedEngine, "loss_terms_many", loss_terms_many)
    assert cli(out, *grid) == 130
    err = capsys.readouterr().err
    assert "SIGINT" in err and f"continue with --resume --out {out}\n" in err  # the sweep's folder, not a point's
    names = ["prompt_len-2_lr-0.01", "prompt_len-2_lr-0.03", "prompt_len-3_lr-0.01", "prompt_len-3_lr-0.03"]
    for name in names:
        state = json.loads((out / name / "checkpoint.json").read_text())
        assert (state["epoch"], state["step"]) == (0, 2), name
    monkeypatch.setattr(FusedEngine, "loss_terms_many", original)
    assert cli(out, *grid, "--resume") == 0
    for name, length, lr in [(names[0], "2", "1e-2"), (names[3], "3", "3e-2")]:
        alone = tmp_path / f"alone-{name}"
        assert main(["--model", "tiny", "--prompt-len", length, "--batch-size", "4", "--test-size", "0.25",
                     "--eval-size", "3", "--samples", "1", "--no-progress", "--out", str(alone), "--epochs", "2",
                     "--data", data[0], "--lr", lr]) == 0
        assert rel_err(prompt(out / name / "prompt.safetensors"), prompt(alone / "prompt.safetensors")) <= 1e-5


def test_the_sweep_plot_without_any_epochs_test_loss_says_so(tmp_path):
    import warnings

    pytest.importorskip("matplotlib")
    from fastprompt.sweep import plot_sweep

    path = tmp_path / "sweep.png"
    rows = [{"point": "lr-0.01"}, {"point": "lr-0.03"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warned of a legend without artists
        plot_sweep(str(path), rows, {"lr-0.01": [{"epoch": 1, "train_loss": 3.0}], "lr-0.03": []})
    assert path.stat().st_size > 0
