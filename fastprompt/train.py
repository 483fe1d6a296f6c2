"""Train a soft prompt: the post's experiment by default, any template, dataset or model on request.

    python -m fastprompt.train --model gpt2-large --epochs 100 --out runs/antonyms
    python -m fastprompt.train --model tiny --epochs 2 --train-size 256 --out /tmp/run   # a quick check
    python -m fastprompt.train ... --out runs/x --resume          # continue its last checkpoint
    torchrun --nproc_per_node 2 -m fastprompt.train ...             # data parallel (fastprompt/distributed.py)

The options are declared once, in fastprompt/options.py (parser, config, checks, run header, resume check).

Exit codes: 0 done; 1 (torchrun) another process of the run failed or timed out; 2 bad input or options (one
``error:`` line, ``--out`` unchanged); 3 NaN/inf: an initial
prompt that is or gives NaN/inf, or losses or gradients that stopped training (``NonFiniteError``); 130 / 143
stopped by SIGINT / SIGTERM after writing a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any

import torch

from .errors import ConfigError, FastpromptError, NonFiniteError
from .options import TrainConfig, build_parser, header_config, parse_config, validate  # noqa: F401 (the CLI's
# config, parser and checks are built from the declaration in fastprompt/options.py; TrainConfig and build_parser
# are imported from here too)
from .guard import FinalSignals, OutputsInterrupted
from .outputs import append_line, atomic_write, import_pyplot, write_text


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def run_info(config: TrainConfig, device: torch.device) -> dict:
    import transformers

    from . import __version__

    info = {"event": "start", "config": header_config(config), "seed": config.seed, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(), "versions": {"fastprompt": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}}
    return info


def parse_options(items) -> dict[str, Any]:
    """``["tau_end=0.05", "gumbel=true"]`` -> ``{"tau_end": 0.05, "gumbel": True}`` (CLI ``--method-opt``)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--method-opt takes KEY=VALUE, got {item!r}")
        value = value.strip()
        if value.lower() in ("true", "false", "yes", "no", "on", "off"):
            parsed: Any = value.lower() in ("true", "yes", "on")
        else:
            try:
                parsed = float(value) if any(c in value.lower() for c in ".e") or value.lower() in ("inf", "nan") else int(value)
            except ValueError:
                parsed = value
        out[key.strip().replace("-", "_")] = parsed
    return out


def method_options(config: TrainConfig) -> dict[str, Any]:
    """The method's options: gcg's own flags (``--gcg-*``), then ``--method-opt`` (which wins)."""
    options: dict[str, Any] = {}
    if config.method == "gcg":
        options.update(top_k=config.gcg_top_k, candidates=config.gcg_candidates, ascii_only=config.gcg_ascii_only)
    return {**options, **parse_options(config.method_opt)}


def run(config: TrainConfig) -> dict:
    """The whole job: load, check, train, write the outputs. Returns the last epoch's record."""
    config = validate(config)  # every declared check (fastprompt/options.py); --test-size filled in
    if config.sweep or isinstance(config.data, (list, tuple)):  # several prompts in one pass (fastprompt/sweep.py)
        return run_many(config)
    device = resolve_device(config.device)
    out = config.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    session, tuner, train, test, reporter = open_run(config, out, device)
    try:
        return train_and_write(config, session, tuner, train, test, out, reporter)
    finally:
        reporter.close()


