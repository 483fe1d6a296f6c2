"""Issue 22, item 7: every option of ``python -m fastprompt.train`` is declared once (fastprompt/options.py)
and argparse, the checks, the run header, the resume check and PromptTuner's keywords are built from that
declaration. Every test below walks ``OPTIONS``: a new option is covered as soon as it is declared (a new
check needs its bad value in ``BAD``)."""
import inspect
import json
import math
import os
import shutil

import pytest

import fastprompt as fp
from fastprompt import options
from fastprompt.engines import ENGINE_OPTIONS
from fastprompt.options import CONTENT, FREE, MATCH, OPTIONS, TrainConfig
from fastprompt.train import build_parser, main, parse_config

from helpers import tiny_gpt2, tokenizer

ARGS = ["--model", "tiny", "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]

# A value each declared check refuses (typed: the CLI gets str(value), the API the value itself).
BAD = {"prompt_len": 0, "epochs": -1, "batch_size": 0, "lr": math.nan, "train_size": 0, "test_size": 1.0,
       "seed": 2**64, "out": "", "samples": -1, "checkpoint_every": -1, "eval_every": -1, "eval_size": 0,
       "max_steps": -1, "max_seconds": -1.0, "report_to": "wandb", "baseline": "  ", "gcg_top_k": 0,
       "gcg_candidates": 0}


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def snapshot(out):
    return {name: (out / name).read_bytes() for name in sorted(os.listdir(out)) if (out / name).is_file()}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run with a few options away from their defaults."""
    out = tmp_path_factory.mktemp("opt") / "run"
    assert main([*ARGS, "--out", str(out), "--seed", "7", "--method-opt", "init_std=0.5", "--method", "relaxed",
                 "--eval-every", "0"]) == 0
    return out


def header_of(out):
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


# ------------------------------------------------------------------------------ the declaration itself
def test_names_are_unique_and_every_option_says_how_it_is_checked():
    assert len({o.name for o in OPTIONS}) == len(OPTIONS) and len({o.cli for o in OPTIONS}) == len(OPTIONS)
    for o in OPTIONS:
        assert o.resume in (MATCH, CONTENT, FREE), o.name
        assert o.check is not None or o.checked_by, f"{o.name}: neither a check nor where it is checked"
    assert set(BAD) == {o.name for o in OPTIONS if o.check is not None}  # a new check: add its bad value


def test_every_option_is_in_help_with_its_declared_default():
    text = build_parser().format_help()
    for o in OPTIONS:
        assert o.cli in text, o.cli
    parsed = parse_config([])
    for o in OPTIONS:
        assert getattr(parsed, o.name) == o.default == getattr(TrainConfig(), o.name), o.name


# ------------------------------------------------------------------------------------- the checks
@pytest.mark.parametrize("name", sorted(BAD))
def test_every_declared_check_is_one_line_exit_2_before_anything_is_written(tmp_path, capsys, name):
    o = options.BY_NAME[name]
    out = tmp_path / "out"
    args = [*ARGS, *([] if name == "out" else ["--out", str(out)]), o.cli, str(BAD[name])]
    assert main(args) == 2
    assert o.cli in one_error_line(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("where", ["PromptTuner", "PromptTuner.fit"])
def test_api_keywords_share_the_declared_default_and_check(where):
    function = fp.PromptTuner.__init__ if where == "PromptTuner" else fp.PromptTuner.fit
    signature = inspect.signature(function).parameters
    twins = [o for o in OPTIONS if where in o.api]
    assert twins
    defaults = options.api_defaults(where)
    for o in twins:
        assert signature[o.name].default == getattr(defaults, o.name), o.name
        if o.api_default is options.SAME:
            assert signature[o.name].default == o.default, o.name
    model, tok = tiny_gpt2(), tokenizer()
    for o in twins:
        if o.name not in BAD:
            continue
        with pytest.raises(fp.ConfigError) as e:
            if where == "PromptTuner":
                fp.PromptTuner(model, tok, engine="naive", **{o.name: BAD[o.name]})
            else:
                fp.PromptTuner(model, tok, engine="naive").fit([("hot", "cold")], progress=False,
                                                               **{o.name: BAD[o.name]})
        assert str(e.value).startswith(f"{o.name} "), str(e.value)


def test_the_engine_options_defaults_are_the_engines():
    fused = ENGINE_OPTIONS["fused"]
    for name in ("kernels", "cuda_graphs"):
        assert options.BY_NAME[name].default == fused[name]


# ------------------------------------------------------------------------ the run header and resume
def test_every_option_is_in_the_run_header_and_the_checkpoint(run_dir):
    header = header_of(run_dir)
    config = options.validate(parse_config([*ARGS, "--out", str(run_dir), "--seed", "7", "--method-opt",
                                            "init_std=0.5", "--method", "relaxed", "--eval-every", "0"]))
    assert header["config"] == {o.name: getattr(config, o.name) for o in OPTIONS}
    assert header["config"]["seed"] == 7 and header["config"]["method_opt"] == ["init_std=0.5"]
    for key in options.hash_keys():
        assert key in header
    assert header["data_sha256"] and header["eval_data_sha256"] is None
    saved = json.loads((run_dir / "checkpoint.json").read_text())["config"]
    assert set(saved) == {o.name for o in OPTIONS} | set(options.hash_keys())


def other_value(o):
    """A valid value unlike the default, from the declared type."""
    if o.action == "append":
        return ["x=1"]
    if o.type is None:
        return not o.default
    if o.type is int:
        return (o.default or 0) + 3
    if o.type is float:
        return 0.5 if o.default is None else o.default * 2
    return "other" if o.default is None else o.default + "x"


def test_the_resume_check_covers_every_option_declared_to_match(run_dir):
    saved = json.loads((run_dir / "checkpoint.json").read_text())["config"]
    for o in OPTIONS:
        current = {**saved, o.name: other_value(o)}
        if o.resume == FREE:
            options.check_resume(saved, current, "ckpt")  # may change
            continue
        if o.resume == CONTENT:
            options.check_resume({**saved, o.hash_key: "a" * 64}, {**current, o.hash_key: "a" * 64}, "ckpt")
            current[o.hash_key] = "b" * 64  # the same path with other bytes, or the bytes missing
        with pytest.raises(fp.ConfigError) as e:
            options.check_resume({**saved, o.hash_key: "a" * 64} if o.resume == CONTENT else saved, current, "ckpt")
        assert o.cli in str(e.value) and "ckpt" in str(e.value), o.name


@pytest.mark.parametrize("args, flag", [
    (["--template", "Opposites: {prompt} {input} and {target}"], "--template"),
    (["--batch-size", "2"], "--batch-size"),
    (["--method-opt", "init_std=0.25"], "--method-opt"),
    (["--seed", "8"], "--seed"),
])
def test_a_mismatched_option_on_resume_is_refused_and_out_unchanged(tmp_path, capsys, run_dir, args, flag):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    before = snapshot(out)
    base = [*ARGS, "--out", str(out), "--seed", "7", "--method-opt", "init_std=0.5", "--method", "relaxed",
            "--resume", "--epochs", "2"]
    assert main([*base, *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert flag in line and "was written with" in line
    assert snapshot(out) == before
