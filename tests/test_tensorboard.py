"""Issue 22, item 8: ``--report-to tensorboard`` writes metrics.jsonl's scalars and the samples table into
``--out/tensorboard/``, read back here with TensorBoard's own reader; off by default; a one-line error without
the extra; a resumed run continues the curves."""
import json
import os
import shutil
import sys

import pytest

from fastprompt import reporters
from fastprompt.train import main

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

# 9 examples of the train split, batch 4: 3 steps an epoch; a small test split with generation metrics
ARGS = ["--model", "tiny", "--epochs", "2", "--train-size", "9", "--batch-size", "4", "--test-size", "0.002",
        "--eval-size", "3", "--eval-every", "1", "--samples", "2", "--lr", "1e-2", "--no-progress"]


def events(out):
    acc = EventAccumulator(str(out / reporters.SUBDIR), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar_series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def records_of(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "epoch" in r and "event" not in r], [r for r in lines if r.get("event") == "final"]


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tb") / "run"
    assert main([*ARGS, "--out", str(out), "--report-to", "tensorboard"]) == 0
    return out


def test_the_scalars_are_metrics_jsonl_s(tb_run):
    acc = events(tb_run)
    epochs, (final,) = records_of(tb_run)
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "test/loss", "test/exact_match", "test/parrot_rate", "train/target_tokens_per_second",
                "epoch/lr", "final/test_loss", "final/test_exact_match", "final/test_parrot_rate"):
        assert tag in tags, tag
    for key, tag in (("train_loss", "train/loss"), ("test_loss", "test/loss"), ("test_exact_match", "test/exact_match"),
                     ("test_parrot_rate", "test/parrot_rate"), ("lr", "epoch/lr"),
                     ("train_target_tokens_per_second", "train/target_tokens_per_second")):
        expected = [(r["step"], r[key]) for r in epochs]
        got = scalar_series(acc, tag)
        assert [s for s, _ in got] == [s for s, _ in expected] == [3, 6], tag
        assert all(abs(v - e) <= 1e-6 * max(1.0, abs(e)) for (_, v), (_, e) in zip(got, expected)), tag
    assert epochs[0]["lr"] == 1e-2 and epochs[0]["train_target_tokens_per_second"] > 0
    assert scalar_series(acc, "final/test_loss")[0][0] == 6
    assert abs(scalar_series(acc, "final/test_loss")[0][1] - final["test_loss"]) <= 1e-6 * final["test_loss"]


def test_the_samples_are_a_text_table(tb_run):
    acc = events(tb_run)
    (text,) = acc.Tensors("samples/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    samples = (tb_run / "samples.txt").read_text().split("\n\n")
    pairs = [block.splitlines() for block in samples if block.strip()]
    assert table.startswith("| Actual | Predicted |") and len(table.splitlines()) == 2 + len(pairs) == 4
    for actual, predicted in pairs:
        assert f"| {actual[len('Actual: '):]} | {predicted[len('Predicted: '):]} |" in table


def test_off_by_default_and_overwrite_removes_the_old_events(tb_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tb_run, out)
    (out / reporters.SUBDIR / "mine.txt").write_text("not ours")
    assert main([*ARGS, "--epochs", "0", "--out", str(out), "--overwrite"]) == 0
    assert os.listdir(out / reporters.SUBDIR) == ["mine.txt"]  # its events gone, nothing new, other files kept
    fresh = tmp_path / "fresh"
    assert main([*ARGS, "--epochs", "0", "--out", str(fresh)]) == 0
    assert not (fresh / reporters.SUBDIR).exists()


def test_without_the_extra_it_is_one_line_exit_2_naming_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    out = tmp_path / "run"
    assert main([*ARGS, "--out", str(out), "--report-to", "tensorboard"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--report-to tensorboard" in line and "pip install 'fastprompt[tensorboard]'" in line
    assert not out.exists()


def test_resume_appends_and_hides_what_came_after_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*ARGS, "--epochs", "3", "--out", str(out), "--report-to", "tensorboard", "--max-steps", "4"]) == 0
    # the interrupted run's events after its checkpoint (step 4), as a kill after a later step leaves them: in
    # a file named to sort right after the first run's (TensorBoard reads a directory's files in name order)
    from torch.utils.tensorboard import SummaryWriter

    folder = out / reporters.SUBDIR
    (first,) = os.listdir(folder)
    stale = SummaryWriter(str(tmp_path / "stale"))
    stale.add_scalar("train/loss", 123.0, 6)
    stale.close()
    (written,) = os.listdir(tmp_path / "stale")
    os.replace(tmp_path / "stale" / written, folder / (first + ".stale"))
    assert main([*ARGS, "--epochs", "3", "--out", str(out), "--report-to", "tensorboard", "--resume"]) == 0
    epochs, finals = records_of(out)
    assert [r["step"] for r in epochs] == [3, 6, 9]
    loss = scalar_series(events(out), "train/loss")
    assert [s for s, _ in loss] == [3, 6, 9] and 123.0 not in [v for _, v in loss]
    assert all(abs(v - r["train_loss"]) <= 1e-6 * r["train_loss"] for (_, v), r in zip(loss, epochs))
    assert len([n for n in os.listdir(out / reporters.SUBDIR) if n.startswith(reporters.EVENTS_PREFIX)]) >= 3