def run_many(config) -> dict:
    """``--sweep`` / several ``--data`` (fastprompt/sweep.py): every point trained together (``PromptTuner.fit_many``), then each point's outputs and the sweep's.
    Returns the sweep summary (``sweep.json``'s content)."""
    from . import PromptTuner
    from .guard import Abandoned, Interrupted, StopSignals
    from .step import shares_one_pass
    from .sweep import best_point, final_line, plot_sweep, points_of, row_of, write_table

    for flag, bad in (("--peft-out", config.peft_out is not None), ("--baseline", bool(config.baseline)),
                      ("--report-to", config.report_to != "none")):
        if bad:
            raise ConfigError(f"{flag} does not work with --sweep or several --data (yet): run the point alone")
    if config.resume and not config.out:
        raise ConfigError("--resume needs the --out DIR of the sweep to continue")
    points = points_of(config)
    out = config.out or os.path.join("runs", "sweep")
    if os.path.isdir(out) and os.listdir(out) and not (config.resume or config.overwrite):
        raise ConfigError(f"--out {out} is not empty: pass --resume to continue the sweep, --overwrite to replace "
                          "it, or choose another --out")
    device = resolve_device(config.device)
    loaded, opened, signals, bases = None, [], StopSignals(), {}
    for name, settings in points:
        point = validate(dataclasses.replace(config, sweep=None, out=os.path.join(out, name),
                                             **{k: v for k, v in settings.items() if k != "task"}))
        # the model is loaded once, by the first point (its session sets up torchrun's process group and this
        # rank's device first), with the run's --seed
        session, tuner, train, test, reporter = open_run(point, point.out, device, loaded=loaded,
                                                         base=bases.get(point.prompt_len), model_seed=config.seed)
        loaded = loaded or (tuner.model, tuner.tokenizer)
        bases.setdefault(point.prompt_len, tuner)  # a prompt length: one engine (the first's pass takes all)
        session.signals = signals  # one handler for all points: a signal checkpoints every point
        opened.append((name, settings, point, session, tuner, train, test, reporter))
    is_main, engine = opened[0][3].is_main, opened[0][4].engine  # torchrun: rank 0 prints and writes the sweep's files
    if shares_one_pass(engine, [o[4].engine for o in opened]):
        passes = "in one pass" if len(bases) == 1 else f"of {len(bases)} prompt lengths in one pass"
    else:
        passes = f"one forward each (the {engine.name} engine has no pass for several prompts)"
    if is_main:
        print(f"sweep of {len(points)} prompts {passes}: {', '.join(name for name, _ in points)} | output {out}",
              flush=True)
    fits = [s.fit_arguments(t, tr, te, epoch_logger(p, t, p.out, r, label=n))
            for n, _, p, s, t, tr, te, r in opened]
    with signals:
        try:
            results = PromptTuner.fit_many([o[4] for o in opened], fits)
        except Abandoned as e:
            raise opened[0][3].abandoned(e) from None
        except Interrupted as e:  # every point has checkpointed: the sweep's folder resumes them all
            raise Interrupted(e.signum, f"stopped by {StopSignals.name(e.signum)}; every point's checkpoint is "
                                        f"written under {out}; continue with --resume --out {out}") from None
        finally:
            for o in opened:  # as session.fit: the outputs' forwards run unwrapped (rank 0, or all ranks sharded)
                o[3].ctx.unwrap(o[4])
    rows, stopped = [], []
    for (name, settings, point, session, tuner, train, test, reporter), result in zip(opened, results):
        if isinstance(result, NonFiniteError):
            if is_main:
                print(f"[{name}] stopped: {result}", flush=True)
            stopped.append(name)
            rows.append(row_of(name, settings, tuner, None, str(result)))
            continue
        session.after_fit(tuner)
        try:
            final = write_final(point, session, tuner, train, test, point.out, reporter)
        finally:
            reporter.close()
        rows.append(row_of(name, settings, tuner, (final_line(point.out) if is_main else None) or final, None))
    if is_main:
        summary = write_table(out, rows)
        plot_sweep(os.path.join(out, "sweep.png"), rows, {o[0]: o[4].history for o in opened})
        print(open(os.path.join(out, "sweep.md")).read(), flush=True)
    else:
        best = best_point(rows)
        summary = {"points": rows, "best": best["point"] if best else None}
    if stopped:
        raise NonFiniteError(f"{len(stopped)} of {len(points)} points stopped on NaN/inf ({', '.join(stopped)}); "
                             f"the others' outputs are written, the table in {os.path.join(out, 'sweep.md')}")
    return summary


