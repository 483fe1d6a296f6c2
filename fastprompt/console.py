"""The process's stdout and stderr, made safe for a run whatever they are connected to (issue 23).

``safe_streams()`` (around the CLIs' ``main``) replaces the process's own ``sys.stdout`` / ``sys.stderr``
(not a stream a caller put there, e.g. pytest's capture) with writers that never raise:

* characters the stream's encoding cannot hold (``PYTHONIOENCODING=ascii``, a C locale, a non-ASCII
  ``--out``) are written as backslash escapes (``\\xe9``: ``backslashreplace``), not a ``UnicodeEncodeError``;
* a stream that cannot be written (stdout on a full device, a closed pipe) is dropped: the run goes on, and
  one ``warning:`` line on stderr says so. Writes go straight to the file descriptor, so nothing is left in
  Python's buffer to fail again at exit.
"""
from __future__ import annotations

import contextlib
import os
import sys


class SafeStream:
    def __init__(self, stream, name: str):
        self.stream, self.name = stream, name
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.fd = stream.fileno()
        self.broken: OSError | None = None

    def write(self, text: str) -> int:
        if self.broken is None and text:
            data = text.encode(self.encoding, "backslashreplace")
            try:
                while data:
                    data = data[os.write(self.fd, data):]
            except OSError as e:
                self.broken = e
                if self.name == "stdout":
                    sys.stderr.write(f"warning: cannot write to stdout ({e.strerror}); the run goes on without its "
                                     "messages\n")
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        try:
            return os.isatty(self.fd)
        except OSError:
            return False

    def fileno(self) -> int:
        return self.fd

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def safe_streams():
    replaced = []
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None or stream is not getattr(sys, f"__{name}__"):
            continue  # a caller's stream (a test's capture): theirs to handle
        try:
            stream.flush()
            safe = SafeStream(stream, name)
        except (OSError, ValueError, AttributeError):
            continue
        setattr(sys, name, safe)
        replaced.append((name, stream))
    try:
        yield
    finally:
        for name, stream in replaced:
            setattr(sys, name, stream)
