"""Every option of ``python -m fastprompt.train``, declared once (docs/ARCHITECTURE.md, 'Options').

``OPTIONS`` holds one ``Option`` an option: its name (the config field, the run header's key and, with
dashes, the flag), type, default, help, its check, what ``--resume`` does with it, and its API twins. Built
from it, nowhere written again:

    build_parser()      argparse
    TrainConfig         the config dataclass (train.py)
    validate(config)    every declared check, before anything is loaded; unset values filled (``unset``)
    header_config()     the ``config`` of the run header and of the checkpoint
    content_hashes()    the sha256 of every data file option (``resume=CONTENT``)
    check_resume()      ``--resume``: the saved config against this run's
    api_defaults(), check_api()   the defaults and checks of PromptTuner's keywords of the same name

Adding an option: one ``Option`` below (and the code that uses its value), plus its test in
tests/test_options.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Any, Callable

from .data import content_hash
from .errors import SEED_RANGE, ConfigError, UsageParser
from .template import DEFAULT_TEMPLATE

MATCH = "match"  # --resume refuses another value
CONTENT = "content"  # a data file: --resume refuses other contents (by sha256: the same bytes by another path pass)
FREE = "free"  # may change on --resume (what is computed stays the same: epochs, engine, device, outputs, ...)
SAME = object()  # api_default: the API's default is the CLI's


@dataclass(frozen=True)
class Option:
    name: str  # config field and run-header key; the flag is --name-with-dashes unless ``flag`` says otherwise
    default: Any
    help: str  # argparse's help (%(default)s allowed)
    type: Callable[[str], Any] | None = str  # argparse's type (None for flags)
    check: Callable[[Any], str | None] | None = None  # what is wrong with a value (None: nothing); None values skip it
    checked_by: str = ""  # where the value is checked instead, by the code that knows the values
    resume: str = FREE  # MATCH, CONTENT or FREE
    api: tuple[str, ...] = ()  # API functions that take it as a keyword of the same name
    api_default: Any = SAME  # the API's default, where it deliberately differs from the CLI's
    unset: Callable[[Any], Any] | None = None  # the value of an option left at None, from the whole config
    flag: str = ""
    action: str | None = None  # argparse's action for flags and lists: store_true, store_false, append
    metavar: str | None = None

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def hash_key(self) -> str:
        """The run header's and the checkpoint's key for a data file's sha256 (``resume=CONTENT``)."""
        return f"{self.name}_sha256"

    def problem(self, value: Any, shown: str) -> str | None:
        """The one-line error for ``value`` under the name ``shown`` (``--lr`` or ``lr``), or None."""
        if value is None or self.check is None:
            return None
        why = self.check(value)
        return f"{shown} {why}" if why else None


