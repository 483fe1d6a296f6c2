"""Issue 23, classes 1 and 2: every path a run writes. Outputs are new files renamed over their names, never
written through a link; every output path is checked before the first write (and before training): a
link, directory, special or read-only file at an output's name is exit 2 with one line naming it, and
neither --out nor anything outside it changes. Then the property: every output name x every hostile kind."""
import contextlib
import io
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from fastprompt import outputs
from fastprompt.errors import OutputError
from fastprompt.train import main

from helpers import one_error_line, tree

# 8 examples, batch 4: 2 steps an epoch, 1 epoch, no test split
ARGS = ["--model", "tiny", "--epochs", "1", "--train-size", "8", "--batch-size", "4", "--test-size", "0",
        "--samples", "1", "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run (hard method: it writes every output name, hard_prompt.txt included)."""
    out = str(tmp_path_factory.mktemp("finished") / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ARGS, "--method", "hard", "--out", out]) == 0
    assert {n for n in outputs.OUTPUTS if n != "metrics.jsonl.tmp"} <= set(os.listdir(out))
    return out


@pytest.fixture
def outside(tmp_path):
    """A directory outside --out, with a file in it that must never change."""
    where = tmp_path / "outside"
    where.mkdir()
    (where / "victim.txt").write_text("precious\n")
    return str(where)


def plant(path, hostile, outside):
    """Put a hostile entry at ``path`` (whatever was there is removed first)."""
    if os.path.lexists(path):
        os.remove(path)
    victim = os.path.join(outside, "victim.txt")
    if hostile == "directory":
        os.mkdir(path)
        with open(os.path.join(path, "inside.txt"), "w") as f:
            f.write("x")
    elif hostile == "symlink to a file outside":
        os.symlink(victim, path)
    elif hostile == "dangling symlink":
        os.symlink(os.path.join(outside, "created-through-a-link.txt"), path)
    elif hostile == "symlink loop":
        os.symlink(os.path.basename(path), path)
    elif hostile == "symlink to a directory outside":
        os.symlink(outside, path)
    elif hostile == "read-only file":
        with open(path, "w") as f:
            f.write("keep me")
        os.chmod(path, 0o444)
    elif hostile == "FIFO":
        os.mkfifo(path)
    elif hostile == "socket":
        os.mknod(path, 0o600 | stat.S_IFSOCK)
    elif hostile == "hard link to a file outside":
        os.link(victim, path)
    else:
        raise ValueError(hostile)


REFUSED = {  # hostile kind: what the one error line says
    "directory": "is a directory",
    "symlink to a file outside": "is a symlink",
    "dangling symlink": "is a symlink",
    "symlink loop": "is a symlink",
    "symlink to a directory outside": "is a symlink",
    "read-only file": "is read-only",
    "FIFO": "is a FIFO",
    "socket": "is a socket",
}


# ------------------------------------------------------------------------------- the property
@pytest.mark.parametrize("hostile", sorted(REFUSED))
@pytest.mark.parametrize("name", outputs.OUTPUTS)
def test_property_every_output_name_and_hostile_kind(tmp_path, capsys, finished, outside, name, hostile):
    """--resume of a finished run rewrites every output: each name, replaced by each hostile kind, is refused
    with exit 2 and one line naming it, before anything in or outside --out changes."""
    out = shutil.copytree(finished, str(tmp_path / "out"))
    plant(os.path.join(out, name), hostile, outside)
    before, outside_before = tree(out), tree(outside)
    assert main([*ARGS, "--method", "hard", "--out", out, "--resume"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert os.path.join(out, name) in line and REFUSED[hostile] in line, line
    assert tree(out) == before and tree(outside) == outside_before


def test_a_plain_rerun_refuses_before_looking_at_any_output(tmp_path, capsys, finished, outside):
    out = shutil.copytree(finished, str(tmp_path / "out"))
    plant(os.path.join(out, "samples.txt"), "symlink to a file outside", outside)
    before = tree(out)
    assert main([*ARGS, "--out", out]) == 2
    assert "is not empty" in one_error_line(capsys.readouterr().err) and tree(out) == before


# ------------------------------------------------------------------------ rename, never through
def test_resume_over_hard_links_replaces_them_and_leaves_the_file_outside(tmp_path, capsys, finished, outside):
    """A hard link is a regular file (accepted): the rename puts a new file at the name; the file it shared
    its contents with, outside --out, keeps them."""
    out = shutil.copytree(finished, str(tmp_path / "out"))
    names = ["samples.txt", "nearest.txt", "loss.png", "hard_prompt.txt", "prompt.safetensors"]
    for name in names:
        plant(os.path.join(out, name), "hard link to a file outside", outside)
    outside_before = tree(outside)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ARGS, "--method", "hard", "--out", out, "--resume"]) == 0
    assert tree(outside) == outside_before
    for name in names:
        st = os.lstat(os.path.join(out, name))
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, name
    assert torch.equal(load_file(os.path.join(out, "prompt.safetensors"))["prompt"],
                       load_file(os.path.join(finished, "prompt.safetensors"))["prompt"])


