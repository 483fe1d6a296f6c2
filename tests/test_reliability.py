"""Issue 8: checkpoints and resume (a real SIGKILL), signals, NaN/inf steps, bad input, safe loading and
determinism, through the CLI (in-process ``main`` where possible: one subprocess per real signal)."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import fastprompt as fp
from fastprompt import checkpoint
from fastprompt.template import TemplateEncoder
from fastprompt.train import main

from helpers import tiny_gpt2, tokenizer

# 20 examples, batch 4: 5 steps an epoch, 2 epochs, no test split (kept short: every test runs it)
ARGS = ["--model", "tiny", "--epochs", "2", "--train-size", "20", "--batch-size", "4", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def prompt_of(out):
    return load_file(str(out / "prompt.safetensors"))["prompt"]


def epochs_of(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines, [r for r in lines if "epoch" in r and "event" not in r]


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (and a second one: same seed, same prompt)."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path_factory.mktemp("ref") / name
        assert main([*ARGS, "--out", str(out)]) == 0
        outs.append(out)
    return outs


def wait_for_checkpoint(out, proc, ready, timeout=120):
    path = out / checkpoint.SIDECAR
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be stopped"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):  # not written yet
            state = None
        if state is not None and ready(state):
            return state
        time.sleep(0.02)
    raise AssertionError("no checkpoint in time")


# ------------------------------------------------------------------------------ determinism
def test_same_seed_same_prompt_and_run_header(reference):
    a, b = reference
    assert torch.equal(prompt_of(a), prompt_of(b))
    header = epochs_of(a)[0][0]
    assert header["event"] == "start" and header["seed"] == 1337 and header["device"] == "cpu"
    assert {"fastprompt", "torch", "transformers", "python"} <= set(header["versions"])
    assert header["world_size"] == 1 and "torch_threads" in header
    state = json.loads((a / checkpoint.SIDECAR).read_text())
    assert state["epoch"] == 2 and state["step"] == 0 and len(state["history"]) == 2


# --------------------------------------------------------------------------- kill and resume
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, reference):
    # second epoch, mid-way: history, optimizer and the epoch's partial loss must all come back. A tiny step
    # takes milliseconds, so the run can pass the epoch's end between reading a checkpoint and the kill (seen
    # once in CI); the last checkpoint is read after the kill, and a kill that missed the epoch's middle is
    # tried again in a new --out, as is a run that ended between two reads (the assertions below are about
    # the kill that landed mid-epoch).
    for attempt in range(5):
        out = tmp_path / f"run{attempt}"
        cmd = [sys.executable, "-m", "fastprompt.train", *ARGS, "--out", str(out), "--checkpoint-every", "1"]
        proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for_checkpoint(out, proc, lambda s: s["epoch"] == 1 and s["step"] >= 2)
            proc.send_signal(signal.SIGKILL)
        except AssertionError:
            if proc.poll() != 0 or attempt == 4:  # only a run that finished between two reads is tried again
                raise
            continue
        finally:
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        tensors, state = checkpoint.load_checkpoint(str(out))
        if state["epoch"] == 1 and 0 < state["step"] < 5:
            break
    assert state["epoch"] == 1 and 0 < state["step"] < 5, state
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    ref = prompt_of(reference[0])
    assert (prompt_of(out) - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()
    assert torch.equal(prompt_of(out), ref)  # fp32 on the CPU: bit for bit in practice
    lines, epochs = epochs_of(out)
    _, ref_epochs = epochs_of(reference[0])
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert [r["train_loss"] for r in epochs] == [r["train_loss"] for r in ref_epochs]
    assert [r.get("event") for r in lines[:2]] == ["start", "resume"]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_exits_143(tmp_path, reference):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastprompt.train", *ARGS, "--out", str(out), "--checkpoint-every", "2"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(out, proc, lambda s: s["step"] >= 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume" in lines[0] and "Traceback" not in err
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert torch.equal(prompt_of(out), prompt_of(reference[0]))


def test_sigint_in_process_exits_130_and_resume_continues(tmp_path, capsys, monkeypatch, reference):
    """The signal arrives inside a step: the step is finished, checkpointed, the run stops with 130."""
    from fastprompt.engines.fused import FusedEngine

    original, calls = FusedEngine.loss_terms, []

    def loss_terms(self, prompt, batch):
        calls.append(torch.is_grad_enabled())  # training steps (the preflight's forward runs without grad)
        if sum(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, prompt, batch)

    out = tmp_path / "run"
    monkeypatch.setattr(FusedEngine, "loss_terms", loss_terms)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where pytest started in the background
    assert main([*ARGS, "--out", str(out)]) == 130
    assert "SIGINT at epoch 1, step 3" in capsys.readouterr().err
    state = json.loads((out / checkpoint.SIDECAR).read_text())
    assert (state["epoch"], state["step"]) == (0, 3)
    monkeypatch.setattr(FusedEngine, "loss_terms", original)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert main([*ARGS, "--out", str(out), "--resume"]) == 0
    assert torch.equal(prompt_of(out), prompt_of(reference[0]))


# ----------------------------------------------------------------------------------- NaN / inf
def test_nan_steps_are_skipped_and_three_in_a_row_stop_with_exit_3(tmp_path, capsys, monkeypatch):
    from fastprompt.engines.fused import FusedEngine

    original, calls = FusedEngine.loss_terms, []

    def loss_terms(self, prompt, batch):  # second epoch: step 1 a lone inf, steps 3-5 NaN
        calls.append(torch.is_grad_enabled())  # training steps (the preflight's forward runs without grad)
        ce_sum, n = original(self, prompt, batch)
        bad = {6: float("inf")}.get(sum(calls), float("nan") if sum(calls) >= 8 else 1.0) if calls[-1] else 1.0
        return ce_sum * bad, n

    out = tmp_path / "run"
    monkeypatch.setattr(FusedEngine, "loss_terms", loss_terms)
    assert main([*ARGS, "--out", str(out), "--checkpoint-every", "1"]) == 3
    line = one_error_line(capsys.readouterr().err)
    assert "3 steps in a row" in line and "epoch 2, step 5" in line
    tensors, state = checkpoint.load_checkpoint(str(out))
    assert (state["epoch"], state["step"]) == (1, 2)  # the last good step; none written during the streak
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_api_inf_prompt_row_raises_nonfinite_error_and_leaves_the_prompt():
    model, tok = tiny_gpt2(seed=5), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="naive")
    with torch.no_grad():
        tuner.prompt[1, 0] = float("inf")
    before = tuner.prompt.detach().clone()
    pairs = [("hot", "cold"), ("up", "down")] * 4
    with pytest.raises(fp.NonFiniteError, match=r"epoch 1, step 3"):
        tuner.fit(pairs, epochs=1, batch_size=2, progress=False)
    assert torch.equal(tuner.prompt.detach(), before) and tuner.nonfinite.skipped == 3
    state = tuner.optimizer.state[tuner.prompt]  # no Adam step was taken: its state as before the first
    assert state["step"].item() == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


# ------------------------------------------------------------------------------------ bad input
def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


BAD_DATA = {
    "missing_column.csv": ("word1\nhot\n", "header"),
    "empty.csv": ("", "is empty"),
    "blank_line.csv": ("word1,word2\nhot,cold\n\nup,down\n", "blank line"),
    "bad_utf8.csv": (b"word1,word2\nhot,c\xffold\n", "UTF-8"),
    "too_many.csv": ("word1,word2\nhot,cold,warm\n", "too many fields"),
    "empty_word.csv": ("word1,word2\nhot, \n", "empty value"),
    "bad.jsonl": ('{"input": "hot", "target": "cold"}\n{"input": \n', "invalid JSON"),
    "missing_field.jsonl": ('{"input": "hot"}\n', "no field 'target'"),
    "long_target.csv": ("word1,word2\nhot," + "cold " * 200 + "\n", "context of 128"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, name):
    data, message = BAD_DATA[name]
    out = tmp_path / "out"
    code = main([*ARGS, "--train-size", "4", "--test-size", "0", "--data", write(tmp_path / name, data),
                 "--out", str(out)])
    assert code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def saved_prompt(tmp_path, name="p.safetensors", model_name="tiny", hidden=64, length=4):
    from fastprompt.promptfile import save_prompt_file

    path = str(tmp_path / name)
    save_prompt_file(path, {"prompt": torch.randn(length, hidden)}, {"model": model_name, "hidden_size": hidden})
    return path


@pytest.mark.parametrize("case, message", [
    ("corrupt", "not a valid safetensors"),
    ("hidden", "hidden size 80"),
    ("model", "made for model 'gpt2-large'"),
    ("length", "pass --prompt-len 5"),
    ("missing", "no prompt file"),
])
def test_bad_prompt_file(tmp_path, capsys, case, message):
    path = {"corrupt": lambda: write(tmp_path / "c.safetensors", b"\x00garbage" * 10),
            "hidden": lambda: saved_prompt(tmp_path, hidden=80),
            "model": lambda: saved_prompt(tmp_path, model_name="openai-community/gpt2-large"),
            "length": lambda: saved_prompt(tmp_path, length=5),
            "missing": lambda: str(tmp_path / "nope.safetensors")}[case]()
    out = tmp_path / "out"
    assert main([*ARGS, "--init", f"file:{path}", "--out", str(out)]) == 2
    assert message in one_error_line(capsys.readouterr().err) and not out.exists()


def test_init_from_a_saved_prompt_and_a_legacy_pt(tmp_path):
    path = saved_prompt(tmp_path)
    model = tiny_gpt2()
    model.config._name_or_path = "tiny"
    tuner = fp.PromptTuner(model, tokenizer(), prompt_len=4, init=f"file:{path}", engine="naive")
    assert torch.equal(tuner.prompt.detach(), load_file(path)["prompt"])
    torch.save(torch.ones(4, 64), str(tmp_path / "legacy.pt"))  # the post's format
    tuner = fp.PromptTuner(model, tokenizer(), prompt_len=4, init=f"file:{tmp_path / 'legacy.pt'}", engine="naive")
    assert torch.equal(tuner.prompt.detach(), torch.ones(4, 64))


@pytest.mark.parametrize("args, message", [
    (["--prompt-len", "0"], "--prompt-len"),
    (["--prompt-len", "100000"], "--prompt-len"),
    (["--prompt-len", "200"], "context of 128"),
    (["--engine", "warp"], "unknown engine"),
    (["--precision", "fp8"], "unknown precision"),
    (["--method", "magic"], "unknown method"),
    (["--kernels", "magic"], "unknown kernels"),
    (["--cuda-graphs", "magic"], "--cuda-graphs"),
    (["--device", "tpu"], "unknown device"),
    (["--model", "/no/such/model"], "--model tiny"),
    (["--lr", "nan"], "--lr"),
    (["--samples", "-1"], "--samples"),
    (["--checkpoint-every", "-2"], "--checkpoint-every"),
    (["--epochs", "two"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--init", "zeros"], "unknown prompt init"),
    (["--template", "{input} {target}"], "{prompt}"),
    (["--resume"], "--resume needs the --out"),
])
def test_bad_option_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = [] if args == ["--resume"] else ["--out", str(tmp_path / "out")]
    assert main([*ARGS, *out, *args]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_is_never_overwritten_by_mistake(tmp_path, capsys, reference):
    src = reference[0]
    out = tmp_path / "out"
    out.mkdir()
    for name in os.listdir(src):
        (out / name).write_bytes((src / name).read_bytes())
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    cases = [([], "not empty"), (["--resume", "--lr", "0.5"], "--lr 0.01"),
             (["--resume", "--overwrite"], "exclude"), (["--resume", "--engine", "warp"], "unknown engine"),
             (["--resume", "--seed", "1"], "was written with --seed 1337")]
    for args, message in cases:
        assert main([*ARGS, "--out", str(out), *args]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    (out / checkpoint.TENSORS).write_bytes(b"corrupt")
    before[checkpoint.TENSORS] = b"corrupt"
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    assert "not a valid safetensors checkpoint" in one_error_line(capsys.readouterr().err)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before


def test_api_raises_typed_errors_with_the_same_messages(tmp_path):
    with pytest.raises(fp.DataError, match="too many fields"):
        fp.load_pairs(write(tmp_path / "t.csv", "word1,word2\na,b,c\n"))
    with pytest.raises(fp.TemplateError, match="exactly once"):
        fp.Template("{input} {target}")
    model, tok = tiny_gpt2(), tokenizer()
    with pytest.raises(fp.ConfigError, match="positive integer"):
        fp.PromptTuner(model, tok, prompt_len=0)
    with pytest.raises(fp.ConfigError, match="unknown engine"):
        fp.PromptTuner(model, tok, engine="warp")
    tuner = fp.PromptTuner(model, tok, engine="naive")
    with pytest.raises(fp.DataError, match="context of 128"):
        tuner.encode([("hot", "cold " * 200)])

    class EmptyFor:  # a tokenizer that maps one word to no tokens at all
        bos_token_id = None

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [] if text.strip() == "zzz" else tok(text, add_special_tokens=False)["input_ids"]}

    encoder = TemplateEncoder(fp.Template(), EmptyFor(), 4)
    with pytest.raises(fp.DataError, match="tokenises to nothing"):
        encoder.encode(("zzz", "cold"), 0)


def test_usage_error_in_a_real_process_is_one_line_without_traceback():
    result = subprocess.run([sys.executable, "-m", "fastprompt.train", "--epochs", "x"], capture_output=True,
                            text=True, env=ENV)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "invalid int value" in one_error_line(result.stderr)


# ---------------------------------------------------------------------------------- safe loading
class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file when unpickled


def test_a_checkpoint_cannot_smuggle_a_pickle(tmp_path, capsys, reference):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"prompt": Payload(str(marker))}, str(out / checkpoint.TENSORS))  # a pickle under our name
    (out / checkpoint.SIDECAR).write_text(json.dumps({"format": checkpoint.FORMAT}))
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    assert "checkpoint" in one_error_line(capsys.readouterr().err) and not marker.exists()
    with pytest.raises(fp.PromptFileError):
        fp.PromptTuner.load(str(out / checkpoint.TENSORS), tiny_gpt2(), tokenizer())
    assert not marker.exists()


def test_resume_never_unpickles(tmp_path, monkeypatch, reference):
    out = tmp_path / "out"
    out.mkdir()
    for name in os.listdir(reference[0]):
        (out / name).write_bytes((reference[0] / name).read_bytes())

    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert main([*ARGS, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert [r["epoch"] for r in epochs_of(out)[1]] == [1, 2, 3]
