"""What the CLI adds around ``PromptTuner.fit`` to make a run reliable (issue 8):

* ``--out`` safety: a non-empty ``--out`` is refused unless ``--resume`` (continue its checkpoint) or
  ``--overwrite``; everything is read and checked before anything is written.
* checkpoints (``fastprompt.checkpoint``) at every epoch end, every ``--checkpoint-every`` steps and on
  SIGINT/SIGTERM (the step in flight is finished, the checkpoint written, ``Interrupted`` raised: the CLI
  exits 130 / 143); ``--resume`` restores it, mid-epoch included, and rewrites ``metrics.jsonl`` to match.
* ``torchrun``: the process group (``fastprompt.distributed``); rank 0 alone prints and writes; every rank
  takes part in each collective in the same order (the stop flag is all-reduced after every step).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from . import checkpoint as ckpt
from .distributed import setup
from .errors import ConfigError
from .guard import Interrupted, StopSignals


class Session:
    def __init__(self, config, out: str, device: torch.device):
        self.config = config
        self.out = out
        self.every = int(getattr(config, "checkpoint_every", 0) or 0)
        self.resume = bool(getattr(config, "resume", False))
        self.overwrite = bool(getattr(config, "overwrite", False))
        if self.every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 (0: epoch ends only), got {self.every}")
        if getattr(config, "cuda_graphs", "auto") not in ("auto", "on", "off"):
            raise ConfigError(f"unknown --cuda-graphs {config.cuda_graphs!r}: use auto, on or off")
        if config.samples < 0:
            raise ConfigError(f"--samples must be >= 0, got {config.samples}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.resume and not config.out:
            raise ConfigError("--resume needs the --out DIR of the run to continue")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ConfigError(f"--out {out} is a file, not a directory")
        existing = sorted(os.listdir(out)) if os.path.isdir(out) else []
        self.saved: tuple[dict, dict] | None = None
        if existing and not (self.resume or self.overwrite):
            shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise ConfigError(f"--out {out} is not empty ({shown}): pass --resume to continue its checkpoint, "
                              "--overwrite to replace it, or choose another --out")
        if self.resume and existing:
            self.saved = ckpt.load_checkpoint(out)  # PromptFileError: missing, corrupt or foreign
            ckpt.check_compatible(self.saved[1], self.config_dict(), os.path.join(out, ckpt.TENSORS))
        self.ctx, self.device = setup(device)
        if self.ctx.active and getattr(config, "max_seconds", None) is not None:
            # each process would read its own clock and stop at a different step: use --max-steps
            raise ConfigError("--max-seconds does not work under torchrun (the processes would stop at different "
                              "steps); use --max-steps")
        torch.manual_seed(config.seed)  # the global RNG (Gumbel noise); batches have their own seeded RNG
        self.signals = StopSignals()
        self.lr = config.lr

    # ------------------------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def prepare(self, tuner) -> None:
        """After every input was checked: restore the checkpoint (``--resume``), shard the engine."""
        if self.saved is not None:
            tensors, state = self.saved
            ckpt.restore(tuner, tensors, state, self.lr, os.path.join(self.out, ckpt.TENSORS))
            if self.is_main:  # half-written temp files of a run killed mid-write (SIGKILL) go
                for name in os.listdir(self.out):
                    if name.startswith(".") and name.endswith(".tmp"):
                        os.remove(os.path.join(self.out, name))
        self.ctx.wrap(tuner)

    def write_header(self, metrics_path: str, info: dict[str, Any], tuner) -> None:
        """metrics.jsonl: the run header; on resume the old headers, a resume event and the checkpoint's
        epochs (lines of epochs after the checkpoint, from the interrupted run, are dropped)."""
        info = {**info, **self.ctx.info(), "torch_threads": torch.get_num_threads(),
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled()}
        if self.saved is None:
            if self.overwrite:
                ckpt.remove(self.out)
            lines = [info]
        else:
            state = self.saved[1]
            old = []
            if os.path.exists(metrics_path):
                with open(metrics_path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue  # a line cut off by the kill
                        if isinstance(record, dict) and record.get("event") in ("start", "resume"):
                            old.append(record)
            resume = {**info, "event": "resume", "from_epoch": state["epoch"] + 1, "from_step": state["step"]}
            lines = old + [resume] + list(tuner.history)
            print(f"resuming {self.out} at epoch {state['epoch'] + 1}, step {state['step']}", flush=True)
        tmp = metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)
        os.replace(tmp, metrics_path)

    # --------------------------------------------------------------------------------- training
    def fit(self, tuner, train, test, log) -> None:
        """``tuner.fit`` for the epochs left, with checkpoints, signals and rank-0-only logging."""
        config = self.config
        epochs = max(0, config.epochs - len(tuner.history))

        def epoch_end(record: dict[str, Any]) -> None:
            if self.is_main:
                log(record)
            self.save(tuner, epoch=len(tuner.history), step=0, ce_sum=0.0, n_tokens=0)
            self.stop_if_asked(tuner, f"after epoch {len(tuner.history)}")

        def after_step(info: dict[str, Any]) -> None:
            stop = self.ctx.any(self.signals.requested, self.device)
            due = self.every and info["step"] % self.every == 0 and info["step"] < info["steps"]
            due = due and tuner.nonfinite.streak == 0  # the last good checkpoint stays during a NaN streak
            if stop or due:
                self.save(tuner, epoch=info["epoch"], step=info["step"], ce_sum=float(info["ce_sum"]),
                          n_tokens=info["n_tokens"])
            if stop:
                self.stop_if_asked(tuner, f"at epoch {info['epoch'] + 1}, step {info['step']}", agreed=True)

        max_steps = getattr(config, "max_steps", None)
        if max_steps is not None:  # the budget counts the steps of earlier invocations (--resume) too
            per_epoch = -(-len(train) // config.batch_size)
            done = len(tuner.history) * per_epoch + (tuner.resume_at["step"] if tuner.resume_at else 0)
            max_steps = max(0, max_steps - done)
        with self.signals:
            try:
                tuner.fit(train, epochs=epochs, batch_size=config.batch_size, lr=config.lr, eval_data=test or None,
                          progress=config.progress and self.is_main, callback=epoch_end, step_callback=after_step,
                          eval_every=getattr(config, "eval_every", 0), eval_size=getattr(config, "eval_size", None),
                          max_steps=max_steps, max_seconds=getattr(config, "max_seconds", None))
            finally:
                self.ctx.unwrap(tuner)  # evaluation after training runs on rank 0 alone
        if tuner.stopped:  # a budget ran out: the last completed step is checkpointed, --resume continues it
            at = tuner.resume_at
            self.save(tuner, epoch=len(tuner.history), step=at["step"], ce_sum=at["ce_sum"], n_tokens=at["n_tokens"])
            if self.is_main:
                flag = "--" + tuner.stopped.replace("_", "-")
                print(f"stopped by {flag} at epoch {len(tuner.history) + 1}, step {at['step']}; checkpoint written "
                      f"to {self.out}; continue with --resume --out {self.out} (and a larger {flag})", flush=True)

    def save(self, tuner, **where) -> None:
        if self.is_main:
            ckpt.save_checkpoint(self.out, tuner, config=self.config_dict(), **where)

    def stop_if_asked(self, tuner, where: str, agreed: bool = False) -> None:
        if not (agreed or self.ctx.any(self.signals.requested, self.device)):
            return
        self.ctx.barrier()  # rank 0 has written the checkpoint before any rank exits
        signum = self.signals.signum or 15  # another rank got it: SIGTERM's code
        raise Interrupted(signum, f"stopped by {StopSignals.name(signum)} {where}; checkpoint written to "
                                  f"{self.out}; continue with --resume --out {self.out}")

    def close(self) -> None:
        self.ctx.close()