# ------------------------------------------------------------------------------------------ checks
def at_least(minimum: float, kind: str = "an integer") -> Callable[[Any], str | None]:
    """An int (``kind`` "an integer") or a real number (``kind`` "a number") >= ``minimum``."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum \
                or (kind == "an integer" and not isinstance(value, int)):
            return f"must be {kind} >= {minimum:g}, got {value!r}"
        return None

    return check


def positive_finite(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        return f"must be a finite number > 0, got {value!r}"
    return None


def learning_rate(value) -> str | None:
    """Finite, > 0, and at most 1e37: Adam's first step is lr / (1 - beta1) = 10 lr, which must fit a float32
    (torch raises an overflow error inside the optimizer otherwise)."""
    error = positive_finite(value)
    if error is None and value > 1e37:
        return f"must be at most 1e37 (Adam's first step, 10 × lr, must fit a float32), got {value!r}"
    return error


def prompt_length(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        return f"must be a positive integer (at most 4096), got {value!r}"
    return None


def share(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        return f"must be a share in [0, 1), got {value!r}"
    return None


def seed_range(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        return f"must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), got {value!r}"
    return None


def directory_name(value) -> str | None:
    return "is empty: give a directory" if value == "" else None


def words(value) -> str | None:
    return None if value.strip() else f"takes words, got {value!r}"


def every_n(value) -> str | None:
    problem = at_least(0)(value)
    return problem and problem.replace(", got", " (0: epoch ends only), got")


REPORT_TO = ("none", "tensorboard")


def report_to(value) -> str | None:
    if value not in REPORT_TO:
        return f"takes {' or '.join(REPORT_TO)}, got {value!r}"
    if value == "tensorboard":
        from .reporters import tensorboard_missing

        return tensorboard_missing()
    return None


# ------------------------------------------------------------------------------------- the options
OPTIONS: tuple[Option, ...] = (
    Option("model", "gpt2-large", "hub name, local directory, or 'tiny' (default: %(default)s)",
           checked_by="models.load_model", resume=MATCH),
    Option("data", "antonyms", "'antonyms' or a .csv/.jsonl file (default: antonyms); given several times, one "
           "prompt per task, trained in one pass, each on its own split (fastprompt/sweep.py)",
           checked_by="data.load_pairs", resume=CONTENT, action="append"),
    Option("eval_data", None, "a test set of your own, in any --data format: evaluated instead of a split of "
           "--data, which is then not split (all of it trains) unless --test-size is given", metavar="PATH",
           checked_by="data.load_pairs", resume=CONTENT),
    Option("template", DEFAULT_TEMPLATE, "template with {prompt} and a final {target}",
           checked_by="template.Template", resume=MATCH, api=("PromptTuner",)),
    Option("prompt_len", 4, "trainable prompt vectors (default: 4)", type=int, check=prompt_length, resume=MATCH,
           api=("PromptTuner",)),
    Option("init", "random", "random | vocab | text:WORDS | file:PROMPT.safetensors (default: random)",
           checked_by="methods.init", resume=MATCH, api=("PromptTuner",)),
    Option("epochs", 100, "passes over the training split (default: 100)", type=int, check=at_least(0),
           api=("PromptTuner.fit",), api_default=10),
    Option("batch_size", 64, "examples a step (default: 64)", type=int, check=at_least(1), resume=MATCH,
           api=("PromptTuner.fit",)),
    Option("lr", 1e-3, "Adam learning rate (default: 1e-3)", type=float, check=learning_rate, resume=MATCH,
           api=("PromptTuner.fit",)),
    Option("engine", "auto", "auto | naive | generic | fused (default: auto)", checked_by="engines.make_engine",
           api=("PromptTuner",)),
    Option("precision", "auto", "auto | fp32 | bf16 | autocast (default: auto = bf16 weights with an fp32 prompt "
           "on CUDA, fp32 on the CPU)", checked_by="engines.make_engine", api=("PromptTuner",)),
    Option("kernels", "auto", "fused engine kernels: auto | triton | cuda | torch",
           checked_by="engines.engine_options, engines.ops.get_ops"),
    Option("cuda_graphs", "auto", "auto | on | off (fused engine on CUDA)", checked_by="engines.engine_options"),
    Option("train_size", None, "subsample the training split to N examples", type=int, check=at_least(1),
           resume=MATCH),
    Option("test_size", None, "test share of --data (default: 0.2; with --eval-data 0, no split)", type=float,
           check=share, resume=MATCH, unset=lambda config: 0.0 if config.eval_data else 0.2),
    Option("seed", 1337, "split, init and shuffling seed (default: 1337)", type=int, check=seed_range, resume=MATCH,
           api=("PromptTuner",)),
    Option("device", "auto", "auto | cpu | cuda", checked_by="train.resolve_device"),
    Option("out", None, "output directory (default: runs/<date-time>)", check=directory_name,
           checked_by="session.check_out"),
    Option("samples", 20, "test examples written to samples.txt", type=int, check=at_least(0)),
    Option("method", "soft", "soft | relaxed | hard | prefix | gcg (default: soft)", checked_by="methods.make_method",
           resume=MATCH, api=("PromptTuner",)),
    Option("method_opt", None, "a method option, repeatable (relaxed: tau_start, tau_end, init_std, lr_scale, "
           "gumbel; hard: metric, lr_scale)", action="append", metavar="KEY=VALUE",
           checked_by="train.parse_options, the method", resume=MATCH),
    Option("gcg_top_k", 32, "gcg: token swaps considered per prompt position, the top k of the one-hot gradient "
           "(default: %(default)s)", type=int, check=at_least(1), metavar="K", resume=MATCH),
    Option("gcg_candidates", 16, "gcg: candidate token prompts evaluated exactly per step, on the step's batch "
           "(default: %(default)s)", type=int, check=at_least(1), metavar="N", resume=MATCH),
    Option("gcg_ascii_only", False, "gcg: only ASCII-letter tokens (words and word pieces, with or without a "
           "leading space); otherwise any printable, non-special token", type=None, action="store_true",
           checked_by="argparse", resume=MATCH),
    Option("progress", True, "no progress bars", type=None, flag="--no-progress", action="store_false",
           checked_by="argparse"),
    Option("checkpoint_every", 0, "also checkpoint every N steps (default: epoch ends and SIGINT/SIGTERM only)",
           type=int, check=every_n, metavar="N"),
    Option("eval_every", 10, "generation metrics (exact match, parrot rate) every N epochs and at the end; the test "
           "loss is computed every epoch (default: %(default)s; 0: at the end only)", type=int, check=at_least(0),
           metavar="N", api=("PromptTuner.fit",), api_default=0),
    Option("eval_size", 500, "generation metrics on at most N test examples (default: %(default)s); the decoded word "
           "counts as a match when it equals the target (or, for parrot rate, an input) after stripping "
           "surrounding punctuation and whitespace, case-insensitively; the raw comparison is logged as *_strict",
           type=int, check=at_least(1), metavar="N", api=("PromptTuner.fit",), api_default=None),
    Option("max_steps", None, "stop after N optimizer steps in all (a resumed run counts its earlier steps)",
           type=int, check=at_least(0), metavar="N", api=("PromptTuner.fit",)),
    Option("max_seconds", None, "stop training after S seconds of this invocation (at the end of a step)",
           type=float, check=at_least(0, "a number"), metavar="S", api=("PromptTuner.fit",)),
    Option("resume", False, "continue the checkpoint in --out", type=None, action="store_true",
           checked_by="session.Session"),
    Option("overwrite", False, "allow a non-empty --out without --resume", type=None, action="store_true",
           checked_by="session.Session"),
    Option("peft_out", None, "also write the trained prompt as a PEFT adapter to DIR ({prompt} first in the "
           "template; needs the peft extra)", metavar="DIR", checked_by="peft_io.check_peft_out"),
    Option("shard_weights", False, "under torchrun (2+ processes): shard the frozen model's layers across the "
           "processes (FSDP2; every engine; fastprompt/sharding.py)", type=None, action="store_true",
           checked_by="sharding.check_context, sharding.check_engine"),
    Option("baseline", None, "a hand-written prompt, e.g. antonyms: its words (as many vectors as they have tokens, "
           "untrained) evaluated on the same test examples and shown beside the trained prompt at the end",
           check=words, metavar="WORDS"),
    Option("sweep", None, "train a grid of prompts in one pass (every prompt length too), repeatable (product "
           "grid): KEY=V1,V2,... with KEY one of lr, init, seed, batch_size, epochs, max_steps, prompt_len; one "
           "folder per point in --out, sweep.md / sweep.json / sweep.png beside them (fastprompt/sweep.py)", action="append", metavar="KEY=V1,V2",
           checked_by="sweep.parse_sweep", resume=MATCH),
    Option("report_to", "none", "also log the metrics and samples to: none | tensorboard (in --out/tensorboard/; "
           "needs the tensorboard extra) (default: %(default)s)", check=report_to),
)
BY_NAME = {option.name: option for option in OPTIONS}

TrainConfig = dataclasses.make_dataclass(
    "TrainConfig", [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS])
TrainConfig.__module__ = __name__
TrainConfig.__doc__ = "The options of ``python -m fastprompt.train``, as ``OPTIONS`` declares them."


# ------------------------------------------------------------------------------------- built from it
def build_parser() -> argparse.ArgumentParser:
    p = UsageParser(prog="python -m fastprompt.train",
                    description="Learn a soft prompt by backpropagation through a frozen causal LM.")
    for o in OPTIONS:
        kwargs: dict[str, Any] = {"dest": o.name, "default": o.default, "help": o.help}
        if o.action:
            kwargs["action"] = o.action
        if o.type is not None and o.type is not str and o.action in (None, "append"):
            kwargs["type"] = o.type
        if o.action == "append":  # argparse appends to the default: a single-value default is filled in later
            kwargs["default"] = None
        if o.metavar:
            kwargs["metavar"] = o.metavar
        p.add_argument(o.cli, **kwargs)
    return p


def parse_config(argv=None):
    args = build_parser().parse_args(argv)
    return TrainConfig(**{o.name: repeated(o, getattr(args, o.name)) for o in OPTIONS})


def repeated(o: Option, value):
    """A repeatable option whose default is one value (``--data``): not given, the default; given once, that
    value; several times, a tuple of them. Other options' values unchanged."""
    if o.action != "append" or o.default is None:
        return value
    if value is None:
        return o.default
    return value[0] if len(value) == 1 else tuple(value)


