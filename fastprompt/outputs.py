"""Every path a run writes, checked before the first write, and written without following a link (issue 23).

How a file is written: ``atomic_write(path, write)`` has ``write`` fill a new file made in the same directory
(``mkstemp``: a new name, ``O_EXCL``, so never an existing file or link), then renames it over ``path``. A
rename replaces whatever entry stands at ``path`` (a link included) and never opens it, so nothing outside
``--out`` is ever written through a link planted inside it. ``append_line`` (metrics.jsonl) is the same: the
old lines, read without following a link, and the new one, into a new file renamed over the old. A reader
sees the old file or the new one, whole.

What is checked first (``check_outputs`` for ``--out``, ``check_output_dir`` for ``--peft-out``), before any
training and before anything is written, one ``ConfigError`` line naming the path and what is wrong:

    at an output's name      a directory, a FIFO, socket or device: refused (never removed)
                             a symlink (dangling, looping, pointing anywhere), a read-only file: refused
                             unless --overwrite, which removes it (the rename replaces it)
    --peft-out               empty, a symlink, a file or special file, below a file, in a directory that cannot
                             be written, the --out directory itself, an output's name in --out, or a directory
                             holding --out
A write that fails anyway (a full disk) is an ``OutputError`` naming the path, not a traceback.
"""
from __future__ import annotations

import os
import stat
import tempfile

from .errors import ConfigError, OutputError

# Every file a run writes in --out: what is checked before the first write, and what --overwrite (and a
# restart from step 0) may remove. metrics.jsonl.tmp is no longer written (the temp file of a rename has a
# new name each time) but older versions left it: it stays on the list of names a run may remove.
TENSORS, SIDECAR, METRICS = "checkpoint.safetensors", "checkpoint.json", "metrics.jsonl"
OUTPUTS = (TENSORS, SIDECAR, METRICS, METRICS + ".tmp", "prompt.safetensors", "samples.txt", "nearest.txt",
           "loss.png", "hard_prompt.txt")


def kind(mode: int) -> str:
    """What a file system entry is, in words."""
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a file")):
        if test(mode):
            return name
    return "a special file"


# ------------------------------------------------------------------------------------------- checks
def check_outputs(out: str, names=OUTPUTS, *, overwrite: bool = False) -> None:
    """Every output name in the existing directory ``out`` is free, or a regular file the run may replace.
    With ``overwrite`` a symlink or a read-only file there is allowed: the run removes or renames over it."""
    for name in names:
        check_output_file(os.path.join(out, name), overwrite=overwrite)


def check_output_file(path: str, *, overwrite: bool = False) -> None:
    try:
        st = os.lstat(path)  # the entry itself: a link is not followed
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        if overwrite:
            return
        raise ConfigError(f"{path} is a symlink (to {_link_target(path)}) where fastprompt writes its output; it "
                          "never writes through a link: remove it, or pass --overwrite to replace it")
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{path} is a directory where fastprompt writes a file; move it away or choose another --out")
    if not stat.S_ISREG(mode):
        raise ConfigError(f"{path} is {kind(mode)} where fastprompt writes a file; move it away or choose "
                          "another --out")
    if not mode & stat.S_IWUSR and not overwrite:
        raise ConfigError(f"{path} is read-only; make it writable (chmod u+w), or pass --overwrite to replace it")


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def check_creatable(path: str, flag: str, probe: bool = False) -> None:
    """The nearest existing ancestor of a new ``path`` must be a directory we may create entries in
    (``probe``: proven by making and removing an empty directory there: a read-only mount or a special file
    system such as /proc refuses it, whatever the permission bits say)."""
    parent = os.path.dirname(os.path.abspath(path))
    while True:
        try:
            mode = os.stat(parent).st_mode
        except FileNotFoundError:
            if os.path.islink(parent):
                raise ConfigError(f"{flag} {path}: {parent} is a symlink to nothing") from None
            parent = os.path.dirname(parent)
            continue
        except NotADirectoryError:
            raise ConfigError(f"{flag} {path} lies below a file, not a directory") from None
        except OSError as e:
            raise ConfigError(f"{flag} {path}: {e.strerror}") from None
        except ValueError:  # an embedded NUL
            raise ConfigError(f"{flag} {path!r} is not a usable path") from None
        if not stat.S_ISDIR(mode):
            raise ConfigError(f"{flag} {path} lies below {parent}, {kind(mode)}, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {path}: no permission to create it in {parent}")
        if probe:
            _probe(parent, path, flag)
        return


