"""Issue 22, item 6: ``--eval-data PATH``, a test set of the user's own in any ``--data`` format, checked as
``--data`` is; with it ``--data`` is not split unless ``--test-size`` is given; part of the run header and of
the ``--resume`` check (by content)."""
import json
import os
import shutil

import pytest

from fastprompt import train
from fastprompt.data import content_hash
from fastprompt.train import main

ARGS = ["--model", "tiny", "--epochs", "1", "--batch-size", "4", "--lr", "1e-2", "--samples", "2", "--eval-size", "3",
        "--eval-every", "1", "--no-progress"]
TRAIN = [(f"w{i}", f"v{i}") for i in range(10)]
TEST = [("hot", "cold"), ("up", "down"), ("big", "small")]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def csv_of(pairs):
    return "word1,word2\n" + "".join(f"{a},{b}\n" for a, b in pairs)


def jsonl_of(pairs):
    return "".join(json.dumps({"input": a, "target": b}) + "\n" for a, b in pairs)


def one_error_line(err):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def lines_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_eval_data_is_the_test_set_and_data_is_not_split(tmp_path, capsys, kind):
    data = write(tmp_path / "train.csv", csv_of(TRAIN))
    held = write(tmp_path / f"test.{kind}", csv_of(TEST) if kind == "csv" else jsonl_of(TEST))
    out = tmp_path / "run"
    assert main([*ARGS, "--data", data, "--eval-data", held, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert f"10 train, 3 test examples (--eval-data {held})" in said  # all of --data trains
    lines = lines_of(out)
    header, final = lines[0], lines[-1]
    assert header["config"]["eval_data"] == held and header["config"]["test_size"] == 0.0
    assert len(header["eval_data_sha256"]) == 64 and header["eval_data_sha256"] != header["data_sha256"]
    epoch = [r for r in lines if "epoch" in r and "event" not in r][0]
    assert "test_loss" in epoch and "test_exact_match" in epoch
    assert final["event"] == "final" and final["eval_size"] == 3 and "test_loss" in final
    samples = (out / "samples.txt").read_text()
    assert samples.count("Actual:") == 2 and "hot and cold" in samples and "up and down" in samples


def test_test_size_given_with_eval_data_still_splits(tmp_path, capsys):
    data = write(tmp_path / "train.csv", csv_of(TRAIN))
    held = write(tmp_path / "test.csv", csv_of(TEST))
    out = tmp_path / "run"
    assert main([*ARGS, "--epochs", "0", "--data", data, "--eval-data", held, "--test-size", "0.3",
                 "--out", str(out)]) == 0
    assert "7 train, 3 test examples" in capsys.readouterr().out  # 3 of 10 held out of training, as asked
    assert lines_of(out)[0]["config"]["test_size"] == 0.3


def test_a_built_in_name_is_accepted(tmp_path, capsys, monkeypatch):
    """Loaded, encoded and recorded like a file (training and evaluating all 6,474 pairs is left out)."""
    monkeypatch.setattr(train, "train_and_write", lambda *args: {})
    out = tmp_path / "run"
    assert main([*ARGS, "--train-size", "4", "--eval-data", "antonyms", "--out", str(out)]) == 0
    assert "4 train, 6474 test examples (--eval-data antonyms)" in capsys.readouterr().out
    header = lines_of(out)[0]
    assert header["eval_data_sha256"] == header["data_sha256"] == content_hash("antonyms")


# The same files given to --data and to --eval-data must give the same one-line error: file and line.
BAD_FILES = {
    "missing": (None, "no such dataset file"),
    "bad_csv_row": ("word1,word2\nhot,cold\nup,down,left\n", "line 3: too many fields"),
    "blank_line": ("word1,word2\nhot,cold\n\nup,down\n", "line 3: blank line"),
    "bad_json": ('{"input": "hot", "target": "cold"}\n{"input": "up"\n', "line 2: invalid JSON"),
    "no_target": ('{"input": "hot", "target": "cold"}\n{"input": "up", "other": "x"}\n', "line 2:"),
    "directory": ("dir", "is a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_eval_data_is_checked_like_data_same_error_file_and_line(tmp_path, capsys, case):
    text, message = BAD_FILES[case]
    suffix = ".jsonl" if case in ("bad_json", "no_target") else ".csv"
    bad = tmp_path / f"bad{suffix}"
    if text == "dir":
        bad.mkdir()
    elif text is not None:
        bad.write_text(text, encoding="utf-8")
    good = write(tmp_path / "good.csv", csv_of(TRAIN))
    errors = []
    for args in (["--data", str(bad)], ["--data", good, "--eval-data", str(bad)]):
        out = tmp_path / "out"
        assert main([*ARGS, *args, "--test-size", "0.2", "--out", str(out)]) == 2
        errors.append(one_error_line(capsys.readouterr().err))
        assert not out.exists()
    assert errors[0] == errors[1] and message in errors[1] and str(bad) in errors[1]


def test_resume_checks_the_eval_data_by_content(tmp_path, capsys):
    data = write(tmp_path / "train.csv", csv_of(TRAIN))
    held = tmp_path / "test.csv"
    write(held, csv_of(TEST))
    out = tmp_path / "run"
    args = [*ARGS, "--data", data, "--out", str(out)]
    assert main([*args, "--eval-data", str(held)]) == 0
    moved = tmp_path / "sub" / "same.csv"
    moved.parent.mkdir()
    shutil.copy(held, moved)  # the same bytes by another path: accepted
    assert main([*args, "--eval-data", str(moved), "--resume", "--epochs", "2"]) == 0
    capsys.readouterr()
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    write(held, csv_of(TEST[:2] + [("wet", "dry")]))  # other contents: refused
    assert main([*args, "--eval-data", str(held), "--resume", "--epochs", "3"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--eval-data" in line and "contents differ" in line
    assert main([*args, "--resume", "--epochs", "3"]) == 2  # without it: refused too (and no split either way)
    assert "--eval-data" in one_error_line(capsys.readouterr().err)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