def validate(config):
    """Every declared check (``ConfigError``, one line naming the flag), then the unset options filled in:
    the config the run uses and records."""
    for o in OPTIONS:
        problem = o.problem(getattr(config, o.name), o.cli)
        if problem:
            raise ConfigError(problem)
    filled = {o.name: o.unset(config) for o in OPTIONS if o.unset is not None and getattr(config, o.name) is None}
    return dataclasses.replace(config, **filled)


def header_config(config) -> dict[str, Any]:
    """Every option's value by name: the run header's and the checkpoint's ``config``."""
    return {o.name: getattr(config, o.name) for o in OPTIONS}


def content_hashes(config) -> dict[str, str | None]:
    """``{NAME_sha256: sha256 of the file}`` for every data file option (None where unset or unreadable)."""
    return {o.hash_key: (content_hash(getattr(config, o.name)) if getattr(config, o.name) is not None else None)
            for o in OPTIONS if o.resume == CONTENT}


def hash_keys() -> tuple[str, ...]:
    return tuple(o.hash_key for o in OPTIONS if o.resume == CONTENT)


def resume_keys() -> tuple[str, ...]:
    """The options ``--resume`` compares (MATCH by value, CONTENT by the file's sha256)."""
    return tuple(o.name for o in OPTIONS if o.resume != FREE)


