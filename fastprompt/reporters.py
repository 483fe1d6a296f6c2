"""Where a run's metrics go besides ``metrics.jsonl``: ``--report-to none | tensorboard``.

TensorBoard (``torch.utils.tensorboard``, the ``tensorboard`` extra) in ``--out/tensorboard/``: every numeric
field of each epoch line of metrics.jsonl as a scalar at the run's optimizer step, tagged by its prefix
(``train_loss`` -> ``train/loss``, ``test_exact_match`` -> ``test/exact_match``, ``test_parrot_rate``,
``train_target_tokens_per_second``, and ``epoch/<name>`` for the rest: ``lr``, ``seconds``, ...); the final
line's as ``final/<name>``; the samples.txt pairs as a text table ``samples``. A resumed run writes a new
events file in the same directory and hides what the interrupted run wrote after its checkpoint
(``purge_step``), so the curves continue where the checkpoint stands. Rank 0 alone writes (the caller
creates the reporter there only).
"""
from __future__ import annotations

import os
from typing import Any, Sequence

SUBDIR = "tensorboard"
EVENTS_PREFIX = "events.out.tfevents."
PREFIXES = ("train_", "test_", "argmax_test_")
NOT_SCALARS = ("epoch", "step")


def tensorboard_missing() -> str | None:
    """Why ``--report-to tensorboard`` cannot run here (the one-line error), or None."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
    except ImportError:
        return "tensorboard needs the tensorboard package: pip install 'fastprompt[tensorboard]'"
    return None


def tag(key: str, section: str) -> str:
    """``train_loss`` -> ``train/loss``; other keys under ``section`` (``lr`` -> ``epoch/lr``)."""
    for prefix in PREFIXES:
        if key.startswith(prefix) and len(key) > len(prefix):
            return prefix[:-1] + "/" + key[len(prefix):]
    return f"{section}/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl record (bools, lists and text left out)."""
    return {k: float(v) for k, v in record.items()
            if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)}


def markdown_table(pairs: Sequence[tuple[str, str]]) -> str:
    """``Actual | Predicted`` rows (TensorBoard's text plugin renders markdown)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")

    rows = ["| Actual | Predicted |", "|---|---|"] + [f"| {cell(a)} | {cell(p)} |" for a, p in pairs]
    return "\n".join(rows)


def remove_events(out: str) -> None:
    """Remove the events files a run wrote in ``out/tensorboard/`` (a fresh start over old outputs); other
    files there stay."""
    folder = os.path.join(out, SUBDIR)
    if not os.path.isdir(folder) or os.path.islink(folder):
        return
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(EVENTS_PREFIX) and (os.path.islink(path) or os.path.isfile(path)):
            os.remove(path)


class NoReporter:
    def epoch(self, record: dict[str, Any]) -> None:
        pass

    def final(self, record: dict[str, Any], step: int, samples: Sequence[tuple[str, str]]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(NoReporter):
    def __init__(self, out: str, steps_done: int = 0):
        """``steps_done``: the optimizer steps the run already has (a resumed run): events of later steps,
        written by the interrupted run after its checkpoint, are hidden."""
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(out, SUBDIR), purge_step=steps_done + 1 if steps_done else None)

    def epoch(self, record: dict[str, Any]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(tag(key, "epoch"), value, record["step"])
        self.writer.flush()

    def final(self, record: dict[str, Any], step: int, samples: Sequence[tuple[str, str]]) -> None:
        for key, value in scalars(record).items():
            self.writer.add_scalar(f"final/{key}", value, step)
        if samples:
            self.writer.add_text("samples", markdown_table(samples), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_reporter(name: str, out: str, steps_done: int = 0) -> NoReporter:
    """The reporter of ``--report-to name`` (checked by options.report_to before anything was written)."""
    return TensorBoardReporter(out, steps_done) if name == "tensorboard" else NoReporter()
