"""Issue 17: the CLI against hostile input, a hostile filesystem and a second run. Whatever comes in, the
exit code is 0, 2 (one ``error:`` line, ``--out`` untouched) or 3 (NaN/inf, one line), and any moment of a
run can be killed and ``--resume``d to the bit-exact result. One section per class of the issue, then a
property-style test over random files and option values."""
import contextlib
import csv
import fcntl
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastprompt as fp
from fastprompt import checkpoint, session
from fastprompt.interpret import main as interpret
from fastprompt.promptfile import save_prompt_file
from fastprompt.train import main

from helpers import tiny_gpt2, tokenizer

# 8 examples, batch 4: 2 steps an epoch, 2 epochs, no test split (kept short: most tests run it)
ARGS = ["--model", "tiny", "--epochs", "2", "--train-size", "8", "--batch-size", "4", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def snapshot(path):
    """Every file under ``path`` with its bytes and mode (None: ``path`` does not exist)."""
    if not os.path.lexists(path):
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return ("dangling", os.readlink(path))
    if not os.path.isdir(path):
        return open(path, "rb").read()
    files = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            files[os.path.relpath(full, path)] = (open(full, "rb").read(), os.stat(full).st_mode)
    return files


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


def prompt_of(out):
    return load_file(os.path.join(out, "prompt.safetensors"))["prompt"]


def epochs_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    return lines, [r for r in lines if "epoch" in r and "event" not in r]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted run: the reference for every resume below, and an --out to attack."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ARGS, "--out", out]) == 0
    return out


def write(path, data):
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


# ------------------------------------------------------------- 1. every check before --out changes
def big_prompt(tmp_path, value=3e38):
    path = str(tmp_path / "big.safetensors")
    save_prompt_file(path, {"prompt": torch.full((4, 64), value)}, {"model": "tiny"})
    return path


@pytest.mark.parametrize("engine", ["fused", "generic", "naive"])
def test_a_prompt_that_overflows_exits_3_and_overwrite_touches_nothing(tmp_path, capsys, finished, engine):
    out = copy_run(finished, str(tmp_path / "out"))
    before = snapshot(out)
    code = main([*ARGS, "--engine", engine, "--init", f"file:{big_prompt(tmp_path)}", "--out", out, "--overwrite"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 3 and "NaN/inf" in line and "plain GPT-2" not in line
    assert snapshot(out) == before  # the old checkpoint and metrics.jsonl are still there


@pytest.mark.parametrize("opts", [["--method", "relaxed", "--method-opt", "init_std=inf"],
                                  ["--method", "relaxed", "--method-opt", "init_peak=inf", "--init", "vocab"],
                                  ["--engine", "generic", "--init", "file:BIG", "--prompt-len", "4"]])
def test_a_non_finite_start_of_any_method_exits_3_before_writing(tmp_path, capsys, opts):
    opts = [o.replace("BIG", big_prompt(tmp_path, 1e38)) for o in opts]
    out = tmp_path / "out"
    assert main([*ARGS, *opts, "--out", str(out)]) == 3
    assert "NaN/inf" in one_error_line(capsys.readouterr().err) and not out.exists()


def test_engine_self_checks_tell_a_non_finite_input_from_a_wrong_model():
    from fastprompt.engines.fused import FusedEngine

    pairs = [("hot", "cold"), ("up", "down")]
    tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), prompt_len=4, engine="fused")
    with pytest.raises(fp.NonFiniteError, match="NaN/inf"):  # the check runs in the engine's first loss
        tuner.engine.loss_terms(torch.full((4, 64), 3e38), tuner.encode(pairs))

    class Doubled(type(tiny_gpt2())):  # a model whose forward is not GPT-2's: logits scaled
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    model = tiny_gpt2()
    model.__class__ = Doubled
    engine = FusedEngine(model, tuner.encoder)
    with pytest.raises(fp.ConfigError, match="not a plain GPT-2"):
        engine.loss_terms(tuner.prompt.detach(), tuner.encode(pairs))


def test_an_engine_refusal_comes_before_overwrite_removes_anything(tmp_path, capsys, monkeypatch, finished):
    from fastprompt.engines.fused import FusedEngine

    def refuse(self, prompt, example, encoder=None):
        raise fp.ConfigError("the fused engine's GPT-2 forward does not reproduce the logits (test)")

    monkeypatch.setattr(FusedEngine, "check_against_model", refuse)
    out = copy_run(finished, str(tmp_path / "out"))
    before = snapshot(out)
    assert main([*ARGS, "--out", out, "--overwrite"]) == 2
    assert "does not reproduce" in one_error_line(capsys.readouterr().err) and snapshot(out) == before


# -------------------------------------------------------------------- 2. every moment resumable
class Killed(BaseException):
    """A simulated SIGKILL: nothing in fastprompt catches it."""


def kill_at(monkeypatch, target, name, when):
    """Raise ``Killed`` around ``target.name``: ``when(args, kwargs)`` returns "before", "after" or None."""
    original = getattr(target, name)

    def wrapper(*args, **kwargs):
        moment = when(args, kwargs)
        if moment == "before":
            raise Killed
        result = original(*args, **kwargs)
        if moment == "after":
            raise Killed
        return result

    monkeypatch.setattr(target, name, wrapper)


MOMENTS = {  # where a run dies: (object, function, when)
    "after claiming --out, before the header": (session.Session, "write_header", lambda a, k: "before"),
    "after the header, before any checkpoint": (checkpoint, "save_checkpoint", lambda a, k: "before"),
    "after a mid-epoch checkpoint": (checkpoint, "save_checkpoint",
                                     lambda a, k: "after" if (k["epoch"], k["step"]) == (0, 1) else None),
    "after epoch 1's checkpoint, before its metrics line": (
        checkpoint, "save_checkpoint", lambda a, k: "after" if (k["epoch"], k["step"]) == (1, 0) else None),
    "during the final outputs": (__import__("fastprompt.train").train, "write_samples", lambda a, k: "before"),
}


@pytest.mark.parametrize("moment", sorted(MOMENTS))
def test_a_kill_at_any_moment_resumes_to_the_same_prompt(tmp_path, capsys, monkeypatch, finished, moment):
    target, name, when = MOMENTS[moment]
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at(m, target, name, when)
        with pytest.raises(Killed):
            main([*ARGS, "--out", out, "--checkpoint-every", "1"])
    assert os.path.isdir(out)
    if os.listdir(out):
        assert main([*ARGS, "--out", out]) == 2  # a plain rerun is refused: the directory is a started run
    assert main([*ARGS, "--out", out, "--resume"]) == 0
    assert torch.equal(prompt_of(out), prompt_of(finished))
    lines, epochs = epochs_of(out)
    assert [r["train_loss"] for r in epochs] == [r["train_loss"] for r in epochs_of(finished)[1]]
    assert [r.get("event") for r in lines].count("final") == 1 and lines[0]["event"] == "start"


def test_a_run_without_checkpoint_restarts_from_step_0_after_the_same_config_checks(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    with monkeypatch.context() as m:
        kill_at(m, checkpoint, "save_checkpoint", lambda a, k: "before")
        with pytest.raises(Killed):
            main([*ARGS, "--out", out])
    capsys.readouterr()
    before = snapshot(out)
    for args, flag in ((["--lr", "0.5"], "--lr"), (["--seed", "7"], "--seed"), (["--prompt-len", "3"], "--prompt-len")):
        assert main([*ARGS, "--out", out, "--resume", *args]) == 2
        assert flag in one_error_line(capsys.readouterr().err) and snapshot(out) == before
    assert main([*ARGS, "--out", out, "--resume", "--epochs", "1"]) == 0
    assert "starting again from step 0" in capsys.readouterr().out
    lines, epochs = epochs_of(out)
    assert [r.get("event") for r in lines[:2]] == ["start", "resume"] and [r["epoch"] for r in epochs] == [1]


# ------------------------------------------------------------------------------------ 3. a lock on --out
def test_a_held_out_is_refused_at_once_and_left_alone(tmp_path, capsys, finished):
    out = copy_run(finished, str(tmp_path / "out"))
    before = snapshot(out)
    holder = os.open(out, os.O_RDONLY)  # another run's lock, as far as the kernel is concerned (its own descriptor)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        for extra in (["--resume", "--epochs", "3"], ["--overwrite"], []):
            assert main([*ARGS, "--out", out, *extra]) == 2
            assert "in use by another fastprompt run" in one_error_line(capsys.readouterr().err)
    finally:
        os.close(holder)
    assert snapshot(out) == before
    assert main([*ARGS, "--out", out, "--resume", "--epochs", "3"]) == 0  # free again


def test_a_new_out_taken_while_this_run_loaded_is_refused(tmp_path, capsys, monkeypatch):
    """Both runs saw a missing --out; the other one claims it first (here: while this one loads the model)."""
    out = str(tmp_path / "new")
    original = fp.load_model

    def load_and_lose_the_race(*args, **kwargs):
        os.mkdir(out)
        write(os.path.join(out, "metrics.jsonl"), '{"event": "start"}\n')
        return original(*args, **kwargs)

    monkeypatch.setattr(fp, "load_model", load_and_lose_the_race)
    assert main([*ARGS, "--out", out]) == 2
    assert "another run" in one_error_line(capsys.readouterr().err)
    assert os.listdir(out) == ["metrics.jsonl"]


@pytest.mark.slow
def test_two_runs_started_together_on_one_new_out(tmp_path):
    out = str(tmp_path / "shared")
    cmd = [sys.executable, "-m", "fastprompt.train", *ARGS, "--out", out, "--checkpoint-every", "1"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert any(s in one_error_line(refused) for s in ("in use", "another run", "not empty"))
    lines, epochs = epochs_of(out)
    assert [r.get("event") for r in lines].count("start") == 1 and [r["epoch"] for r in epochs] == [1, 2]


def test_the_lock_of_a_killed_process_does_not_block_resume(tmp_path, capsys, finished):
    out = copy_run(finished, str(tmp_path / "out"))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)", out],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*ARGS, "--out", out, "--resume"]) == 2
        assert "in use" in one_error_line(capsys.readouterr().err)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main([*ARGS, "--out", out, "--resume", "--epochs", "3"]) == 0
    assert [r["epoch"] for r in epochs_of(out)[1]] == [1, 2, 3]
    fd = os.open(out, os.O_RDONLY)  # and the finished run let go of it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- 4. lines as csv and json define them
SEPARATORS = ["\u2028", "\u2029", "\u0085", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]  # str.splitlines() breaks at each


@pytest.mark.parametrize("sep", SEPARATORS)
def test_unicode_line_separators_are_characters(tmp_path, sep):
    rows = [("hot", "co" + sep + "ld"), ("up" + sep, "down")]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([("word1", "word2"), *rows])
    assert fp.load_pairs(write(tmp_path / "d.csv", buf.getvalue())) == rows
    lines = "".join(json.dumps({"input": a, "target": b}, ensure_ascii=False) + "\n" for a, b in rows)
    assert [tuple(e.values()) for e in fp.load_pairs(write(tmp_path / "d.jsonl", lines))] == rows


def test_csv_and_jsonl_round_trip_random_examples(tmp_path):
    """Whatever the values hold (quotes, commas, CR/LF, separators, tabs), what csv/json wrote comes back."""
    rng = random.Random(17)
    alphabet = "ab, \"'\t\r\n;{}\\" + "".join(SEPARATORS) + "é€😀"
    for trial in range(40):
        def word():
            return "w" + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) + "z"
        rows = [(word(), word()) for _ in range(rng.randint(1, 6))]
        buf = io.StringIO()
        csv.writer(buf).writerows([("word1", "word2"), *rows])  # "\r\n": csv quotes a lone \r only then
        assert fp.load_pairs(write(tmp_path / f"{trial}.csv", buf.getvalue())) == rows
        text = "".join(json.dumps({"input": a, "target": b}, ensure_ascii=rng.random() < 0.5) + rng.choice(["\n", "\r\n"])
                       for a, b in rows)
        assert [(e["input"], e["target"]) for e in fp.load_pairs(write(tmp_path / f"{trial}.jsonl", text))] == rows


def test_errors_after_multi_line_records_name_the_physical_line(tmp_path):
    text = 'word1,word2\n"a\nb",c\nd,"e\r\nf"\ng,h,i\n'
    with pytest.raises(fp.DataError, match=r"line 6: too many fields"):
        fp.load_pairs(write(tmp_path / "m.csv", text))


# ------------------------------------------------------------------- 5. one error line instead of a traceback
BAD_FILES = {
    "quote.csv": ('word1,word2\nhot,"cold\nup,down\n', "malformed CSV"),
    "stray_quote.csv": ('word1,word2\nhot,"co"ld\n', "line 2: malformed CSV"),
    "huge_field.csv": ("word1,word2\nhot," + "x" * 200_000 + "\n", "line 2: malformed CSV"),
    "deep.jsonl": ("[" * 100_000 + "]" * 100_000 + "\n", "line 1: JSON nested too deeply"),
    "long_int.jsonl": ('{"input": "a", "target": "b"}\n{"input": ' + "9" * 5000 + "}\n", "line 2: a JSON number"),
    "surrogate.jsonl": ('{"input": "\\ud800", "target": "b"}\n', "unpaired surrogate"),
    "nul.csv": (b"word1,word2\nhot,\x00\n", None),
    "cr_between.jsonl": ('{"input": "a", "target": "b"}\r{"input": "c", "target": "d"}\n', "line 1: invalid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_malformed_data_is_one_line(tmp_path, capsys, name):
    data, message = BAD_FILES[name]
    out = tmp_path / "out"
    code = main([*ARGS, "--train-size", "4", "--data", write(tmp_path / name, data), "--out", str(out)])
    err = capsys.readouterr().err
    if message is None:  # accepted or refused, but never a traceback
        assert code in (0, 2) and (code == 0 or one_error_line(err))
        return
    assert code == 2 and message in one_error_line(err) and name in err and not out.exists()


def out_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    os.symlink(str(tmp_path / "nowhere"), tmp_path / "dangling")
    os.symlink("loop", tmp_path / "loop")
    return {"below a file": (str(tmp_path / "file" / "run"), "below a file"),
            "a file": (str(tmp_path / "file"), "is a file"),
            "dangling symlink": (str(tmp_path / "dangling"), "symlink to nothing"),
            "below a dangling symlink": (str(tmp_path / "dangling" / "run"), "symlink to nothing"),
            "symlink loop": (str(tmp_path / "loop"), "symbolic links"),
            "below a loop": (str(tmp_path / "loop" / "run"), "symbolic links"),
            "name too long": (str(tmp_path / ("x" * 300)), "too long"),
            "a read-only filesystem": ("/proc/fastprompt-test/run", "--out"),
            "NUL": ("run\x00x", "not a usable path")}


def test_out_paths_that_cannot_be_written_are_one_line(tmp_path, capsys):
    for case, (out, message) in out_paths(tmp_path).items():
        before = snapshot(out) if "\x00" not in out else None
        assert main([*ARGS, "--out", out]) == 2, case
        assert message in one_error_line(capsys.readouterr().err), case
        if "\x00" not in out:
            assert snapshot(out) == before, case


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_without_write_permission(tmp_path, capsys):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for out in (locked, locked / "run"):
            assert main([*ARGS, "--out", str(out)]) == 2
            assert "permission" in one_error_line(capsys.readouterr().err)
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("seed", [str(2**64), str(-(2**63) - 1), "1" + "0" * 40])
def test_seeds_beyond_64_bits_are_one_line_in_both_commands(tmp_path, capsys, seed):
    assert main([*ARGS, "--seed", seed, "--out", str(tmp_path / "o")]) == 2
    assert "--seed" in one_error_line(capsys.readouterr().err)
    path = str(tmp_path / "p.safetensors")
    save_prompt_file(path, {"prompt": torch.randn(4, 64)}, {"model": "tiny"})
    assert interpret([path, "--model", "tiny", "--seed", seed]) == 2
    assert "--seed" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_interpret_k_out_of_range(tmp_path, capsys):
    path = str(tmp_path / "p.safetensors")
    save_prompt_file(path, {"prompt": torch.randn(4, 64)}, {"model": "tiny"})
    for k, message in (("0", "at least 1"), ("-3", "at least 1"), ("50258", "at most the vocabulary size, 50257")):
        assert interpret([path, "--model", "tiny", "--k", k]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    save_prompt_file(path, {"prompt": torch.randn(1, 64)}, {"model": "tiny"})
    assert interpret([path, "--model", "tiny", "--k", "50257", "--metric", "euclidean"]) == 0  # the edge itself
    assert capsys.readouterr().out.count("token_id:") == 50257


def rewrite_checkpoint(out, edit, recompute=True):
    """Load the checkpoint's tensors and state, apply ``edit(tensors, state)``, write it back (with a
    matching checksum unless ``recompute`` is False: then only the validation is left to catch it)."""
    path = os.path.join(out, checkpoint.TENSORS)
    with safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["fastprompt_checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, state)
    if recompute:
        state["tensors"] = {name: list(t.shape) for name, t in tensors.items()}
        state["checksum"] = checkpoint.checksum(tensors, state)
    save_file(tensors, path, metadata={"fastprompt_checkpoint": json.dumps(state)})


def _set(d, key, value):
    d[key] = value


DAMAGE = {  # name: (edit, recompute the checksum?, message)
    "finite garbage in the prompt": (lambda t, s: t["param.0"].add_(1e-3), False, "checksum does not match"),
    "one flipped bit in Adam's state": (lambda t, s: t["optim.0.exp_avg"].view(torch.int32).__ixor__(1),
                                        False, "checksum does not match"),
    "edited history": (lambda t, s: s["history"][0].update(train_loss=0.0), False, "checksum does not match"),
    "no checksum": (lambda t, s: s.pop("checksum"), False, "has no checksum"),
    "missing Adam state": (lambda t, s: t.pop("optim.0.exp_avg_sq"), True, "exp_avg_sq"),
    "wrong-shaped Adam state": (lambda t, s: _set(t, "optim.0.exp_avg", torch.zeros(3, 64)), True, "exp_avg"),
    "Adam step not a scalar": (lambda t, s: _set(t, "optim.0.step", torch.zeros(2)), True, "step"),
    "negative exp_avg_sq": (lambda t, s: t["optim.0.exp_avg_sq"].neg_().sub_(1), True, "negative"),
    "NaN in the prompt": (lambda t, s: t["param.0"].fill_(float("nan")), True, "param.0"),
    "fp16 prompt": (lambda t, s: _set(t, "param.0", t["param.0"].half()), True, "param.0"),
    "wrong RNG state": (lambda t, s: _set(t, "rng.torch", t["rng.torch"][:100].clone()), True, "rng.torch"),
    "history one epoch short": (lambda t, s: s["history"].pop(), True, "history"),
    "history renumbered": (lambda t, s: s["history"][1].update(epoch=7), True, "history entry 1"),
    "bad lr in a param group": (lambda t, s: s["optimizer"]["param_groups"][0].update(lr="fast"), True, "lr"),
    "param groups miss the prompt": (lambda t, s: s["optimizer"]["param_groups"][0].update(params=[]), True,
                                     "cover"),
    "negative step": (lambda t, s: s.update(step=-1), True, "step must be an integer >= 0"),
    "method schedule gone": (lambda t, s: s.pop("method"), True, "no 'method'"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoints_are_refused_before_anything_is_written(tmp_path, capsys, finished, damage):
    edit, recompute, message = DAMAGE[damage]
    out = copy_run(finished, str(tmp_path / "out"))
    rewrite_checkpoint(out, edit, recompute)
    before = snapshot(out)
    assert main([*ARGS, "--out", out, "--resume", "--epochs", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "cannot be resumed" in line
    assert snapshot(out) == before


def test_an_untouched_rewritten_checkpoint_still_resumes(tmp_path, finished):
    """The edit helper itself changes nothing: the refusals above are the edits'."""
    out = copy_run(finished, str(tmp_path / "out"))
    rewrite_checkpoint(out, lambda t, s: None)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ARGS, "--out", out, "--resume", "--epochs", "3"]) == 0


def method_file(tmp_path, trained, **meta_edits):
    model, tok = fp.load_model("tiny", seed=1337)
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", method=trained, init="text:antonyms")
    path = str(tmp_path / f"{trained}.safetensors")
    tuner.save(path)
    with safe_open(path, framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    drop = meta_edits.pop("drop_tensor", None)
    if drop:
        tensors.pop(drop)
    reshape = meta_edits.pop("flatten", None)
    if reshape:
        tensors[reshape] = tensors[reshape].reshape(-1)
    meta.update(meta_edits)
    save_file(tensors, path, metadata=meta)
    return path


BAD_METHOD_FILES = {
    "unknown method": ("soft", {"method": "magic"}, "unknown method 'magic'"),
    "options not JSON": ("relaxed", {"method_options": "{tau"}, "not valid JSON"),
    "options a list": ("relaxed", {"method_options": "[1, 2]"}, "JSON object"),
    "tau zero": ("relaxed", {"method_options": '{"tau_start": 0, "tau_end": 0.1}'}, "tau_start"),
    "tau missing": ("relaxed", {"method_options": '{"init_std": 1}'}, "tau_start"),
    "step a string": ("relaxed", {"method_step": '"x"'}, "method_step"),
    "negative total": ("relaxed", {"method_total_steps": "-4"}, "method_step"),
    "token ids out of range": ("hard", {"token_ids": "[1, 99999999]"}, "outside this model's vocabulary"),
    "negative token id": ("hard", {"token_ids": "[-1]"}, "outside this model's vocabulary"),
    "token ids not a list": ("hard", {"token_ids": '{"a": 1}'}, "list of integers"),
    "relaxed without logits": ("relaxed", {"drop_tensor": "logits"}, "'logits' tensor"),
    "prefix without prefix": ("prefix", {"drop_tensor": "prefix"}, "'prefix' tensor"),
    "flat prefix": ("prefix", {"flatten": "prefix"}, "5 dimensions"),
    "flat logits": ("relaxed", {"flatten": "logits"}, "2 dimensions"),
}


@pytest.mark.parametrize("case", sorted(BAD_METHOD_FILES))
def test_prompt_files_with_bad_method_metadata_are_one_line(tmp_path, capsys, case):
    method, edits, message = BAD_METHOD_FILES[case]
    path = method_file(tmp_path, method, **edits)
    assert interpret([path, "--model", "tiny", "--k", "2"]) == 2
    assert message in one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------------------------- 6. no silent acceptance
def test_resume_compares_the_data_by_content_not_by_path(tmp_path, capsys):
    data = tmp_path / "a.csv"
    data.write_text("word1,word2\n" + "".join(f"w{i},v{i}\n" for i in range(30)))
    out = str(tmp_path / "run")
    args = [*ARGS, "--epochs", "1", "--out", out]
    assert main([*args, "--data", str(data)]) == 0
    moved = tmp_path / "sub" / "b.csv"
    moved.parent.mkdir()
    shutil.copy(data, moved)  # the same bytes by another path: accepted
    assert main([*args, "--epochs", "2", "--resume", "--data", str(moved)]) == 0
    data.write_text(data.read_text().replace("w7,v7", "w7,changed"))  # same path, other contents: refused
    capsys.readouterr()
    before = snapshot(out)
    assert main([*args, "--epochs", "3", "--resume", "--data", str(data)]) == 2
    assert "contents differ" in one_error_line(capsys.readouterr().err) and snapshot(out) == before


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_on_an_out_with_nothing_to_resume_says_so(tmp_path, capsys, state):
    out = tmp_path / "run"
    if state == "empty":
        out.mkdir()
    assert main([*ARGS, "--epochs", "1", "--out", str(out), "--resume"]) == 0
    said = capsys.readouterr().out
    assert "nothing to resume" in said and "starting a fresh run" in said
    assert epochs_of(str(out))[0][0]["event"] == "start"


def test_resume_refuses_a_directory_that_is_no_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    assert "nothing to resume" in one_error_line(capsys.readouterr().err)
    assert os.listdir(out) == ["notes.txt"]


# ----------------------------------------------------------------------------------- 7. noise and modes
def pt_files(tmp_path):
    import pickle

    files = {}
    files["pickle4"] = tmp_path / "p4.pt"
    files["pickle4"].write_bytes(pickle.dumps([1, 2], protocol=4))
    files["garbage"] = tmp_path / "g.pt"
    files["garbage"].write_bytes(b"\x80\x04garbage" * 5)
    for name, tensor in (("sparse", torch.ones(4, 64).to_sparse()), ("complex", torch.ones(4, 64, dtype=torch.cfloat)),
                         ("nan", torch.full((4, 64), float("nan"))), ("3d", torch.ones(1, 4, 64))):
        files[name] = tmp_path / f"{name}.pt"
        torch.save(tensor, str(files[name]))
    return files


def test_pt_inputs_are_one_quiet_line(tmp_path, capsys):
    for name, path in pt_files(tmp_path).items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main([*ARGS, "--init", f"file:{path}", "--out", str(tmp_path / "o")]) == 2, name
        line = one_error_line(capsys.readouterr().err)
        assert not caught, (name, [str(w.message) for w in caught])
        assert "weights_only" not in line and "arbitrary code" not in line and "unsafe" not in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_pickled_pt_in_a_real_process_prints_one_line(tmp_path):
    path = pt_files(tmp_path)["pickle4"]
    result = subprocess.run([sys.executable, "-m", "fastprompt.train", *ARGS, "--init", f"file:{path}", "--out",
                             str(tmp_path / "o")], capture_output=True, text=True, env=ENV)
    assert result.returncode == 2 and "never other pickled objects" in one_error_line(result.stderr)


@pytest.mark.parametrize("command, args, message", [
    ("train", ["--epochs"], "expected one argument"),
    ("train", ["--batch-size", "x"], "invalid int value"),
    ("train", ["--no-such-flag", "1"], "unrecognized arguments"),
    ("train", ["extra"], "unrecognized arguments"),
    ("interpret", [], "required"),
    ("interpret", ["p.safetensors", "--metric", "manhattan"], "invalid choice"),
    ("interpret", ["p.safetensors", "--k", "two"], "invalid int value"),
    ("interpret", ["p.safetensors", "--bogus"], "unrecognized arguments"),
])
def test_usage_errors_are_one_line(capsys, command, args, message):
    entry = main if command == "train" else interpret
    code = entry(args)
    err = capsys.readouterr().err
    assert code == 2 and message in one_error_line(err)


def test_every_output_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert main([*ARGS, "--epochs", "1", "--method", "relaxed", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    modes = {name: oct(os.stat(tmp_path / "run" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "run")}
    assert {"prompt.safetensors", "checkpoint.safetensors", "metrics.jsonl", "hard_prompt.txt"} <= set(modes)
    assert set(modes.values()) == {"0o640"}, modes


def test_overwrite_removes_what_it_will_not_rewrite_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ARGS, "--epochs", "0", "--method", "relaxed", "--out", str(out)]) == 0  # hard_prompt.txt
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    before = snapshot(str(out))
    assert main([*ARGS, "--epochs", "1", "--lr", "nan", "--out", str(out), "--overwrite"]) == 2  # a failed check
    assert snapshot(str(out)) == before
    assert main([*ARGS, "--epochs", "1", "--out", str(out), "--overwrite"]) == 0  # soft: no hard_prompt.txt
    names = set(os.listdir(out))
    assert "hard_prompt.txt" not in names and {"notes.txt", "sub", "prompt.safetensors", "checkpoint.json"} <= names
    lines, epochs = epochs_of(str(out))
    assert [r.get("event") for r in lines] == ["start", None, "final"] and lines[-1]["method"] == "soft"


def test_data_errors_name_the_file_and_line_not_the_shuffled_position(tmp_path, capsys):
    rows = [{"input": f"w{i}", "target": f"v{i}"} for i in range(12)]
    rows[8] = {"input": "w8"}  # line 9: no target
    path = write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert main([*ARGS, "--data", path, "--test-size", "0.25", "--out", str(tmp_path / "o")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {path}, line 9: example has no field 'target'")
    text = 'word1,word2\n"a\nb",c\nhot,' + "cold " * 200 + "\n"  # a multi-line record, then a too-long one
    path = write(tmp_path / "long.csv", text)
    assert main([*ARGS, "--data", path, "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {path}, line 4:") and "context of 128" in line


# --------------------------------------------------------------------------------- property-style test
class Checked(BaseException):
    """Raised where a run would first write to --out: every check has passed (the cheap stand-in for a run)."""


def random_bytes(rng):
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))


WORDS = ["hot", "cold", "up", "down", "big", "small", "a b", "x,y", 'say "hi"', "caf\u00e9", "l\u2028m"]


def random_text(rng, n=8):
    if rng.random() < 0.6:
        return rng.choice(WORDS)
    pool = ["a", "hot", "cold", " ", ",", '"', "'", "\n", "\r", "\r\n", "\t", "{", "}", "\\", "\x00",
            *SEPARATORS, "é", "😀", "\ud800", "null", "1e999"]
    return "".join(rng.choice(pool) for _ in range(rng.randrange(0, n)))


def random_csv(rng):
    header = rng.choice([["word1", "word2"], ["input", "target"], ["question", "target"], ["word1"], ["a", "a"], []])
    rows = [header] + [[random_text(rng) or "x" for _ in range(rng.choice([len(header), len(header), 1, 3]))]
                       for _ in range(rng.randrange(0, 8))]
    buf = io.StringIO()
    writer = csv.writer(buf, quoting=rng.choice([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONE]),
                        escapechar="\\", lineterminator=rng.choice(["\n", "\r\n", "\r"]))
    writer.writerows(rows)
    text = buf.getvalue()
    if rng.random() < 0.2:  # damage it
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(['"', "\n\n", "\x00", ",", "\u2028"]) + text[at:]
    return text.encode("utf-8", "surrogatepass")


def random_json_value(rng, depth=0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 8:
        return rng.choice(WORDS)
    if kind == 0:
        return random_text(rng)
    if kind == 1:
        return rng.choice([0, -1, 10**30, 1.5, float("inf"), float("nan")])
    if kind == 2:
        return rng.choice([True, False, None])
    if kind in (3, 4):
        return rng.choice(["hot", "cold", "up", "down", "big", "small"])
    if kind == 5:
        return [random_json_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["input", "target", "x"]): random_json_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_jsonl(rng):
    lines = []
    for _ in range(rng.randrange(0, 8)):
        if rng.random() < 0.7:
            obj = {"input": random_json_value(rng), "target": random_json_value(rng)}
        else:
            obj = random_json_value(rng)
        lines.append(json.dumps(obj, ensure_ascii=rng.random() < 0.5))
    text = rng.choice(["\n", "\r\n"]).join(lines) + rng.choice(["", "\n", "\n\n"])
    if rng.random() < 0.2:
        at = rng.randrange(len(text) + 1)
        text = text[:at] + rng.choice(["{", "\n", "\u2028", "[" * 5000, "1" * 5000, '"\\ud800"']) + text[at:]
    return text.encode("utf-8", "surrogatepass")


OPTION_VALUES = {
    "--epochs": ["0", "1", "-1", "x", "99999999999999999999999", ""],
    "--batch-size": ["1", "3", "0", "-5", "1.5"],
    "--lr": ["1e-2", "0", "-1", "nan", "inf", "1e308", "x"],
    "--prompt-len": ["1", "4", "0", "127", "128", "5000", "-1"],
    "--seed": ["0", "-1", str(2**64 - 1), str(2**64), str(-(2**63) - 1), "1" * 30],
    "--train-size": ["1", "4", "0", "-2", "100000"],
    "--test-size": ["0", "0.5", "0.99", "1", "-0.1", "nan"],
    "--samples": ["0", "1", "-1"],
    "--checkpoint-every": ["0", "1", "-1"],
    "--engine": ["auto", "naive", "generic", "fused", "warp", ""],
    "--precision": ["fp32", "bf16", "fp8", ""],
    "--kernels": ["auto", "torch", "magic"],
    "--cuda-graphs": ["auto", "off", "on", "maybe"],
    "--device": ["cpu", "auto", "tpu", "cuda:99"],
    "--method": ["soft", "relaxed", "hard", "prefix", "magic"],
    "--method-opt": ["tau_start=0", "tau_end=nan", "init_std=inf", "init_std=1e30", "gumbel=true", "nokey", "=1",
                     "lr_scale=-1", "metric=euclidean", "unknown=3"],
    "--init": ["random", "vocab", "text:", "text:hot", "file:", "file:/nonexistent", "zeros", "text:\u2028"],
    "--template": ["Here are two {prompt} {input} and {target}", "{prompt}{input}{target}", "{input} {target}",
                   "{prompt} {target} {input}", "{prompt {target}", "{prompt} {x} {target}", ""],
    "--model": ["tiny", "/no/such/model", "random:nope", ""],
}


def random_options(rng):
    args = []
    for flag in rng.sample(sorted(OPTION_VALUES), rng.randrange(1, 4)):
        args += [flag, rng.choice(OPTION_VALUES[flag])]
    for flag in ("--resume", "--overwrite"):
        if rng.random() < 0.2:
            args.append(flag)
    return args


def test_property_random_files_and_options(tmp_path, capsys, monkeypatch, finished):
    """Random bytes, random CSV/JSONL structures and random option values: the exit code is 0, 2 or 3; on
    2 and 3 stderr is one ``error:`` line; on 2 --out is as it was. Cases that pass every check stop where
    the run would first write to --out (``Checked``, cheap); the first few of those run to the end."""
    rng = random.Random(1717)
    full_runs_left = 2
    original_write_header = session.Session.write_header
    counts = {0: 0, 2: 0, 3: 0, "checked": 0}
    for case in range(160):
        kind = rng.choice(["bytes", "csv", "jsonl", "options", "options"])
        args = [*ARGS, "--epochs", "1", "--train-size", "4"]
        if kind == "options":
            args += random_options(rng)
        else:
            suffix = {"bytes": rng.choice([".csv", ".jsonl", ".tsv"]), "csv": ".csv", "jsonl": ".jsonl"}[kind]
            content = {"bytes": random_bytes, "csv": random_csv, "jsonl": random_jsonl}[kind](rng)
            args += ["--data", write(tmp_path / f"case{case}{suffix}", content)]
        out = str(tmp_path / f"out{case}")
        if rng.random() < 0.3:  # an existing run to attack, sometimes with --resume / --overwrite
            copy_run(finished, out)
            args += rng.choice([[], ["--resume"], ["--overwrite"]])
        args += ["--out", out]
        before = snapshot(out)
        run_to_end = full_runs_left > 0 and rng.random() < 0.3
        full_runs_left -= run_to_end
        with monkeypatch.context() as m:
            if not run_to_end:
                def stop(self, *a, **k):
                    raise Checked
                m.setattr(session.Session, "write_header", stop)
            try:
                code = main(args)
            except Checked:
                code = "checked"
        captured = capsys.readouterr()
        assert code in (0, 2, 3, "checked"), (case, args, code, captured.err[-2000:])
        if code in (2, 3):
            one_error_line(captured.err)
        if code == 2:
            assert snapshot(out) == before, (case, args)
        if code == "checked":  # every check passed and nothing is written yet: --out exists, as it was or new
            assert snapshot(out) in (before, {}), (case, args)
        counts[code] += 1
    assert session.Session.write_header is original_write_header
    assert counts[2] >= 50 and counts["checked"] + counts[0] >= 15, counts  # both kinds of paths were exercised


@pytest.mark.parametrize("extra", [["--lr", "1e38"], ["--sweep", "lr=1e-3,1e38"]])
def test_a_learning_rate_adam_cannot_step_is_one_line(tmp_path, capsys, extra):
    """lr above 1e37 made Adam's first step (10 × lr) overflow a float32 inside torch: a traceback mid-run;
    now refused before anything is written, for a run and for a sweep point alike."""
    out = tmp_path / "out"
    args = [a for a in ARGS if a not in ("--lr", "1e-2")] if "--sweep" in extra else ARGS
    assert main([*args, *extra, "--out", str(out)]) == 2
    assert "must be at most 1e37" in one_error_line(capsys.readouterr().err) and not out.exists()
