"""What a checkpoint's JSON state and a run header may hold: keys, types and ranges, checked before any of
it is used (issue 23). One small validator, ``check``, over tables of ``Field``s; the tables:

    CHECKPOINT       the checkpoint's state (checkpoint.py writes exactly these keys)
    HISTORY          one finished epoch's record (tuner.fit)
    HEADER           a ``start`` / ``resume`` line of metrics.jsonl (train.run_info + session.write_header)
    config_fields()  the run's options, by default derived from their declaration (fastprompt/options.py)
                     with ``RANGES``; a caller that declares its options elsewhere passes its own table

A problem is returned as one phrase naming the field (``"config.lr must be a number > 0, got 'x'"``); the
caller adds the file. Optimizer settings are not in these tables: they come from the run's own options and
the file's must equal them (``checkpoint.check_optimizer``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

INT_LIMIT = 2**63  # integers without bounds of their own stay within +-2**63 (beyond: nonsense, and overflow)


@dataclass(frozen=True)
class Field:
    """``types``: names among int, float (an int is a float too), str, bool, list, dict, none. ``low`` /
    ``high``: inclusive bounds of a number (``low_open``: exclusive low); ``choices``: allowed values;
    ``required``: the key must be there; ``items``: a Field every list item must satisfy; ``fields``: the
    table of a nested dict (``rest``: the Field of keys not in it, None: no other keys)."""
    types: tuple[str, ...]
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple | None = None
    required: bool = True
    items: "Field | None" = None
    fields: "dict[str, Field] | None" = None
    rest: "Field | None" = None


def _type_of(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return {float: "float", str: "str", list: "list", dict: "dict"}.get(type(value), type(value).__name__)


def _describe(field: Field) -> str:
    names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "list": "a list", "dict": "a JSON object", "none": "null"}
    text = " or ".join(names.get(t, t) for t in field.types)
    if field.low is not None:
        text += f" {'>' if field.low_open else '>='} {field.low:g}"
    if field.high is not None:
        text += f"{',' if field.low is not None else ''} <= {field.high:g}"
    if field.choices is not None:
        text += f" (one of {', '.join(map(repr, field.choices))})"
    return text


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check(value: Any, field: Field, where: str) -> str | None:
    """What is wrong with ``value`` against ``field`` (one phrase naming ``where``), or None."""
    kind = _type_of(value)
    accepted = kind in field.types or (kind == "int" and "float" in field.types)
    if not accepted:
        return f"{where} must be {_describe(field)}, got {_shown(value)}"
    if kind in ("int", "float"):
        if kind == "float" and not math.isfinite(value):
            return f"{where} must be a finite number, got {value}"
        beyond = kind == "int" and ((field.high is None and value >= INT_LIMIT)
                                    or (field.low is None and value <= -INT_LIMIT))
        if beyond or (field.low is not None and (value <= field.low if field.low_open
                                                                   else value < field.low)) \
                or (field.high is not None and value > field.high):
            return f"{where} must be {_describe(field)}, got {_shown(value)}"
    if field.choices is not None and value is not None and value not in field.choices:
        return f"{where} must be {_describe(field)}, got {_shown(value)}"
    if kind == "list" and field.items is not None:
        for i, item in enumerate(value):
            problem = check(item, field.items, f"{where}[{i}]")
            if problem:
                return problem
    if kind == "dict" and field.fields is not None:
        return check_record(value, field.fields, where, field.rest)
    return None


def check_record(record: Any, fields: dict[str, Field], where: str, rest: Field | None = None) -> str | None:
    """``record`` is a dict whose keys are ``fields``' (the required ones all there; others only where
    ``rest`` says what they must be) and whose values satisfy them."""
    if not isinstance(record, dict):
        return f"{where} must be a JSON object, got {_type_of(record)} {_shown(record)}"
    for key, field in fields.items():
        if key not in record:
            if field.required:
                return f"{where} has no {key!r}"
            continue
        problem = check(record[key], field, f"{where}.{key}")
        if problem:
            return problem
    for key in record:
        if key in fields:
            continue
        if rest is None:
            return f"{where} holds {key!r}, which fastprompt never writes"
        problem = check(record[key], rest, f"{where}.{key}")
        if problem:
            return problem
    return None


# ------------------------------------------------------------------------------------------ tables
# Ranges of the options whose values the run refuses outside them (train.run, session.check_options).
RANGES = {
    "prompt_len": dict(low=1, high=4096), "epochs": dict(low=0), "batch_size": dict(low=1),
    "lr": dict(low=0, low_open=True), "train_size": dict(low=1), "test_size": dict(low=0, high=1),
    "seed": dict(low=-(2**63), high=2**64 - 1), "samples": dict(low=0), "checkpoint_every": dict(low=0),
    "eval_every": dict(low=0), "eval_size": dict(low=1), "max_steps": dict(low=0), "max_seconds": dict(low=0),
}


def option_types(option) -> tuple[str, ...]:
    """The JSON types an option's value may have in a run header or checkpoint, from its declaration
    (fastprompt/options.py): its argparse type (a flag: bool; ``append``: list), plus none where it may be unset."""
    if option.action in ("store_true", "store_false"):
        types: tuple[str, ...] = ("bool",)
    elif option.action == "append":  # a single-value default (--data): that value's type too
        types = ("list",) if option.default is None else ("str", "list")
    else:
        types = ({int: "int", float: "float"}.get(option.type, "str"),)
    return types + ("none",) if option.default is None or option.unset is not None else types


def config_fields(options=None, required=(), ranges=None) -> dict[str, Field]:
    """The table of a run's options: one Field per declared option (default ``options.OPTIONS``), its types
    from the declaration, its range from ``ranges`` (default ``RANGES``); ``required``: the keys that must be
    there (what a resume compares); the data files' sha256 keys (``options.hash_keys``) are added."""
    from . import options as declared

    options = declared.OPTIONS if options is None else options
    ranges = RANGES if ranges is None else ranges
    table = {o.name: Field(option_types(o), required=o.name in required, **ranges.get(o.name, {})) for o in options}
    for name in ("method_opt", "sweep"):
        if name in table:
            table[name] = dataclasses.replace(table[name], items=Field(("str",)))
    for key in declared.hash_keys():
        table[key] = Field(("str", "none"), required=False)
    return table


