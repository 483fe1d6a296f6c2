"""Train a soft prompt: the post's experiment by default, any template, dataset or model on request.

    python -m fastprompt.train --model gpt2-large --epochs 100 --out runs/antonyms
    python -m fastprompt.train --model tiny --epochs 2 --train-size 256 --out /tmp/run   # a quick check
    python -m fastprompt.train ... --out runs/x --resume          # continue its last checkpoint
    torchrun --nproc_per_node 2 -m fastprompt.train ...             # data parallel (fastprompt/distributed.py)

Exit codes: 0 done; 2 bad input or options (one ``error:`` line, ``--out`` unchanged); 3 NaN/inf: an initial
prompt that is or gives NaN/inf, or losses or gradients that stopped training (``NonFiniteError``); 130 / 143
stopped by SIGINT / SIGTERM after writing a checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError, FastpromptError, NonFiniteError, UsageParser
from .guard import FinalSignals, OutputsInterrupted
from .outputs import append_line, atomic_write, write_text
from .template import DEFAULT_TEMPLATE


@dataclass
class TrainConfig:
    model: str = "gpt2-large"
    data: str = "antonyms"
    template: str = DEFAULT_TEMPLATE
    prompt_len: int = 4
    init: str = "random"
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    engine: str = "auto"
    precision: str = "auto"
    kernels: str = "auto"
    cuda_graphs: str = "auto"
    train_size: int | None = None
    test_size: float = 0.2
    seed: int = 1337
    device: str = "auto"
    out: str | None = None
    samples: int = 20
    method: str = "soft"
    method_opt: list | None = None
    progress: bool = True
    checkpoint_every: int = 0
    eval_every: int = 10
    eval_size: int = 500
    max_steps: int | None = None
    max_seconds: float | None = None
    resume: bool = False
    overwrite: bool = False
    peft_out: str | None = None


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = UsageParser(prog="python -m fastprompt.train",
                    description="Learn a soft prompt by backpropagation through a frozen causal LM.")
    p.add_argument("--model", default=d.model, help="hub name, local directory, or 'tiny' (default: %(default)s)")
    p.add_argument("--data", default=d.data, help="'antonyms' or a .csv/.jsonl file (default: %(default)s)")
    p.add_argument("--template", default=d.template, help="template with {prompt} and a final {target}")
    p.add_argument("--prompt-len", type=int, default=d.prompt_len, help="trainable prompt vectors (default: 4)")
    p.add_argument("--init", default=d.init, help="random | vocab | text:WORDS | file:PROMPT.safetensors (default: random)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split (default: 100)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples a step (default: 64)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--engine", default=d.engine, help="auto | naive | generic | fused (default: auto)")
    p.add_argument("--precision", default=d.precision,
                   help="auto | fp32 | bf16 | autocast (default: auto = bf16 weights with an fp32 prompt on CUDA, "
                        "fp32 on the CPU)")
    p.add_argument("--kernels", default=d.kernels, help="fused engine kernels: auto | triton | cuda | torch")
    p.add_argument("--cuda-graphs", default=d.cuda_graphs, help="auto | on | off (fused engine on CUDA)")
    p.add_argument("--train-size", type=int, default=None, help="subsample the training split to N examples")
    p.add_argument("--test-size", type=float, default=d.test_size, help="test share of the data (default: 0.2)")
    p.add_argument("--seed", type=int, default=d.seed, help="split, init and shuffling seed (default: 1337)")
    p.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="output directory (default: runs/<date-time>)")
    p.add_argument("--samples", type=int, default=d.samples, help="test examples written to samples.txt")
    p.add_argument("--method", default=d.method, help="soft | relaxed | hard | prefix (default: soft)")
    p.add_argument("--method-opt", action="append", default=None, metavar="KEY=VALUE",
                   help="a method option, repeatable (relaxed: tau_start, tau_end, init_std, lr_scale, gumbel; "
                   "hard: metric, lr_scale)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="N",
                   help="also checkpoint every N steps (default: epoch ends and SIGINT/SIGTERM only)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, metavar="N",
                   help="generation metrics (exact match, parrot rate) every N epochs and at the end; the test "
                   "loss is computed every epoch (default: %(default)s; 0: at the end only)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, metavar="N",
                   help="generation metrics on at most N test examples (default: %(default)s); the decoded word "
                   "counts as a match when it equals the target (or, for parrot rate, an input) after stripping "
                   "surrounding punctuation and whitespace, case-insensitively; the raw comparison is logged as "
                   "*_strict")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps in all (a resumed run counts its earlier steps)")
    p.add_argument("--max-seconds", type=float, default=None, metavar="S",
                   help="stop training after S seconds of this invocation (at the end of a step)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty --out without --resume")
    p.add_argument("--peft-out", default=None, metavar="DIR",
                   help="also write the trained prompt as a PEFT adapter to DIR ({prompt} first in the template; "
                   "needs the peft extra)")
    return p


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


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

    info = {"event": "start", "config": dataclasses.asdict(config), "seed": config.seed, "device": str(device),
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


def run(config: TrainConfig) -> dict:
    """The whole job: load, check, train, write the outputs. Returns the last epoch's record."""
    from . import PromptTuner, load_model, load_pairs, subsample, train_test_split
    from .report import write_outputs
    from .session import Session

    if config.epochs < 0 or config.batch_size < 1 or not config.lr > 0 or not math.isfinite(config.lr):
        raise ConfigError("--epochs must be >= 0, --batch-size >= 1 and --lr > 0 (finite)")
    if config.prompt_len < 1 or config.prompt_len > 4096:
        raise ConfigError(f"--prompt-len must be between 1 and 4096, got {config.prompt_len}")
    device = resolve_device(config.device)
    out = config.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    session = Session(config, out, device)  # --out / --resume checks; torchrun's process group
    if config.peft_out is not None:  # the path, before anything is loaded (the template and peft: below)
        from .outputs import check_output_dir
        from .peft_io import ADAPTER_FILES

        check_output_dir(config.peft_out, "--peft-out", out, allowed=ADAPTER_FILES)
    device = session.device
    examples = load_pairs(config.data)
    train, test = train_test_split(examples, test_size=config.test_size, seed=config.seed)
    train = subsample(train, config.train_size, seed=config.seed)
    model, tokenizer = load_model(config.model, seed=config.seed, device=device)
    tuner = PromptTuner(model, tokenizer, config.template, config.prompt_len, engine=config.engine,
                        precision=config.precision, init=config.init, seed=config.seed, kernels=config.kernels,
                        cuda_graphs=config.cuda_graphs, method=config.method,
                        method_options=parse_options(config.method_opt))
    session.encode(tuner, examples, train, test)  # every template, data and context error, named by file and line
    if config.peft_out is not None:  # refused (template, directory, no peft) before anything is trained or written
        from .peft_io import check_peft_out

        check_peft_out(tuner, config.peft_out, out)
    session.prepare(tuner)  # checkpoint restored, first forward checked, --out locked, engine sharded
    # nothing has been written so far
    metrics_path = os.path.join(out, "metrics.jsonl")
    if session.is_main:
        os.makedirs(out, exist_ok=True)
        chosen = f" (precision auto: {tuner.precision})" if config.precision == "auto" else ""
        print(f"model {config.model} on {device} | engine {tuner.engine.describe()}{chosen} | {len(train)} train, "
              f"{len(test)} test examples | output {out}", flush=True)
        session.write_header(metrics_path, run_info(config, device), tuner)

    def log(record: dict) -> None:
        test_part = f"  test {record['test_loss']:.4f}" if "test_loss" in record else ""
        if "test_exact_match" in record:
            test_part += (f"  exact {100 * record['test_exact_match']:.1f}%  "
                          f"parrot {100 * record['test_parrot_rate']:.1f}%")
        print(f"epoch {record['epoch']}/{config.epochs}  train {record['train_loss']:.4f}{test_part}  "
              f"{record['seconds']:.1f}s", flush=True)
        append_line(metrics_path, json.dumps(record) + "\n")
        tuner.save(os.path.join(out, "prompt.safetensors"))

    session.fit(tuner, train, test, log)  # tuner.fit with checkpoints, signals, resume and ranks
    if not session.is_main:
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
            write_samples(os.path.join(out, "samples.txt"), tuner, test[: config.samples])
            done.append("samples.txt")
            write_text(os.path.join(out, "nearest.txt"), tuner.method.readout(tuner.prompt, k=5))
            done.append("nearest.txt")
            plot_losses(os.path.join(out, "loss.png"), tuner.history)
            done.append("loss.png")
            if config.peft_out is not None:
                tuner.save_peft(config.peft_out)
        except OutputsInterrupted:
            raise final_interrupted(signals.signum, out, done, config) from None
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


