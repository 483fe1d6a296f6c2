"""Engines: same loss, same prompt gradient, different amounts of work (docs/ARCHITECTURE.md, 'Engines')."""
from __future__ import annotations

from ..errors import ConfigError
from ..families import family_of
from ..families.base import FamilyError
from .base import PRECISIONS, Engine, resolve_precision

ENGINES = ("auto", "naive", "generic", "fused")
# Each engine's options and their defaults. An option of another engine is accepted at its default (the CLI
# passes --kernels/--cuda-graphs whatever the engine) and refused at any other value: it would do nothing.
ENGINE_OPTIONS = {
    "naive": {},
    "generic": {"layout": "auto"},
    "fused": {"kernels": "auto", "cuda_graphs": "auto", "self_check": True},
}
# The values an option takes, where they are a fixed set (``kernels`` is checked by ``ops.get_ops``, which
# knows which implementations exist).
OPTION_VALUES = {
    "layout": ("auto", "packed", "padded"),
    "cuda_graphs": ("auto", "on", "off"),
    "self_check": (True, False),
}
CLI_OPTIONS = ("kernels", "cuda_graphs")  # engine options the CLI passes as --kernels / --cuda-graphs


def engine_options(name: str, options: dict) -> dict:
    """The options of engine ``name`` (resolved, not ``auto``) out of ``options``, their values checked: the
    one place engine options are validated. A name no engine knows, a value the option does not take, or
    another engine's option set to a non-default value, is a ``ConfigError``."""
    known = {key: engine for engine, opts in ENGINE_OPTIONS.items() for key in opts}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown engine option{'s' * (len(unknown) > 1)} {', '.join(unknown)}: the engines take "
                          f"{', '.join(sorted(known))}")
    own = ENGINE_OPTIONS[name]
    for key, value in options.items():
        allowed = OPTION_VALUES.get(key)
        if allowed is not None and (value not in allowed or type(value) is not type(allowed[0])):
            flag = f" (--{key.replace('_', '-')})" if key in CLI_OPTIONS else ""
            raise ConfigError(f"unknown {key}{flag} {value!r}: use {', '.join(str(v) for v in allowed)}")
        if key not in own and value != ENGINE_OPTIONS[known[key]][key]:
            raise ConfigError(f"{key}={value!r} is an option of the {known[key]} engine; the {name} engine "
                              "does not use it")
    return {key: value for key, value in options.items() if key in own}


def resolve_engine_name(name: str, model) -> str:
    """``auto`` is ``fused`` where the model's ``model_type`` has a family (families/), else ``generic``;
    ``fused`` on a model without a family is refused. (A family may still refuse one setting of the config
    when the engine reads the weights: ``make_engine`` then falls back from ``auto`` to ``generic``.)"""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    if getattr(model, "_fastprompt_shards", None) is not None:  # sharded layers (fastprompt/sharding.py)
        from ..sharding import check_engine

        name = check_engine(name)
    try:
        family_of(model)
    except FamilyError as e:
        if name == "fused":
            raise
        return "generic" if name == "auto" else name
    return "fused" if name == "auto" else name


def make_engine(name: str, model, encoder, precision: str = "fp32", **options) -> Engine:
    """Build the engine ``name`` (``auto`` resolved for ``model``) with its ``options`` (``ENGINE_OPTIONS``)."""
    precision = resolve_precision(precision, next(model.parameters()).device, name)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use auto or one of {', '.join(PRECISIONS)}")
    requested = name
    name = resolve_engine_name(name, model)
    options = engine_options(name, options)
    if requested == "auto" and name == "fused":
        from .fused import FusedEngine

        try:
            return FusedEngine(model, encoder, precision, **options)
        except FamilyError as e:  # a setting the family does not implement: the generic engine runs it
            from .generic import GenericEngine  # (the fused options, kernels/graphs, do nothing there)

            engine = GenericEngine(model, encoder, precision)
            engine.auto_reason = str(e)
            return engine
    if requested == "auto" and name == "generic":
        from .generic import GenericEngine

        engine = GenericEngine(model, encoder, precision, **options)
        try:
            family_of(model)
        except FamilyError as e:
            engine.auto_reason = str(e)
        return engine
    if name == "naive":
        from .naive import NaiveEngine

        return NaiveEngine(model, encoder, precision)
    if name == "generic":
        from .generic import GenericEngine

        return GenericEngine(model, encoder, precision, **options)
    from .fused import FusedEngine

    return FusedEngine(model, encoder, precision, **options)