def open_run(config: TrainConfig, out: str, device, loaded=None, base=None, model_seed: int | None = None):
    """Everything before training, for one run in ``out``: the session (``--out`` / ``--resume`` checks), data,
    model (or ``loaded``: ``(model, tokenizer)``; loaded with ``model_seed``, default ``config.seed``), tuner
    (or a ``base.variant`` sharing its engine: a sweep's point), every input checked, the checkpoint restored,
    the run header written. Returns ``(session, tuner, train, test, reporter)``."""
    from . import PromptTuner, load_model, load_pairs, subsample, train_test_split
    from .reporters import make_reporter
    from .session import Session

    session = Session(config, out, device)  # --out / --resume checks; torchrun's process group
    if config.peft_out is not None:  # the path, before anything is loaded (the template and peft: below)
        from .outputs import check_output_dir
        from .peft_io import ADAPTER_FILES

        check_output_dir(config.peft_out, "--peft-out", out, allowed=ADAPTER_FILES)
    device = session.device
    examples = load_pairs(config.data)
    eval_examples = load_pairs(config.eval_data) if config.eval_data is not None else None
    train, test = train_test_split(examples, test_size=config.test_size, seed=config.seed)
    if eval_examples is not None:  # the test set; a --test-size split's share of --data is only kept from training
        test = eval_examples
    train = subsample(train, config.train_size, seed=config.seed)
    engine, seed = config.engine, config.seed if model_seed is None else model_seed
    if config.shard_weights:
        from .sharding import check_engine

        engine = check_engine(engine)
    if loaded is not None:
        model, tokenizer = loaded
    elif config.shard_weights:  # the layers sharded at load: a safetensors directory is read chunk by chunk
        from .engines.base import resolve_precision
        from .sharding import load_sharded

        low = resolve_precision(config.precision, device, engine) == "bf16"  # weights loaded in bf16: no copy
        model, tokenizer = load_sharded(config.model, seed=seed, device=device, dtype=torch.bfloat16 if low else None)
    else:
        model, tokenizer = load_model(config.model, seed=seed, device=device)
    if base is not None:
        tuner = base.variant(init=config.init, seed=config.seed)
    else:
        tuner = PromptTuner(model, tokenizer, config.template, config.prompt_len, engine=engine,
                            precision=config.precision, init=config.init, seed=config.seed, kernels=config.kernels,
                            cuda_graphs=config.cuda_graphs, method=config.method,
                            method_options=method_options(config))
    session.encode(tuner, examples, train, test, eval_examples)  # every template, data and context error, by file and line
    if config.peft_out is not None:  # refused (template, directory, no peft) before anything is trained or written
        from .peft_io import check_peft_out

        check_peft_out(tuner, config.peft_out, out)
    session.prepare(tuner)  # checkpoint restored, first forward checked, --out locked, engine sharded
    # nothing has been written so far; torchrun: every rank has checked this --out before rank 0 writes in it
    # (a sweep's points open one after another, with no other collective between one point's checks and writes)
    session.ctx.barrier()
    metrics_path = os.path.join(out, "metrics.jsonl")
    if session.is_main:
        os.makedirs(out, exist_ok=True)
        chosen = f" (precision auto: {tuner.precision})" if config.precision == "auto" else ""
        source = f" (--eval-data {config.eval_data})" if eval_examples is not None else ""
        print(f"model {config.model} on {device} | engine {tuner.engine.describe()}{chosen} | {len(train)} train, "
              f"{len(test)} test examples{source} | output {out}", flush=True)
        session.write_header(metrics_path, run_info(config, device), tuner)
    # --report-to (fastprompt/reporters.py): rank 0 alone writes; a resumed run continues at its steps
    reporter = make_reporter(config.report_to if session.is_main else "none", out,
                             steps_done(tuner, len(train), config.batch_size))
    return session, tuner, train, test, reporter


def train_and_write(config, session, tuner, train, test, out: str, reporter) -> dict:
    """``session.fit``, then the outputs (rank 0); returns the last epoch's record."""
    session.fit(tuner, train, test, epoch_logger(config, tuner, out, reporter))  # tuner.fit with checkpoints, signals, resume and ranks
    return write_final(config, session, tuner, train, test, out, reporter)