def _probe(parent: str, path: str, flag: str) -> None:
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".fastprompt-probe-"))
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot create it in {parent} ({e.strerror})") from None


def check_output_dir(path: str | None, flag: str, out: str | None, allowed=()) -> None:
    """A directory the run replaces whole at its end (``--peft-out``): new, or an existing directory holding
    only ``allowed`` names, never a link, never ``--out`` or a directory holding it, never an output's name."""
    if path is None:
        return
    if not path:
        raise ConfigError(f"{flag} is empty: give a directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except NotADirectoryError:
        raise ConfigError(f"{flag} {path} lies below a file, not a directory") from None
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None
    except ValueError:
        raise ConfigError(f"{flag} {path!r} is not a usable path") from None
    if out:
        here, there = os.path.realpath(path), os.path.realpath(out)
        if here == there:
            raise ConfigError(f"{flag} {path} is the --out directory; give the adapter its own directory")
        if os.path.commonpath([here, there]) == here:
            raise ConfigError(f"{flag} {path} holds the --out directory {out}; it would be replaced whole")
        if os.path.dirname(here) == there and os.path.basename(here) in OUTPUTS:
            raise ConfigError(f"{flag} {path} is the name of an output in --out; choose another directory")
    if st is None:
        check_creatable(path, flag, probe=True)
        return
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(f"{flag} {path} is a symlink (to {_link_target(path)}); give the directory itself")
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{flag} {path} is {kind(st.st_mode)}, not a directory")
    try:
        other = sorted(set(os.listdir(path)) - set(allowed))
    except OSError as e:
        raise ConfigError(f"{flag} {path}: {e.strerror}") from None
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise ConfigError(f"{flag} {path} holds other files than a PEFT adapter ({shown}): choose a new or empty "
                          "directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.access(parent, os.W_OK | os.X_OK):  # the directory is renamed aside and replaced
        raise ConfigError(f"{flag} {path}: no permission to replace it in {parent}")
    _probe(parent, path, flag)


# ------------------------------------------------------------------------------------------- writes
def atomic_write(path: str, write) -> None:
    """``write(tmp_path)`` fills a new file beside ``path``, then it is renamed over ``path`` (a link there is
    replaced, never followed): a reader sees the old file or the new one, whole. ``OutputError`` where the
    file system refuses (no space, read-only)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600: the mode open() gives a new file
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def read_bytes(path: str) -> bytes:
    """A regular file's bytes, without following a link at ``path`` (b"" where there is none)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return b""
    except OSError as e:
        raise OutputError(f"cannot read {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OutputError(f"{path} is no longer a regular file")
        return f.read()


def append_line(path: str, line: str) -> None:
    """``path``'s lines and ``line`` into a new file renamed over ``path`` (metrics.jsonl: a few lines an
    epoch, so rewriting it costs nothing measurable)."""
    old = read_bytes(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(old + line.encode("utf-8"))

    atomic_write(path, write)


def umask() -> int:
    """The process's umask (read by setting it and back: Python offers no other portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def import_pyplot(name: str):
    """matplotlib's pyplot on the Agg backend, or None with a note that ``name`` is skipped (matplotlib is the
    optional ``plot`` extra)."""
    import logging

    quiet = logging.getLogger("matplotlib")  # an unwritable cache directory: matplotlib uses a temporary one
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, {name} skipped (pip install 'fastprompt[plot]')")
        return None
    finally:
        quiet.setLevel(level)
    return plt
