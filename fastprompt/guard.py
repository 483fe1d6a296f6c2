"""Guards around training steps: non-finite losses and gradients, and stop signals (SIGINT/SIGTERM).

``NonFiniteGuard``: a step whose loss or prompt gradient holds NaN/inf is not applied; ``limit`` such steps
in a row raise ``NonFiniteError`` naming the epoch and the step. The check reads one boolean back from the
device per step (one host sync).

``StopSignals``: while active, SIGINT and SIGTERM only set a flag; the training loop finishes the step in
flight, writes a checkpoint and raises ``Interrupted`` (the CLI exits 130 / 143). A second SIGINT abandons
the step at once (``KeyboardInterrupt``); the last checkpoint on disk stays intact (writes are atomic).
"""
from __future__ import annotations

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


class StopSignals:
    """Context manager: SIGINT/SIGTERM set ``signum`` instead of killing the process (main thread only)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: abandon the step, keep the last checkpoint
        self.signum = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