def epoch_logger(config, tuner, out: str, reporter, label: str = ""):
    """The end of an epoch: its line printed (after ``label``: a sweep's point) and appended to metrics.jsonl,
    the reporter, prompt.safetensors."""
    metrics_path = os.path.join(out, "metrics.jsonl")
    name = f"[{label}] " if label else ""

    def log(record: dict) -> None:
        test_part = f"  test {record['test_loss']:.4f}" if "test_loss" in record else ""
        if "test_exact_match" in record:
            test_part += (f"  exact {100 * record['test_exact_match']:.1f}%  "
                          f"parrot {100 * record['test_parrot_rate']:.1f}%")
        print(f"{name}epoch {record['epoch']}/{config.epochs}  train {record['train_loss']:.4f}{test_part}  "
              f"{record['seconds']:.1f}s", flush=True)
        append_line(metrics_path, json.dumps(record) + "\n")
        reporter.epoch(record)
        tuner.save(os.path.join(out, "prompt.safetensors"))

    return log


def write_final(config, session, tuner, train, test, out: str, reporter) -> dict:
    """After training, the outputs (rank 0): prompt, final metrics, baseline, samples, nearest tokens, loss.png."""
    from .report import baseline_report, comparison_table, write_outputs

    metrics_path = os.path.join(out, "metrics.jsonl")
    if not session.is_main:
        if config.shard_weights:  # the final forwards gather layers: every rank takes part, rank 0 writes
            follow_outputs(tuner, test, config)
        return tuner.history[-1] if tuner.history else {}
    done: list[str] = []  # the final outputs written so far (a signal among them says which are missing)
    with FinalSignals() as signals:
        try:
            tuner.save(os.path.join(out, "prompt.safetensors"))
            done.append("prompt.safetensors")
            t_final = time.perf_counter()
            final = write_outputs(out, tuner, test, config.eval_size, config.progress)  # also at --epochs 0
            done += ["hard_prompt.txt"] if "token_ids" in final else []
            final["seconds"] = time.perf_counter() - t_final
            log_final(final, metrics_path)
            done.append("metrics.jsonl's final line")
            steps = steps_done(tuner, len(train), config.batch_size)
            baseline = None
            if config.baseline and test:  # the hand-written prompt on the same test examples, beside the trained one
                t_base = time.perf_counter()
                baseline = baseline_report(tuner, config.baseline, test, config.eval_size, config.progress)
                baseline["seconds"] = time.perf_counter() - t_base
                append_line(metrics_path, json.dumps(baseline) + "\n")
                done.append("metrics.jsonl's baseline line")
            pairs = write_samples(os.path.join(out, "samples.txt"), tuner, test[: config.samples])
            done.append("samples.txt")
            reporter.final(final, steps, pairs)
            write_text(os.path.join(out, "nearest.txt"), tuner.method.readout(tuner.prompt, k=5))
            done.append("nearest.txt")
            if plot_losses(os.path.join(out, "loss.png"), tuner.history, baseline):
                done.append("loss.png")
            if config.peft_out is not None:
                tuner.save_peft(config.peft_out)
        except OutputsInterrupted:
            raise final_interrupted(signals.signum, out, done, config) from None
    if baseline is not None and "test_loss" in final:
        print(comparison_table(baseline, final, steps), flush=True)
    for actual, predicted in pairs[:3]:
        print(f"Actual: {actual}\nPredicted: {predicted}", flush=True)
    if pairs:
        curves = f", the loss curves in {os.path.join(out, 'loss.png')}" if "loss.png" in done else ""
        print(f"({len(pairs)} samples in {os.path.join(out, 'samples.txt')}{curves})", flush=True)
    return tuner.history[-1] if tuner.history else final


def final_interrupted(signum: int, out: str, done: list[str], config: TrainConfig):
    """The ``Interrupted`` of a signal among the final outputs: what was written and what was not."""
    from . import checkpoint
    from .guard import Interrupted, StopSignals

    planned = ["prompt.safetensors", "metrics.jsonl's final line", "samples.txt", "nearest.txt", "loss.png"]
    planned += [f"the PEFT adapter in {config.peft_out}"] if config.peft_out is not None else []
    missing = [name for name in planned if name not in done]
    then = (f"--resume --out {out} writes them" if checkpoint.exists(out)
            else f"no checkpoint to resume (--epochs {config.epochs}): run it again with --overwrite")
    return Interrupted(signum, f"stopped by {StopSignals.name(signum)} while writing the final outputs: "
                               f"{', '.join(missing)} not written; {then}")