def check_resume(saved: dict[str, Any], config: dict[str, Any], path: str) -> None:
    """The resumed run must compute what the saved one did: every MATCH option equal, every CONTENT option's
    file the same bytes (where both sides have its sha256; else the value). Options missing from ``saved``
    (written before they existed) pass."""
    for o in OPTIONS:
        if o.resume == FREE:
            continue
        key, flag = o.name, o.cli
        if o.resume == CONTENT and saved.get(o.hash_key) and config.get(o.hash_key):  # the same bytes, any path
            if saved[o.hash_key] != config[o.hash_key]:
                raise ConfigError(f"{flag} {config.get(key)} is not the data {path} was written with (its contents "
                                  f"differ: sha256 {config[o.hash_key][:12]}..., the run's {saved[o.hash_key][:12]}"
                                  "...): resume with that data, or start afresh in another --out")
            continue
        if key in saved and key in config and saved[key] != config[key]:
            raise ConfigError(f"{path} was written with {flag} {saved[key]!r}, this run has {config[key]!r}: "
                              f"resume with the same {flag}, or start afresh in another --out")


def api_defaults(where: str) -> types.SimpleNamespace:
    """The defaults of ``where``'s keywords that are options (``api_defaults("PromptTuner.fit").batch_size``)."""
    return types.SimpleNamespace(**{o.name: o.default if o.api_default is SAME else o.api_default
                                    for o in OPTIONS if where in o.api})


def check_api(where: str, **values) -> None:
    """The declared checks of ``where``'s keywords, the messages naming the keyword (``ConfigError``)."""
    for name, value in values.items():
        o = BY_NAME[name]
        assert where in o.api, f"{name} is not declared as a keyword of {where}"
        problem = o.problem(value, name)
        if problem:
            raise ConfigError(problem)
