"""Issue 23, classes 3, 4, 5 and 8: every file a run reads back. Checkpoints and run headers against one
schema (keys, types, ranges; optimizer settings from the run's own options), model directories that would
load "successfully" but wrong, prompt files with empty tensors or out-of-range metadata, and JSONL lines
with keys the template does not use."""
import contextlib
import io
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fastprompt as fp
from fastprompt import checkpoint, schema
from fastprompt.interpret import main as interpret
from fastprompt.train import main

from helpers import one_error_line, tree

ARGS = ["--model", "tiny", "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]


def quiet_main(args):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(args)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("finished") / "run")
    assert quiet_main([*ARGS, "--out", out]) == 0
    return out


def rewrite_checkpoint(out, edit):
    """Apply ``edit(tensors, state)`` to the checkpoint and write it back with a matching checksum: only
    the schema and the checks after it are left to refuse it."""
    path = os.path.join(out, checkpoint.TENSORS)
    with safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["fastprompt_checkpoint"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, state)
    state["tensors"] = {name: list(t.shape) for name, t in tensors.items()}
    state["checksum"] = checkpoint.checksum(tensors, state)
    save_file(tensors, path, metadata={"fastprompt_checkpoint": json.dumps(state)})


def group(state):
    return state["optimizer"]["param_groups"][0]


# ------------------------------------------------------------------- 3. checkpoints: the schema
STATE_EDITS = {  # name: (edit of the JSON state, what the line says)
    "history not a list": (lambda s: s.update(history={"1": 2}), "history"),
    "history loss a string": (lambda s: s["history"][0].update(train_loss="low"), "history[0].train_loss"),
    "history seconds negative": (lambda s: s["history"][0].update(seconds=-3), "history[0].seconds"),
    "history with a foreign key": (lambda s: s["history"][0].update(note="x"), "history[0].note"),
    "stripped config": (lambda s: s["config"].pop("lr"), "no 'lr'"),
    "config stripped of the model": (lambda s: s["config"].pop("model"), "no 'model'"),
    "config lr a string": (lambda s: s["config"].update(lr="fast"), "config.lr"),
    "config batch size zero": (lambda s: s["config"].update(batch_size=0), "config.batch_size"),
    "config a list": (lambda s: s.update(config=[1]), "config must be"),
    "config with a foreign option": (lambda s: s["config"].update(amsgrad=True), "'amsgrad'"),
    "epoch a string": (lambda s: s.update(epoch="2"), "epoch"),
    "hidden size negative": (lambda s: s.update(hidden_size=-64), "hidden_size"),
    "an unknown method": (lambda s: s["method"].update(name="magic"), "method.name"),
    "a huge method step": (lambda s: s["method"].update(step=10**30), "method.step"),
    "a foreign top-level key": (lambda s: s.update(extra=1), "'extra'"),
    "Adam state beyond Adam's": (lambda s: s["optimizer"]["state"]["0"].update(max_exp_avg_sq={"tensor": "x"}),
                                 "max_exp_avg_sq"),
}