def follow_outputs(tuner, test, config) -> None:
    """On a rank other than 0 after training: the forwards rank 0 runs for its outputs
    (``train.run``: ``write_outputs``' final report, ``--baseline``'s, ``write_samples``' decoding), in the same order, so that
    every layer is gathered by every rank; nothing is written."""
    from .report import baseline_report, final_report

    final_report(tuner, test, config.eval_size, False)
    if getattr(config, "baseline", None) and test:
        baseline_report(tuner, config.baseline, test, config.eval_size, False)
    examples = test[: config.samples]
    if examples:
        tuner.generate([{k: v for k, v in tuner.template.as_fields(ex).items() if k != "target"} for ex in examples])
    tuner.method.readout(tuner.prompt, k=5)  # nearest.txt: the table gathered


def log_final(final: dict, metrics_path: str) -> None:
    append_line(metrics_path, json.dumps(final) + "\n")
    parts = [f"final ({final['method']})"]
    if "test_loss" in final:
        parts.append(f"test {final['test_loss']:.4f}  exact {100 * final['test_exact_match']:.1f}%")
    if "token_text" in final:
        parts.append(f"tokens {final['token_text']!r}")
    if "argmax_test_loss" in final:
        parts.append(f"argmax tokens: test {final['argmax_test_loss']:.4f}  "
                     f"exact {100 * final['argmax_test_exact_match']:.1f}%")
    print("  ".join(parts), flush=True)


def write_samples(path: str, tuner, examples) -> list[tuple[str, str]]:
    """Greedy predictions as "Actual / Predicted" pairs, the post's format; returns the pairs."""
    words = tuner.generate([{k: v for k, v in tuner.template.as_fields(ex).items() if k != "target"}
                            for ex in examples]) if examples else []
    pairs = []
    for ex, word in zip(examples, words):
        fields = tuner.template.as_fields(ex)
        pairs.append((tuner.template.render(fields), tuner.template.render({**fields, "target": word or "?"})))
    write_text(path, "".join(f"Actual: {actual}\nPredicted: {predicted}\n\n" for actual, predicted in pairs))
    return pairs


def steps_done(tuner, n_train: int, batch_size: int) -> int:
    """The optimizer steps the run has taken, over every invocation (the step of its epoch records)."""
    per_epoch = -(-n_train // batch_size)
    done = tuner.history[-1].get("step", len(tuner.history) * per_epoch) if tuner.history else 0
    return done + (tuner.resume_at["step"] if tuner.resume_at else 0)


def plot_losses(path: str, history: list[dict], baseline: dict | None = None) -> bool:
    """Train and test loss an epoch; the hand-written baseline's test loss as a line (``--baseline``). False
    where matplotlib is missing (nothing written; ``import_pyplot`` said so)."""
    plt = import_pyplot("loss.png")
    if plt is None:
        return False
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    if history and "test_loss" in history[0]:
        ax.plot(epochs, [r["test_loss"] for r in history], label="test")
    if baseline is not None:
        ax.axhline(baseline["test_loss"], color="grey", linestyle="--", label=f"hand-written {baseline['text']!r} (test)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("target cross-entropy")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)
    return True


def main(argv=None) -> int:
    from .console import safe_streams
    from .distributed import launch_rank
    from .guard import restore_signals

    with safe_streams():  # unencodable characters escaped; a stdout that cannot be written dropped
        try:
            return _main(argv, quiet=launch_rank() not in (0, None))  # torchrun: rank 0 reports for all
        finally:
            restore_signals()  # the handlers a signal's shutdown kept away


def _main(argv, quiet: bool) -> int:
    from .guard import Interrupted
    from .session import release_locks

    try:
        run(parse_config(argv))
    except FastpromptError as e:  # torchrun: every rank meets it (a NaN too: the loss is all-reduced); rank 0 says it
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 3 if isinstance(e, NonFiniteError) else 2
    except Interrupted as e:
        if not quiet:
            print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # torchrun: a collective that lost another rank, one line on every rank
        from .distributed import lost_peer

        line = lost_peer(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    finally:
        release_locks()  # the --out lock (the kernel drops it anyway when the process ends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
