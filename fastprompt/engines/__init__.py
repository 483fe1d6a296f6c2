"""Engines: same loss, same prompt gradient, different amounts of work (docs/ARCHITECTURE.md, 'Engines')."""
from __future__ import annotations

from ..errors import ConfigError
from ..models import is_gpt2_family
from .base import PRECISIONS, Engine, resolve_precision

ENGINES = ("auto", "naive", "generic", "fused")


def resolve_engine_name(name: str, model) -> str:
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    if name == "auto":
        return "fused" if is_gpt2_family(model) else "generic"
    if name == "fused" and not is_gpt2_family(model):
        raise ConfigError("the fused engine supports the GPT-2 family only; use --engine generic for this model")
    return name


def make_engine(name: str, model, encoder, precision: str = "fp32", **options) -> Engine:
    """Build the engine ``name`` (``auto`` resolved for ``model``); ``options`` go to fast engines."""
    precision = resolve_precision(precision, next(model.parameters()).device, name)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use auto or one of {', '.join(PRECISIONS)}")
    name = resolve_engine_name(name, model)
    if name == "naive":
        from .naive import NaiveEngine

        return NaiveEngine(model, encoder, precision)
    if name == "generic":
        from .generic import GenericEngine

        return GenericEngine(model, encoder, precision, **options)
    from .fused import FusedEngine

    return FusedEngine(model, encoder, precision, **options)
