"""Guards around training steps: non-finite losses and gradients, and stop signals (SIGINT/SIGTERM).

``NonFiniteGuard``: a step whose loss or prompt gradient holds NaN/inf is not applied; ``limit`` such steps
in a row raise ``NonFiniteError`` naming the epoch and the step. The check reads one boolean back from the
device per step (one host sync).

``StopSignals``: while active, SIGINT and SIGTERM only set a flag; the training loop finishes the step in
flight, writes a checkpoint and raises ``Interrupted`` (the CLI exits 130 / 143). A second SIGINT or SIGTERM
only hurries: in a step it abandons the step (``Abandoned``; the last checkpoint on disk stands, writes are
atomic), while a checkpoint is written it waits for it, after that it is ignored; the first signal's message
and exit code stand, never a traceback. ``FinalSignals``: during the outputs written after training a signal
stops them at once (``OutputsInterrupted``) and the CLI says which were not written.
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch

from .errors import NonFiniteError


class NonFiniteGuard:
    def __init__(self, limit: int = 3):
        self.limit = limit
        self.streak = 0  # non-finite steps in a row, the last one included
        self.skipped = 0  # non-finite steps in the whole run

    def check(self, loss: torch.Tensor, grad: torch.Tensor) -> bool:
        """True when ``loss`` and ``grad`` are finite (apply the step); counts the streak otherwise."""
        finite = bool((torch.isfinite(loss).all() & torch.isfinite(grad).all()).item())
        self.streak = 0 if finite else self.streak + 1
        self.skipped += not finite
        return finite

    def raise_if_stuck(self, epoch: int, step: int) -> None:
        """``epoch`` and ``step`` count from 1, as the logs do."""
        if self.streak >= self.limit:
            raise NonFiniteError(
                f"NaN/inf loss or gradient in {self.streak} steps in a row, the last at epoch {epoch}, step {step}; "
                "those steps were not applied and training stopped (lower --lr, use --precision fp32, or check "
                "the data and the initial prompt)")


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint (``signum``: the signal's number)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: SIGINT 130, SIGTERM 143


class Abandoned(KeyboardInterrupt):
    """A second signal abandoned the step in flight (raised from the handler; ``signum``: the first signal)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class OutputsInterrupted(KeyboardInterrupt):
    """A signal stopped the final outputs (raised from the handler of ``FinalSignals``)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SHUTDOWN: dict[int, object] = {}  # handlers to restore once the process's shutdown is over (restore_signals)


def _ignore(signum, frame):
    """While the process shuts down after a signal: a further one only hurries what is left, never a
    traceback or an unexplained exit (the first signal's message and exit code stand)."""


class _Handlers:
    """Installs ``_handle`` for SIGINT/SIGTERM (main thread only). On exit after a signal, further signals are
    ignored until ``restore_signals()`` (the CLI's ``main`` calls it last): the handlers the process had are
    not back while the first signal's exception is still on its way out."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            if self.signum is not None:  # shutting down: keep further signals from interrupting it
                _SHUTDOWN.setdefault(s, handler)
                signal.signal(s, _ignore)
            else:
                signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name


class StopSignals(_Handlers):
    """Context manager: SIGINT/SIGTERM set ``signum`` instead of killing the process. A second signal while a
    step is in flight abandons it (``Abandoned``); inside ``deferred()`` (a checkpoint being written) it is
    only counted, so the checkpoint the first signal asked for is written whole."""

    def __init__(self):
        super().__init__()
        self.repeated = 0  # signals after the first
        self._deferred = 0

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            return
        self.repeated += 1
        if not self._deferred:
            raise Abandoned(self.signum)  # hurry: the step in flight is dropped, the last checkpoint stands

    @contextlib.contextmanager
    def deferred(self):
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1


class FinalSignals(_Handlers):
    """Context manager around the outputs written after training: SIGINT/SIGTERM stop them at once
    (``OutputsInterrupted``: the caller says which were not written); later signals are ignored."""

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            raise OutputsInterrupted(signum)


def restore_signals() -> None:
    """Put back the handlers a signal's shutdown kept away (``_Handlers.__exit__``)."""
    for s, handler in list(_SHUTDOWN.items()):
        signal.signal(s, handler)
    _SHUTDOWN.clear()