def test_overwrite_replaces_links_and_read_only_files_without_following_them(tmp_path, capsys, finished, outside):
    """--overwrite removes what it finds at an output's name (a link: the link itself) or renames over it."""
    out = shutil.copytree(finished, str(tmp_path / "out"))
    kinds = ["symlink to a file outside", "dangling symlink", "symlink loop", "symlink to a directory outside",
             "read-only file", "hard link to a file outside"]
    for i, name in enumerate(outputs.OUTPUTS):
        plant(os.path.join(out, name), kinds[i % len(kinds)], outside)
    outside_before = tree(outside)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([*ARGS, "--epochs", "1", "--method", "hard", "--out", out, "--overwrite"]) == 0
    assert tree(outside) == outside_before  # nothing written, created or removed through a link
    for name in outputs.OUTPUTS:
        path = os.path.join(out, name)
        if name == "metrics.jsonl.tmp":
            assert not os.path.lexists(path)  # an old temp name: removed, never written
        else:
            assert stat.S_ISREG(os.lstat(path).st_mode), name


@pytest.mark.parametrize("hostile", ["directory", "FIFO", "socket"])
def test_overwrite_never_removes_a_directory_or_special_file(tmp_path, capsys, finished, outside, hostile):
    out = shutil.copytree(finished, str(tmp_path / "out"))
    plant(os.path.join(out, "loss.png"), hostile, outside)
    before = tree(out)
    assert main([*ARGS, "--out", out, "--overwrite"]) == 2
    assert REFUSED[hostile] in one_error_line(capsys.readouterr().err) and tree(out) == before


def test_a_write_the_file_system_refuses_is_one_line_and_leaves_no_temp(tmp_path, monkeypatch):
    path = str(tmp_path / "nearest.txt")
    outputs.write_text(path, "old\n")

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=r"cannot write .*nearest.txt: No space left on device"):
        outputs.write_text(path, "new\n")
    assert os.listdir(tmp_path) == ["nearest.txt"] and open(path).read() == "old\n"


def test_append_line_renames_a_new_file_over_the_old(tmp_path, outside):
    path = str(tmp_path / "metrics.jsonl")
    outputs.write_text(path, "a\n")
    os.link(path, os.path.join(outside, "shared.jsonl"))  # the old inode, seen from outside
    outputs.append_line(path, "b\n")
    assert open(path).read() == "a\nb\n" and open(os.path.join(outside, "shared.jsonl")).read() == "a\n"
    os.remove(path)
    os.symlink(os.path.join(outside, "victim.txt"), path)
    with pytest.raises(OutputError):  # a link planted after the checks: never read through either
        outputs.append_line(path, "c\n")
    assert open(os.path.join(outside, "victim.txt")).read() == "precious\n"


# ------------------------------------------------------------------------------------ --peft-out
def peft_cases(tmp_path, outside):
    """case: (--peft-out, --out, what the line says)"""
    (tmp_path / "afile").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    os.symlink(outside, tmp_path / "link")
    os.symlink(str(tmp_path / "nowhere"), tmp_path / "dangling")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    out = str(tmp_path / "out")
    return {
        "empty": ("", out, "--peft-out is empty"),
        "the new --out itself": (out, out, "is the --out directory"),
        "the new --out, spelled otherwise": (str(tmp_path / "." / "out") + "/", out, "is the --out directory"),
        "a directory holding --out": (str(tmp_path / "parent"), str(tmp_path / "parent" / "out"),
                                      "holds the --out directory"),
        "an output's name in --out": (os.path.join(out, "loss.png"), out, "name of an output"),
        "a symlink to a directory": (str(tmp_path / "link"), out, "is a symlink"),
        "a dangling symlink": (str(tmp_path / "dangling"), out, "is a symlink"),
        "a file": (str(tmp_path / "afile"), out, "is a file, not a directory"),
        "a FIFO": (str(tmp_path / "fifo"), out, "is a FIFO, not a directory"),
        "below a file": (str(tmp_path / "afile" / "adapter"), out, "below"),
        "a special file system": ("/proc/fastprompt-adapter", out, "cannot create it"),
        "a directory of other files": (str(tmp_path / "busy"), out, "holds other files"),
    }




@pytest.mark.parametrize("case", ["empty", "the new --out itself", "the new --out, spelled otherwise",
                                  "a directory holding --out", "an output's name in --out",
                                  "a symlink to a directory", "a dangling symlink", "a file", "a FIFO",
                                  "below a file", "a special file system", "a directory of other files"])
def test_peft_out_paths_are_checked_before_anything_is_loaded_or_written(tmp_path, capsys, outside, case):
    peft_out, out, message = peft_cases(tmp_path, outside)[case]
    before, outside_before = tree(str(tmp_path)), tree(outside)
    assert main([*ARGS, "--out", out, "--peft-out", peft_out]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--peft-out" in line and message in line, line
    assert tree(str(tmp_path)) == before and tree(outside) == outside_before
