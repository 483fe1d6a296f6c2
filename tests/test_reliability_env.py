"""Issue 23, classes 6 and 7: files that would block, signals while a run shuts down, and the environment
it starts in (unencodable or unwritable stdout/stderr, a stray torchrun variable, unwritable caches)."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import fastprompt as fp
from fastprompt import checkpoint
from fastprompt.interpret import main as interpret
from fastprompt.train import main

from helpers import one_error_line, tree

ARGS = ["--model", "tiny", "--epochs", "2", "--train-size", "8", "--batch-size", "4", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def quiet_main(args):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args)


def prompt_of(out):
    return load_file(os.path.join(out, "prompt.safetensors"))["prompt"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert quiet_main([*ARGS, "--out", out]) == 0
    return out


# ---------------------------------------------------------------------- 6. files that would block
@contextlib.contextmanager
def rescued_if_blocked(fifo):
    """Opens the FIFO's write end whenever a reader waits on it (which unblocks that reader): ``rescued``
    tells afterwards whether anything ever opened it to read. No timing: a flag."""
    state = {"rescued": False}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds only while a reader has it open
            except OSError:
                time.sleep(0.01)
                continue
            state["rescued"] = True
            os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        stop.set()
        thread.join()


def fifo_cases(tmp_path, case):
    model = tmp_path / "model"
    if case == "a model file":
        fp.load_model("tiny")[0].save_pretrained(str(model))
        os.remove(model / "model.safetensors")
    return {"--data": (["--data"], str(tmp_path / "d.csv"), "not a regular file"),
            "--init file:": (["--init"], str(tmp_path / "p.safetensors"), "is a FIFO, not a prompt file"),
            "a model file": (["--model", str(model)], str(model / "model.safetensors"), "a FIFO")}


@pytest.mark.parametrize("case", ["--data", "--init file:", "a model file"])
def test_a_fifo_in_a_files_place_is_refused_without_being_opened(tmp_path, capsys, case):
    flag, fifo, message = fifo_cases(tmp_path, case)[case]
    os.mkfifo(fifo)
    capsys.readouterr()  # save_pretrained's progress bar
    args = [*flag, f"file:{fifo}"] if case == "--init file:" else ([*flag, fifo] if case == "--data" else flag)
    with rescued_if_blocked(fifo) as state:
        code = main([*ARGS, *args, "--out", str(tmp_path / "out")])
    assert code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not state["rescued"], "the FIFO was opened (a run would have waited forever)"
    assert not (tmp_path / "out").exists()


def test_interpret_refuses_a_fifo_without_opening_it(tmp_path, capsys):
    fifo = str(tmp_path / "p.safetensors")
    os.mkfifo(fifo)
    with rescued_if_blocked(fifo) as state:
        assert interpret([fifo, "--model", "tiny"]) == 2
    assert "is a FIFO" in one_error_line(capsys.readouterr().err) and not state["rescued"]


# ---------------------------------------------------------------------- 6. signals while shutting down
def signal_in(monkeypatch, target, name, signals_at):
    """Send this process ``signals_at[n]`` (a list of signals) on the n-th call of ``target.name``."""
    original, calls = getattr(target, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        for s in signals_at.get(len(calls), []):
            os.kill(os.getpid(), s)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("second", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_a_second_signal_in_a_step_abandons_it_and_the_last_checkpoint_stands(tmp_path, capsys, monkeypatch,
                                                                                finished, second):
    from fastprompt.step import TrainStep

    out = str(tmp_path / "run")
    before = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as m:  # step 3 (epoch 2, step 1): both signals inside it
        signal_in(m, TrainStep, "__call__", {3: [signal.SIGINT, second]})
        assert main([*ARGS, "--out", out, "--checkpoint-every", "1"]) == 130  # the first signal's code
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "stopped by SIGINT" in line and "abandoned" in line and "epoch 2, step 0" in line, line
    assert signal.getsignal(signal.SIGINT) is before
    _, state = checkpoint.load_checkpoint(out)
    assert (state["epoch"], state["step"]) == (1, 0)  # epoch 1's: the abandoned step left nothing
    assert quiet_main([*ARGS, "--out", out, "--resume"]) == 0
    assert torch.equal(prompt_of(out), prompt_of(finished))


def test_a_second_signal_while_the_checkpoint_is_written_waits_for_it(tmp_path, capsys, monkeypatch, finished):
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:  # a signal in step 3's forward, the second inside the checkpoint it asks for
        from fastprompt.step import TrainStep

        signal_in(m, TrainStep, "__call__", {3: [signal.SIGINT]})
        signal_in(m, checkpoint, "save_checkpoint", {2: [signal.SIGTERM, signal.SIGINT]})
        assert main([*ARGS, "--out", out]) == 130
    line = one_line(capsys.readouterr().err)
    assert "stopped by SIGINT at epoch 2, step 1; checkpoint written" in line, line
    _, state = checkpoint.load_checkpoint(out)
    assert (state["epoch"], state["step"]) == (1, 1)
    assert quiet_main([*ARGS, "--out", out, "--resume"]) == 0
    assert torch.equal(prompt_of(out), prompt_of(finished))


def one_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("where, missing", [("write_samples", "samples.txt, nearest.txt, loss.png"),
                                            pytest.param("plot_losses", "loss.png", marks=pytest.mark.slow)])
def test_a_signal_among_the_final_outputs_says_which_were_not_written(tmp_path, capsys, monkeypatch, finished,
                                                                      where, missing):
    import fastprompt.train as train

    out = str(tmp_path / "run")
    original = getattr(train, where)

    def signalled(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # stops the outputs at once
        finally:
            os.kill(os.getpid(), signal.SIGINT)  # sent while that stop is on its way out: only ignored
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(train, where, signalled)
        assert main([*ARGS, "--out", out]) == 143
    line = one_line(capsys.readouterr().err)
    assert f"stopped by SIGTERM while writing the final outputs: {missing} not written" in line, line
    assert "--resume" in line
    assert quiet_main([*ARGS, "--out", out, "--resume"]) == 0  # the checkpoint is complete: outputs written
    assert {"samples.txt", "nearest.txt", "loss.png"} <= set(os.listdir(out))
    assert torch.equal(prompt_of(out), prompt_of(finished))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("event") for r in records].count("final") == 1


@pytest.mark.slow
def test_two_signals_to_a_real_process_give_the_first_ones_message_and_resume_exactly(tmp_path):
    args = [*ARGS, "--train-size", "40"]  # 20 steps: the signals come while it trains
    reference = str(tmp_path / "reference")
    assert quiet_main([*args, "--out", reference]) == 0
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastprompt.train", *args, "--out", str(out), "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):  # wait for the first checkpoint (no timing assert: a bounded poll)
            if (out / checkpoint.SIDECAR).exists() or proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stopped by SIGINT" in one_line(err)
    assert quiet_main([*args, "--out", str(out), "--resume"]) == 0
    assert torch.equal(prompt_of(str(out)), prompt_of(reference))


# ---------------------------------------------------------------------- 7. the environment
@pytest.mark.parametrize("env, message", [
    ({"RANK": "1"}, "RANK=1 is set without WORLD_SIZE, LOCAL_RANK"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set without RANK, LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x' is not an integer"),
    ({"RANK": "3", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "need 0 <= RANK"),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, "without MASTER_ADDR, MASTER_PORT"),
])
def test_a_stray_torchrun_variable_is_one_line_not_silence(tmp_path, capsys, monkeypatch, env, message):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main([*ARGS, "--out", str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys.readouterr().err)
    assert main([*ARGS, "--epochs", "x"]) == 2  # a usage error too is said, not swallowed
    assert "invalid int value" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_a_single_torchrun_process_runs_as_one(tmp_path, monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert quiet_main([*ARGS, "--epochs", "0", "--out", str(tmp_path / "out")]) == 0
    assert os.path.isfile(tmp_path / "out" / "prompt.safetensors")


def run_cli(args, env, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable, "-m", "fastprompt.train", *args], env=env, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=600)


def test_ascii_streams_a_non_ascii_out_and_unwritable_caches(tmp_path):
    """PYTHONIOENCODING=ascii with a non-ASCII --out (printed with backslash escapes), HOME unset, the XDG
    cache on /proc and FASTPROMPT_CACHE below a file: the run works and stderr holds no traceback."""
    out = tmp_path / "r\u00e9sultat-\u6f22"
    env = {k: v for k, v in ENV.items() if k not in ("HOME", "MPLCONFIGDIR")}
    env.update(PYTHONIOENCODING="ascii", XDG_CACHE_HOME="/proc/fastprompt-cache", FASTPROMPT_CACHE="/dev/null/x")
    result = run_cli([*ARGS, "--epochs", "0", "--out", str(out)], env)
    assert result.returncode == 0, result.stderr.decode()
    assert b"Traceback" not in result.stderr and result.stderr.strip() == b"", result.stderr
    assert b"r\\xe9sultat-\\u6f22" in result.stdout
    assert os.path.isfile(out / "prompt.safetensors")


@pytest.mark.slow
def test_ascii_stderr_with_a_non_ascii_error(tmp_path):
    out = tmp_path / "caf\u00e9"
    out.write_text("a file")
    env = {**ENV, "PYTHONIOENCODING": "ascii"}
    result = run_cli([*ARGS, "--out", str(out)], env)
    assert result.returncode == 2
    assert one_error_line(result.stderr.decode("ascii")).endswith("caf\\xe9 is a file, not a directory")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_stdout_on_a_full_device_is_dropped_with_one_warning(tmp_path):
    with open("/dev/full", "w") as full:
        result = run_cli([*ARGS, "--epochs", "0", "--out", str(tmp_path / "out")], ENV, stdout=full)
    err = result.stderr.decode()
    assert result.returncode == 0 and "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: cannot write to stdout"), err
    assert os.path.isfile(tmp_path / "out" / "prompt.safetensors")


@pytest.mark.parametrize("cache", ["/proc/fastprompt-cache", "/dev/null/below-a-file", "read-only"])
def test_an_unwritable_model_cache_costs_the_speed_up_not_the_run(tmp_path, capsys, cache):
    from fastprompt.models import cached_pretrained

    if cache == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        (tmp_path / "ro").mkdir(mode=0o500)
        cache = str(tmp_path / "ro" / "copy")
    built = []

    def build():
        built.append(1)
        return fp.load_model("tiny")

    model, tok = cached_pretrained(cache, {"source": 1}, build)
    assert built and model.config.n_layer == 2
    note = capsys.readouterr().err
    assert note.startswith("note: could not cache") and len(note.strip().splitlines()) == 1