@pytest.mark.parametrize("case", sorted(STATE_EDITS))
def test_checkpoint_state_outside_the_schema_is_refused_before_anything(tmp_path, capsys, finished, case):
    edit, message = STATE_EDITS[case]
    out = shutil.copytree(finished, str(tmp_path / "out"))
    rewrite_checkpoint(out, lambda t, s: edit(s))
    before = tree(out)
    assert main([*ARGS, "--out", out, "--resume", "--epochs", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "cannot be resumed" in line, line
    assert tree(out) == before


OPTIMIZER_EDITS = {  # settings the run never uses, of the wrong type, or absurd: never taken from the file
    "amsgrad": (lambda g: g.update(amsgrad=True), "'amsgrad'"),
    "maximize": (lambda g: g.update(maximize=True), "'maximize'"),
    "foreach": (lambda g: g.update(foreach=True), "'foreach'"),
    "differentiable": (lambda g: g.update(differentiable=True), "'differentiable'"),
    "capturable not a bool": (lambda g: g.update(capturable="yes"), "'capturable'"),
    "weight decay a string": (lambda g: g.update(weight_decay="0.1"), "'weight_decay'"),
    "lr 1e30": (lambda g: g.update(lr=1e30), "'lr'"),
    "eps missing": (lambda g: g.pop("eps"), "eps"),
    "a setting Adam has not": (lambda g: g.update(nesterov=True), "'nesterov'"),
}


SLOW_OPTIMIZER_EDITS = {"weight decay set": (lambda g: g.update(weight_decay=0.1), "'weight_decay'"),
                        "betas changed": (lambda g: g.update(betas=[0.5, 0.9]), "'betas'")}
OPTIMIZER_CASES = sorted(OPTIMIZER_EDITS) + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW_OPTIMIZER_EDITS]
OPTIMIZER_EDITS.update(SLOW_OPTIMIZER_EDITS)


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_optimizer_settings_come_from_the_run_and_the_files_must_match(tmp_path, capsys, finished, case):
    edit, message = OPTIMIZER_EDITS[case]
    out = shutil.copytree(finished, str(tmp_path / "out"))
    rewrite_checkpoint(out, lambda t, s: edit(group(s)))
    before = tree(out)
    assert main([*ARGS, "--out", out, "--resume", "--epochs", "2"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line and "optimizer" in line, line
    assert tree(out) == before


def test_a_gpu_checkpoint_capturable_adam_resumes_with_this_runs_own_settings(tmp_path, finished):
    out = shutil.copytree(finished, str(tmp_path / "out"))
    rewrite_checkpoint(out, lambda t, s: group(s).update(capturable=True))  # as written by a CUDA-graph run
    assert quiet_main([*ARGS, "--out", out, "--resume", "--epochs", "2"]) == 0
    _, state = checkpoint.load_checkpoint(out)
    assert group(state)["capturable"] is False and state["epoch"] == 2


def test_the_schema_takes_a_table_of_options():
    table = {"lr": schema.Field(("float",), low=0, low_open=True), "layers": schema.Field(("int",), low=1, high=4),
             "name": schema.Field(("str", "none"), required=False)}
    assert schema.check_record({"lr": 1e-3, "layers": 2}, table, "config") is None
    assert "config.lr must be a number > 0" in schema.check_record({"lr": 0, "layers": 2}, table, "config")
    assert "config.layers" in schema.check_record({"lr": 1, "layers": True}, table, "config")  # a bool is no int
    assert "config.layers" in schema.check_record({"lr": 1, "layers": 5}, table, "config")
    assert "finite" in schema.check_record({"lr": float("inf"), "layers": 1}, table, "config")
    assert "no 'layers'" in schema.check_record({"lr": 1}, table, "config")
    assert "never writes" in schema.check_record({"lr": 1, "layers": 1, "x": 0}, table, "config")
    assert "config.count" in schema.check_record({"count": 2**70}, {"count": schema.COUNT}, "config")  # unbounded
    fields = schema.config_fields(required=checkpoint.MUST_MATCH)  # derived from the options declaration
    assert schema.check(2**64 - 1, fields["seed"], "seed") is None  # every seed --seed takes
    assert "seed" in schema.check(2**64, fields["seed"], "seed")
    assert fields["prompt_len"].types == ("int",) and fields["train_size"].types == ("int", "none")
    assert set(checkpoint.MUST_MATCH) <= {k for k, f in fields.items() if f.required}


# ------------------------------------------------------------------- 3. run headers (no checkpoint yet)
@pytest.fixture(scope="module")
def header_line(finished):
    with open(os.path.join(finished, "metrics.jsonl")) as f:
        return json.loads(f.readline())


def _edit(record, **changes):
    record = json.loads(json.dumps(record))
    for path, value in changes.items():
        target = record
        *parents, key = path.split("__")
        for p in parents:
            target = target[p]
        if value is KeyError:
            target.pop(key)
        else:
            target[key] = value
    return record


HEADERS = {  # name: (metrics.jsonl lines from the good header, what the line says)
    "a JSON string": (lambda h: ['"start"'], "line 1: a JSON str"),
    "a JSON list": (lambda h: [json.dumps([h])], "line 1: a JSON list"),
    "a number": (lambda h: ["3"], "line 1: a JSON int"),
    "not JSON": (lambda h: ["{start"], "line 1: not a JSON line"),
    "a resume line first": (lambda h: [json.dumps(_edit(h, event="resume"))], "line 1: not a run header"),
    "config a string": (lambda h: [json.dumps(_edit(h, config="tiny"))], "config must be a JSON object"),
    "config lr a string": (lambda h: [json.dumps(_edit(h, config__lr="0.01"))], "config.lr"),
    "config without seed": (lambda h: [json.dumps(_edit(h, config__seed=KeyError))], "no 'seed'"),
    "config prompt_len absurd": (lambda h: [json.dumps(_edit(h, config__prompt_len=10**9))], "config.prompt_len"),
    "world size zero": (lambda h: [json.dumps(_edit(h, world_size=0))], "world_size"),
    "versions a list": (lambda h: [json.dumps(_edit(h, versions=["2.0"]))], "versions"),
    "a foreign field": (lambda h: [json.dumps(_edit(h, amsgrad=True))], "'amsgrad'"),
    "a list as the second line": (lambda h: [json.dumps(h), "[1, 2]", json.dumps(h)], "line 2: a JSON list"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_run_headers_outside_the_schema_are_one_line(tmp_path, capsys, header_line, case):
    lines, message = HEADERS[case]
    out = tmp_path / "run"  # a run killed before its first checkpoint: metrics.jsonl alone
    out.mkdir()
    (out / "metrics.jsonl").write_text("\n".join(lines(header_line)) + "\n")
    before = tree(str(out))
    assert main([*ARGS, "--out", str(out), "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "metrics.jsonl" in line and message in line, line
    assert tree(str(out)) == before


def test_a_good_header_with_a_line_cut_off_by_a_kill_still_restarts(tmp_path, capsys, header_line):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps(header_line) + "\n" + '{"epoch": 1, "tra')
    assert quiet_main([*ARGS, "--epochs", "1", "--out", str(out), "--resume"]) == 0


@pytest.mark.parametrize("left", ["prompt and final line", "final line only", "prompt only"])
def test_resume_refuses_a_finished_run_without_a_checkpoint(tmp_path, capsys, finished, left):
    out = shutil.copytree(finished, str(tmp_path / "out"))
    for name in (checkpoint.TENSORS, checkpoint.SIDECAR, "samples.txt", "nearest.txt", "loss.png"):
        os.remove(os.path.join(out, name))
    if left == "final line only":
        os.remove(os.path.join(out, "prompt.safetensors"))
    if left == "prompt only":  # the header alone in metrics.jsonl
        with open(os.path.join(out, "metrics.jsonl")) as f:
            first = f.readline()
        with open(os.path.join(out, "metrics.jsonl"), "w") as f:
            f.write(first)
    before = tree(out)
    assert main([*ARGS, "--out", out, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "nothing to resume" in line and checkpoint.TENSORS in line, line
    assert tree(out) == before


def test_resume_refuses_an_epochs_0_run(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert quiet_main([*ARGS, "--epochs", "0", "--out", out]) == 0  # it never writes a checkpoint
    before = tree(out)
    assert main([*ARGS, "--epochs", "0", "--out", out, "--resume"]) == 2
    assert "prompt.safetensors" in one_error_line(capsys.readouterr().err) and tree(out) == before


# ------------------------------------------------------------------- 4. model directories
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("model") / "tiny")
    model, tok = fp.load_model("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _weights(path, edit):
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _config(path, **changes):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def _llama_config(path):
    import transformers

    transformers.LlamaConfig(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4).save_pretrained(path)


MODEL_DIRS = {  # name: (damage, what the line says)
    "a layer's tensors missing": (lambda p: _weights(p, lambda t: [t.pop(k) for k in list(t) if ".h.1." in k]),
                                  "12 weight tensors the model has but its files lack"),
    "one tensor missing": (lambda p: _weights(p, lambda t: t.pop("transformer.ln_f.weight")),
                           "1 weight tensors the model has but its files lack (they would be random): transformer.ln_f.weight"),
    "an extra tensor": (lambda p: _weights(p, lambda t: t.update({"transformer.extra": torch.zeros(3)})),
                        "1 weight tensors its files hold but the model has no place for"),
    "another shape": (lambda p: _weights(p, lambda t: t.update({"transformer.wpe.weight": torch.zeros(64, 64)})),
                      "have another shape"),
    "config of another architecture": (_llama_config, "weight tensors the model has but its files lack"),
    "negative layers": (lambda p: _config(p, n_layer=-1), "num_hidden_layers = -1"),
    "zero width": (lambda p: _config(p, n_embd=0), "hidden_size = 0"),
    "heads that do not divide": (lambda p: _config(p, n_head=3), "not a multiple of its 3 attention heads"),
    "absurd vocabulary": (lambda p: _config(p, vocab_size=10**12), "vocab_size"),
    "positions a string": (lambda p: _config(p, n_positions="many"), "n_positions"),
    "a FIFO for config.json": (lambda p: (os.remove(os.path.join(p, "config.json")),
                                          os.mkfifo(os.path.join(p, "config.json"))), "a FIFO"),
}


@pytest.mark.parametrize("case", sorted(MODEL_DIRS))
def test_model_directories_that_would_load_wrong_are_one_line(tmp_path, capsys, model_dir, case):
    damage, message = MODEL_DIRS[case]
    path = shutil.copytree(model_dir, str(tmp_path / "model"))
    damage(path)
    out = tmp_path / "out"
    assert main([*ARGS, "--model", path, "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line, line
    assert not out.exists()


def test_a_pickled_model_file_is_refused_in_one_line_and_never_run(tmp_path, capsys, model_dir):
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    path = str(tmp_path / "model")
    os.mkdir(path)
    shutil.copy(os.path.join(model_dir, "config.json"), path)
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump({"transformer.wte.weight": Payload()}, f)
    assert main([*ARGS, "--model", path, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert path in line and not (tmp_path / "pwned").exists()


def test_an_intact_model_directory_still_loads(model_dir):
    model, _ = fp.load_model(model_dir)
    reference, _ = fp.load_model("tiny")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# ------------------------------------------------------------------- 5. prompt files
def prompt_file(tmp_path, tensors, **meta):
    from fastprompt.promptfile import save_prompt_file

    path = str(tmp_path / "p.safetensors")
    save_prompt_file(path, tensors, {"model": "tiny", **meta})
    return path


@pytest.fixture(scope="module")
def tiny():
    return fp.load_model("tiny", seed=1337)


@pytest.fixture(scope="module")
def relaxed_base(tmp_path_factory, tiny):
    model, tok = tiny
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", method="relaxed", init="text:antonyms")
    path = str(tmp_path_factory.mktemp("relaxed") / "relaxed.safetensors")
    tuner.save(path)
    return path


def relaxed_file(tmp_path, base, drop_logits=False, **meta):
    """A copy of the relaxed prompt file ``base``, its logits dropped or its metadata edited."""
    path = str(tmp_path / "relaxed.safetensors")
    shutil.copy(base, path)
    with safe_open(path, framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if drop_logits:
        tensors.pop("logits")
    metadata.update(meta)
    save_file(tensors, path, metadata=metadata)
    return path


PROMPT_FILES = {  # name: (make the file, what the line says)
    "zero rows": (lambda t, b: prompt_file(t, {"prompt": torch.zeros(0, 64)}), "holds no vectors"),
    "zero width": (lambda t, b: prompt_file(t, {"prompt": torch.zeros(4, 0)}), "holds no vectors"),
    "a huge relaxed step": (lambda t, b: relaxed_file(t, b, method_step="1" + "0" * 400), "method_step"),
    "a huge total": (lambda t, b: relaxed_file(t, b, method_total_steps=str(2**60)), "method_step"),
    "a tiny temperature": (lambda t, b: relaxed_file(t, b, method_options='{"tau_start": 1e-300, "tau_end": 0.1}'),
                           "tau_start"),
    "prompt_len not a number": (lambda t, b: relaxed_file(t, b, prompt_len='"four"'), "prompt_len"),
    "hidden size negative": (lambda t, b: relaxed_file(t, b, hidden_size="-64"), "hidden_size"),
    "relaxed without its logits": (lambda t, b: relaxed_file(t, b, drop_logits=True), "'logits' tensor"),
    "method not a string": (lambda t, b: relaxed_file(t, b, method="[1]"), "unknown method"),
}


@pytest.mark.parametrize("case", sorted(PROMPT_FILES))
@pytest.mark.parametrize("reader", ["interpret", "--init file:", "PromptTuner.load"])
def test_prompt_files_out_of_range_are_one_line_for_every_reader(tmp_path, capsys, relaxed_base, tiny, case,
                                                                 reader):
    make, message = PROMPT_FILES[case]
    path = make(tmp_path, relaxed_base)
    if reader == "PromptTuner.load":
        model, tok = tiny
        with pytest.raises(fp.FastpromptError, match=message.replace("'", ".")):
            fp.PromptTuner.load(path, model, tok, engine="naive")
        return
    if reader == "interpret":
        code = interpret([path, "--model", "tiny", "--k", "2"])
    else:
        code = main([*ARGS, "--init", f"file:{path}", "--out", str(tmp_path / "out")])
    assert code == 2 and message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_init_from_a_whole_relaxed_file_starts_from_its_mixture(tmp_path, relaxed_base, tiny):
    """The documented meaning: --init file: takes the file's 'prompt' vectors, whatever method wrote it."""
    path = relaxed_file(tmp_path, relaxed_base)
    model, tok = tiny
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", init=f"file:{path}")
    assert torch.equal(tuner.prompt.detach(), load_file(path)["prompt"])


# ------------------------------------------------------------------- 8. JSONL with extra fields
EXTRAS = {"an id": 17, "a float": 0.5, "null": None, "a bool": True, "a list": [1, "x"],
          "an object": {"source": "wordnet", "n": 3}, "an empty string": "", "a surrogate": "\ud800"}


def jsonl(tmp_path, rows):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("extra", sorted(EXTRAS))
def test_jsonl_keys_the_template_does_not_use_are_kept_and_ignored(tmp_path, tiny, extra):
    rows = [{"input": f"w{i}", "target": f"v{i}", "meta": EXTRAS[extra], "id": i} for i in range(6)]
    examples = fp.load_pairs(jsonl(tmp_path, rows))
    assert [e["meta"] for e in examples] == [EXTRAS[extra]] * 6
    model, tok = tiny
    tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="naive")
    assert len(tuner.encode(examples)) == 6


def test_a_jsonl_with_extra_fields_trains_through_the_cli(tmp_path):
    rows = [{"id": i, "input": f"w{i}", "target": f"v{i}", "score": i / 3, "tags": ["a"]} for i in range(10)]
    out = str(tmp_path / "out")
    assert quiet_main([*ARGS, "--epochs", "1", "--data", jsonl(tmp_path, rows), "--out", out]) == 0
    assert os.path.isfile(os.path.join(out, "prompt.safetensors"))


@pytest.mark.parametrize("value, message", [(17, "must be a string, got int"), (None, "must be a string"),
                                            (["hot"], "must be a string, got list"), ("  ", "is empty"),
                                            ("\ud800", "unpaired surrogate")])
def test_only_the_templates_fields_must_be_strings(tmp_path, capsys, value, message):
    rows = [{"input": f"w{i}", "target": f"v{i}", "id": i} for i in range(6)]
    rows[3]["target"] = value
    path = jsonl(tmp_path, rows)
    assert main([*ARGS, "--data", path, "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{path}, line 4" in line and "'target'" in line and message in line, line
