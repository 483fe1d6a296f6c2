"""What the CLI adds around ``PromptTuner.fit`` to make a run reliable (issues 8 and 17):

* ``--out`` safety: a non-empty ``--out`` is refused unless ``--resume`` (continue its checkpoint) or
  ``--overwrite``. Every check that can fail runs before anything in ``--out`` changes: the path itself
  (a file, a dangling symlink, a loop, no permission), every output's name in it (``outputs.check_outputs``:
  no link, directory or special file is read or written through), the options, the data, the checkpoint
  and the run header (``fastprompt.schema``), and the first
  forward of the initial prompt (``preflight``: NaN/inf exit 3, the engine's one-time check against the
  model). ``--overwrite`` then removes the outputs the run will not rewrite.
* a lock: rank 0 holds an exclusive ``flock`` on the ``--out`` directory itself (nothing is written for it;
  the kernel drops it when the process dies, so a killed run never blocks ``--resume``). A second run on
  the same ``--out`` is refused at once.
* checkpoints (``fastprompt.checkpoint``) at every epoch end, every ``--checkpoint-every`` steps and on
  SIGINT/SIGTERM (the step in flight is finished, the checkpoint written, ``Interrupted`` raised: the CLI
  exits 130 / 143). An epoch's checkpoint is written before its ``metrics.jsonl`` line, so a kill at any
  moment leaves a directory that ``--resume`` continues: from the checkpoint, or, where the run had none
  yet, from step 0 after the same config checks against the run header in ``metrics.jsonl``.
* ``--resume`` compares the options ``fastprompt/options.py`` declares as MATCH by value and the data files
  (``--data``, ``--eval-data``) by content (sha256), not by path.
* ``torchrun``: the process group (``fastprompt.distributed``); rank 0 alone prints and writes; every rank
  takes part in each collective in the same order (the stop flag is all-reduced after every step).
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any

import torch

from . import checkpoint as ckpt
from . import outputs
from .distributed import launch_env, setup
from .errors import ConfigError, FastpromptError, NonFiniteError
from .guard import Abandoned, Interrupted, StopSignals
from .options import content_hashes, hash_keys, header_config
from .reporters import remove_events

METRICS = outputs.METRICS
OUTPUTS = outputs.OUTPUTS  # every file a run writes in --out: checked first; what --overwrite may remove


class Session:
    def __init__(self, config, out: str, device: torch.device):
        self.config = config
        self.out = out
        self.every = int(getattr(config, "checkpoint_every", 0) or 0)
        self.resume = bool(getattr(config, "resume", False))
        self.overwrite = bool(getattr(config, "overwrite", False))
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.resume and not config.out:
            raise ConfigError("--resume needs the --out DIR of the run to continue")
        self.writer = launch_env()[0] == 0  # torchrun: rank 0 alone writes (and locks); ConfigError if broken
        self.hashes = content_hashes(config)  # every data file's sha256: data_sha256, eval_data_sha256
        self.lock: OutLock | None = None
        exists = check_out(out)
        if exists and self.writer:
            self.lock = OutLock(out)  # before looking inside: a second run stops here, at once
        existing = sorted(os.listdir(out)) if exists else []
        self.saved: tuple[dict, dict] | None = None
        self.restart = False  # --resume of a run that wrote no checkpoint yet: again from step 0
        self.note = None  # said once the run starts writing
        if existing and not (self.resume or self.overwrite):
            shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise ConfigError(f"--out {out} is not empty ({shown}): pass --resume to continue its checkpoint, "
                              "--overwrite to replace it, or choose another --out")
        if existing:  # before anything in it is read: no link, directory or special file at an output's name
            outputs.check_outputs(out, OUTPUTS, overwrite=self.overwrite)
        if self.resume:
            self._check_resumable(existing)
        self.fresh = not existing  # nothing of ours or anyone's in --out: it must still be so when we claim it
        self.ctx, self.device = setup(device)
        if getattr(config, "shard_weights", False):  # torchrun with 2+ processes, an engine that shards
            from .sharding import check_context, check_engine

            check_context(self.ctx)
            check_engine(config.engine)
        if self.ctx.active and getattr(config, "max_seconds", None) is not None:
            # each process would read its own clock and stop at a different step: use --max-steps
            raise ConfigError("--max-seconds does not work under torchrun (the processes would stop at different "
                              "steps); use --max-steps")
        torch.manual_seed(config.seed)  # the global RNG (Gumbel noise); batches have their own seeded RNG
        self.signals = StopSignals()
        self.last_saved = "the one it held before this run" if self.saved is not None else "none yet"
        self.lr = config.lr
        self.probe: list = []  # encoded training examples for the preflight (``encode``)

    def _check_resumable(self, existing: list[str]) -> None:
        out = self.out
        if not existing:
            self.note = f"nothing to resume: --out {out} {'is empty' if os.path.isdir(out) else 'does not exist'}; " \
                        "starting a fresh run"
        elif ckpt.exists(out):
            self.saved = ckpt.load_checkpoint(out)  # PromptFileError: missing, corrupt, damaged or foreign
            ckpt.check_compatible(self.saved[1], self.config_dict(), os.path.join(out, ckpt.TENSORS))
        else:
            path = os.path.join(out, METRICS)
            header, finished = restart_header(path, self.header_table())
            if header is None:
                raise ConfigError(f"nothing to resume in --out {out}: no {ckpt.TENSORS} and no run header in "
                                  f"{METRICS}; choose another --out, or --overwrite")
            results = [name for name in existing if name in OUTPUTS and name not in (METRICS, METRICS + ".tmp")]
            if finished or results:  # a run that ended without a checkpoint (--epochs 0): nothing to continue
                shown = ", ".join(results + ([f"{finished} in {METRICS}"] if finished else []))
                raise ConfigError(f"--out {out} holds a run's results ({shown}) but no {ckpt.TENSORS}: there is "
                                  "nothing to resume; --overwrite to run it again, or choose another --out")
            state = {"config": {**(header.get("config") or {}), **{key: header.get(key) for key in hash_keys()}}}
            ckpt.check_compatible(state, self.config_dict(), path)
            self.restart = True
            self.note = f"no checkpoint in {out} yet (the run stopped before its first one): starting again from step 0"

    def header_table(self):
        """The run header's schema (``schema.header_fields``) over this run's options."""
        from . import schema

        return schema.header_fields(schema.config_fields(required=ckpt.MUST_MATCH))

    # ------------------------------------------------------------------------------------ setup
    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def config_dict(self) -> dict[str, Any]:
        return {**header_config(self.config), **self.hashes}

    def prepare(self, tuner) -> None:
        """After every input was checked: restore the checkpoint (``--resume``), run the preflight, claim
        ``--out`` (created and locked; nothing written in it yet), shard the engine."""
        if self.saved is not None:
            tensors, state = self.saved
            ckpt.restore(tuner, tensors, state, self.lr, os.path.join(self.out, ckpt.TENSORS))
        preflight(tuner, self.probe)
        if self.writer:
            self.claim()
            for name in os.listdir(self.out):  # half-written temp files of a run killed mid-write (SIGKILL) go
                if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(os.path.join(self.out, name)):
                    os.remove(os.path.join(self.out, name))
        self.ctx.wrap(tuner)

    def claim(self) -> None:
        """Create ``--out`` (if new) and lock it. Another run may have taken it since the checks: refused."""
        if self.lock is None:
            try:
                os.makedirs(self.out, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot create --out {self.out}: {e.strerror}") from None
            self.lock = OutLock(self.out)
        if self.fresh and os.listdir(self.out):
            raise ConfigError(f"--out {self.out} was filled by another run meanwhile; choose another --out")

    def write_header(self, metrics_path: str, info: dict[str, Any], tuner) -> None:
        """metrics.jsonl: the run header; on resume the old headers, a resume event and the checkpoint's
        epochs (lines of epochs after the checkpoint, from the interrupted run, are dropped).

        A fresh start over earlier outputs (``--overwrite``, or ``--resume`` of a run without a checkpoint)
        removes the old checkpoint first, then replaces metrics.jsonl, then removes the other old outputs:
        a kill in between leaves a directory ``--resume`` continues from step 0."""
        info = {**info, **self.ctx.info(), "torch_threads": torch.get_num_threads(),
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                **self.hashes}
        if self.note:
            print(self.note, flush=True)
        if self.saved is None:
            if self.overwrite or self.restart:
                remove_outputs(self.out, (ckpt.TENSORS, ckpt.SIDECAR))
            lines = [info]
            if self.restart:
                lines = old_headers(metrics_path) + [{**info, "event": "resume", "from_epoch": 1, "from_step": 0}]
        else:
            state = self.saved[1]
            resume = {**info, "event": "resume", "from_epoch": state["epoch"] + 1, "from_step": state["step"]}
            lines = old_headers(metrics_path) + [resume] + list(tuner.history)
            print(f"resuming {self.out} at epoch {state['epoch'] + 1}, step {state['step']}", flush=True)
        outputs.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in lines))
        if self.saved is None and (self.overwrite or self.restart):
            remove_outputs(self.out, [name for name in OUTPUTS if name != METRICS])
            remove_events(self.out)  # --report-to tensorboard's events files

    # --------------------------------------------------------------------------------- training
    def fit(self, tuner, train, test, log) -> None:
        """``tuner.fit`` for the epochs left, with checkpoints, signals and rank-0-only logging."""
        with self.signals:
            try:
                tuner.fit(**self.fit_arguments(tuner, train, test, log))
            except Abandoned as e:  # a second signal dropped the step in flight: the last checkpoint stands
                raise self.abandoned(e) from None
            finally:
                self.ctx.unwrap(tuner)  # evaluation after training runs on rank 0 alone
        self.after_fit(tuner)

    def abandoned(self, e: Abandoned) -> Interrupted:
        return Interrupted(e.signum, f"stopped by {StopSignals.name(e.signum)}; a second signal abandoned the "
                                     f"step in flight: the last checkpoint in {self.out} ({self.last_saved}) "
                                     f"stands; continue with --resume --out {self.out}")

    def fit_arguments(self, tuner, train, test, log) -> dict[str, Any]:
        """``tuner.fit``'s arguments for this run: the epochs and steps left, checkpoints at epoch ends, every
        ``--checkpoint-every`` steps and on a signal (``self.signals``, entered by the caller)."""
        config = self.config
        epochs = max(0, config.epochs - len(tuner.history))

        def epoch_end(record: dict[str, Any]) -> None:
            # the checkpoint first: a kill before the metrics line leaves a checkpoint whose history has
            # the epoch (--resume rewrites metrics.jsonl from it); the other way round it would be lost
            self.save(tuner, epoch=len(tuner.history), step=0, ce_sum=0.0, n_tokens=0)
            if self.is_main:
                log(record)
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
        return dict(train=train, epochs=epochs, batch_size=config.batch_size, lr=config.lr, eval_data=test or None,
                    progress=config.progress and self.is_main, callback=epoch_end, step_callback=after_step,
                    eval_every=getattr(config, "eval_every", 0), eval_size=getattr(config, "eval_size", None),
                    max_steps=max_steps, max_seconds=getattr(config, "max_seconds", None))

    def after_fit(self, tuner) -> None:
        """A budget stop: the last completed step checkpointed, the way to continue said."""
        if tuner.stopped:  # a budget ran out: the last completed step is checkpointed, --resume continues it
            at = tuner.resume_at
            self.save(tuner, epoch=len(tuner.history), step=at["step"], ce_sum=at["ce_sum"], n_tokens=at["n_tokens"])
            if self.is_main:
                flag = "--" + tuner.stopped.replace("_", "-")
                print(f"stopped by {flag} at epoch {len(tuner.history) + 1}, step {at['step']}; checkpoint written "
                      f"to {self.out}; continue with --resume --out {self.out} (and a larger {flag})", flush=True)

    def save(self, tuner, **where) -> None:
        with self.signals.deferred():  # a second signal waits for the checkpoint the first asked for
            if self.is_main:
                ckpt.save_checkpoint(self.out, tuner, config=self.config_dict(), **where)
        self.last_saved = f"epoch {where['epoch'] + 1}, step {where['step']}"

    def stop_if_asked(self, tuner, where: str, agreed: bool = False) -> None:
        if not (agreed or self.ctx.any(self.signals.requested, self.device)):
            return
        self.ctx.barrier()  # rank 0 has written the checkpoint before any rank exits
        signum = self.signals.signum or 15  # another rank got it: SIGTERM's code
        raise Interrupted(signum, f"stopped by {StopSignals.name(signum)} {where}; checkpoint written to "
                                  f"{self.out}; continue with --resume --out {self.out}")

    def encode(self, tuner, examples, train, test, eval_examples=None) -> None:
        """Tokenise and check the training and test examples; a data error names the file and line of the first
        bad example (of ``examples``, the --data file, or, for the test set, ``eval_examples`` if given)."""
        from .data import locate
        from .errors import DataError

        try:
            self.probe = tuner.encode(train)[:8]  # the preflight's batch
        except DataError as e:
            raise locate(examples, tuner.encoder.encode, e) from None
        try:
            if test:
                tuner.encode(test)
        except DataError as e:
            raise locate(examples if eval_examples is None else eval_examples, tuner.encoder.encode, e) from None

    def close(self) -> None:
        self.ctx.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None


# ------------------------------------------------------------------------------------------ checks
def check_out(out: str) -> bool:
    """True when ``--out`` is an existing directory we may write in, False when it can be created;
    ``ConfigError`` otherwise (a file, below a file, a dangling symlink or a loop, no permission)."""
    try:
        mode = os.stat(out).st_mode
    except FileNotFoundError:
        if os.path.islink(out):
            raise ConfigError(f"--out {out} is a symlink to nothing ({os.readlink(out)})") from None
        outputs.check_creatable(out, "--out")
        return False
    except NotADirectoryError:
        raise ConfigError(f"--out {out} lies below a file, not a directory") from None
    except OSError as e:  # ELOOP, ENAMETOOLONG, EACCES on a parent, ...
        raise ConfigError(f"--out {out}: {e.strerror}") from None
    except ValueError:  # an embedded NUL
        raise ConfigError(f"--out {out!r} is not a usable path") from None
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"--out {out} is a file, not a directory")
    if not os.access(out, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: no permission to write in it")
    return True


def preflight(tuner, batch) -> None:
    """Before anything in ``--out`` changes: the initial (or restored) prompt is finite and gives a finite
    loss on ``batch`` (a few encoded training examples). That forward also runs the engine's one-time check against the
    model, so a model the engine cannot run is refused here too (``ConfigError``), not mid-training."""
    params = tuner.prompt.detach()
    if not torch.isfinite(params).all():
        raise NonFiniteError("the initial prompt holds NaN/inf values (check --init and --method-opt); "
                             "training not started")
    with torch.no_grad():
        prompt = tuner.method.inputs(params)
        if not torch.isfinite(prompt.tensor).all():
            raise NonFiniteError("the initial prompt's vectors hold NaN/inf (check --init and --method-opt); "
                                 "training not started")
        if not batch:
            return
        ce_sum, _ = tuner.engine.loss_terms(prompt, batch)
    if not torch.isfinite(ce_sum).all():
        raise NonFiniteError(f"the initial prompt gives a NaN/inf loss (its largest value is "
                             f"{params.abs().max().item():.3g}; check --init and --method-opt); training not started")


# ------------------------------------------------------------------------------------ --out files
class OutLock:
    """An exclusive, non-blocking ``flock`` on the ``--out`` directory (an open descriptor of the directory
    itself: nothing is written for it). The kernel releases it when the process ends, however it ends."""

    def __init__(self, out: str):
        self.fd = None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no lock
            return
        try:
            fd = os.open(out, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as e:
            raise ConfigError(f"--out {out}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"--out {out} is in use by another fastprompt run; wait for it to end "
                              "(then --resume) or choose another --out") from None
        self.fd = fd
        _HELD.append(self)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        if self in _HELD:
            _HELD.remove(self)


_HELD: list[OutLock] = []


def release_locks() -> None:
    """Drop every ``--out`` lock this process holds (the CLI's ``main`` calls it however ``run`` ends)."""
    for lock in list(_HELD):
        lock.release()


def restart_header(metrics_path: str, table) -> tuple[dict[str, Any] | None, str | None]:
    """``(the last start record, what the file holds beyond headers)`` of the metrics.jsonl of a run without
    a checkpoint, every header checked against ``table`` (``schema.header_fields``): its first line must be
    a run header (written whole, by a rename), other lines records fastprompt writes, a last line cut off by a
    kill excepted. ``(None, None)`` where the file is missing or empty; ``ConfigError`` for anything else."""
    from . import schema

    lines = outputs.read_bytes(metrics_path).split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        return None, None
    headers, finished = [], None
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            if n == len(lines) and n > 1:
                continue  # a line cut off by a kill
            raise ConfigError(f"{metrics_path}, line {n}: not a JSON line fastprompt wrote") from None
        if not isinstance(record, dict):
            raise ConfigError(f"{metrics_path}, line {n}: a JSON {type(record).__name__}, not a record fastprompt "
                              "writes")
        event = record.get("event")
        if n == 1 and event != "start":
            raise ConfigError(f"{metrics_path}, line 1: not a run header (no \"event\": \"start\")")
        if event in ("start", "resume"):
            problem = schema.check_record(record, table, "the run header")
            if problem:
                raise ConfigError(f"{metrics_path}, line {n}: {problem}")
            if event == "start":
                headers.append(record)
        elif finished is None:
            finished = "a final line" if event == "final" else "an epoch's line"
    return headers[-1], finished


def old_headers(metrics_path: str) -> list[dict[str, Any]]:
    """The ``start`` and ``resume`` records of an earlier metrics.jsonl, in order (read without following a
    link; lines that are not ours, or cut off by a kill, skipped)."""
    records = []
    try:
        raw = outputs.read_bytes(metrics_path)
    except FastpromptError:
        return records
    for line in raw.split(b"\n"):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and record.get("event") in ("start", "resume"):
            records.append(record)
    return records


def remove_outputs(out: str, names) -> None:
    """Remove the named regular files (and symlinks) from ``out``; never a directory or another name."""
    for name in names:
        path = os.path.join(out, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
