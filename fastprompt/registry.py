"""The methods by name (``--method``): ``soft`` / ``relaxed`` / ``hard`` (``fastprompt/methods.py``) and
``prefix`` (``fastprompt/prefix.py``). Above both, so that neither imports the other's module."""
from __future__ import annotations

from .errors import ConfigError
from .methods import METHODS, HardMethod, Method, RelaxedMethod
from .prefix import PrefixMethod


def method_class(name: str):
    if name == "soft":
        return Method
    if name == "relaxed":
        return RelaxedMethod
    if name == "hard":
        return HardMethod
    if name == "prefix":
        return PrefixMethod
    raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")


def make_method(name: str, model, tokenizer, encoder, **options) -> Method:
    cls = method_class(name)
    try:
        return cls(model, tokenizer, encoder, **options)
    except TypeError as e:
        raise ConfigError(f"bad option for method {name!r}: {e}") from None