COUNT = Field(("int",), low=0)
NUMBER = Field(("float",))
SECONDS = Field(("float",), low=0)

HISTORY = {"epoch": Field(("int",), low=1), "step": COUNT, "train_loss": Field(("float", "none")),
           "train_seconds": SECONDS, "eval_seconds": Field(("float",), low=0, required=False),
           "seconds": SECONDS}
HISTORY_REST = Field(("float", "none"))  # test_loss, test_exact_match, ...: numbers (an epoch without tokens: NaN)


def checkpoint_fields(config: dict[str, Field]) -> dict[str, Field]:
    from .methods import METHODS

    record = Field(("dict",), fields=HISTORY, rest=HISTORY_REST)
    return {
        "format": Field(("str",)), "fastprompt_version": Field(("str",)), "time": Field(("str",)),
        "epoch": COUNT, "step": COUNT, "ce_sum": NUMBER, "n_tokens": COUNT,
        "history": Field(("list",), items=record),
        "method": Field(("dict",), fields={"name": Field(("str",), choices=tuple(METHODS)), "step": COUNT,
                                           "total_steps": COUNT}),
        "model": Field(("str",)), "hidden_size": Field(("int",), low=1), "prompt_len": Field(("int",), low=1, high=4096),
        "template": Field(("str",)), "seed": Field(("int",), low=-(2**63), high=2**64 - 1),
        "config": Field(("dict",), fields=config),
        "optimizer": Field(("dict",), fields={"param_groups": Field(("list",), items=Field(("dict",), fields={},
                                                                                             rest=Field(("float", "bool", "none", "list", "str")))),
                                              "state": Field(("dict",), fields={}, rest=Field(("dict",)))}),
        "n_params": Field(("int",), low=1), "cuda_rng_states": COUNT,
        "tensors": Field(("dict",), fields={}, rest=Field(("list",), items=COUNT)),
        "checksum": Field(("str",)),
    }


def header_fields(config: dict[str, Field]) -> dict[str, Field]:
    from .options import hash_keys

    text = Field(("str",), required=False)
    return {
        "event": Field(("str",), choices=("start", "resume")), "config": Field(("dict",), fields=config),
        "seed": Field(("int",), low=-(2**63), high=2**64 - 1, required=False), "device": text,
        "device_name": text, "versions": Field(("dict",), fields={}, rest=Field(("str",)), required=False),
        "world_size": Field(("int",), low=1, required=False), "backend": Field(("str", "none"), required=False),
        "torch_threads": Field(("int",), low=1, required=False),
        "deterministic_algorithms": Field(("bool",), required=False),
        **{key: Field(("str", "none"), required=False) for key in hash_keys()},  # data_sha256, eval_data_sha256
        "from_epoch": Field(("int",), low=1, required=False), "from_step": Field(("int",), low=0, required=False),
    }