def write_samples(path: str, tuner, examples) -> None:
    """Greedy predictions as "Actual / Predicted" pairs, the post's format."""
    words = tuner.generate([{k: v for k, v in tuner.template.as_fields(ex).items() if k != "target"}
                            for ex in examples]) if examples else []
    lines = []
    for ex, word in zip(examples, words):
        fields = tuner.template.as_fields(ex)
        lines.append(f"Actual: {tuner.template.render(fields)}\n")
        lines.append(f"Predicted: {tuner.template.render({**fields, 'target': word or '?'})}\n\n")
    write_text(path, "".join(lines))


def plot_losses(path: str, history: list[dict]) -> None:
    import logging

    quiet = logging.getLogger("matplotlib")  # an unwritable cache directory: matplotlib uses a temporary one
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, loss.png skipped (pip install 'fastprompt[plot]')")
        return
    finally:
        quiet.setLevel(level)
    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["train_loss"] for r in history], label="train")
    if history and "test_loss" in history[0]:
        ax.plot(epochs, [r["test_loss"] for r in history], label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("target cross-entropy")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


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
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except FastpromptError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if not quiet:
            print(str(e), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        release_locks()  # the --out lock (the kernel drops it anyway when the process ends)
    return 0


if __name__ == "__main__":
    sys.exit(main())
