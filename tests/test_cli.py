import json
import os
import subprocess
import sys

import pytest

from fastprompt.train import main


def test_cli_end_to_end(tmp_path):
    """The issue's acceptance command, shortened: a falling loss and all five output files."""
    out = tmp_path / "run"
    code = main(["--model", "tiny", "--epochs", "2", "--train-size", "64", "--test-size", "0.01", "--lr", "1e-2",
                 "--out", str(out), "--no-progress", "--samples", "3"])
    assert code == 0
    for name in ["prompt.safetensors", "metrics.jsonl", "loss.png", "samples.txt", "nearest.txt"]:
        assert (out / name).stat().st_size > 0, name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[0]["seed"] == 1337 and "torch" in lines[0]["versions"]
    epochs = [r for r in lines if "epoch" in r]
    assert len(epochs) == 2 and epochs[1]["train_loss"] < epochs[0]["train_loss"]
    samples = (out / "samples.txt").read_text()
    assert samples.count("Actual: Here are two <prompt> ") == 3 and samples.count("Predicted:") == 3
    assert "cosine similarity" in (out / "nearest.txt").read_text()


def test_cli_without_matplotlib_names_no_plot(tmp_path, capsys, monkeypatch):
    """matplotlib is an optional extra: without it the run says the plot is skipped and never points to it."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    code = main(["--model", "tiny", "--epochs", "1", "--train-size", "32", "--test-size", "0.01",
                 "--out", str(out), "--no-progress", "--samples", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and not (out / "loss.png").exists() and (out / "samples.txt").exists()
    assert "loss.png skipped" in printed and "loss curves" not in printed


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "--model tiny"),
    (["--data", "/nonexistent.csv"], "no such dataset"),
    (["--template", "Here are two {input} and {target}"], "{prompt}"),
    (["--engine", "warp"], "unknown engine"),
    (["--precision", "fp8"], "unknown precision"),
    (["--prompt-len", "0"], "prompt-len"),
    (["--init", "zeros"], "init"),
    (["--engine", "naive", "--kernels", "torch"], "option of the fused engine"),
    (["--method", "prefix", "--engine", "generic", "--cuda-graphs", "off"], "option of the fused engine"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    code = main(["--model", "tiny", "--epochs", "1", "--out", str(tmp_path / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_cli_error_in_a_real_process_has_no_traceback(tmp_path):
    cmd = [sys.executable, "-m", "fastprompt.train", "--model", "tiny", "--data", str(tmp_path / "missing.csv")]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
