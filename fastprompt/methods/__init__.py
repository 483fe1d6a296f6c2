"""Prompt parametrisations (``--method``): what is trained, and how it becomes the prompt an engine sees.

``base.py`` the interface ``Method``; ``soft.py``, ``relaxed.py``, ``hard.py``, ``prefix.py``, ``gcg.py`` the methods;
``init.py`` initial prompts. Here: the methods by name."""
from __future__ import annotations

from ..errors import ConfigError
from .base import Method
from .gcg import GcgMethod
from .hard import HardMethod
from .prefix import PrefixMethod
from .relaxed import RelaxedMethod
from .soft import SoftMethod

METHODS = {"soft": SoftMethod, "relaxed": RelaxedMethod, "hard": HardMethod, "prefix": PrefixMethod, "gcg": GcgMethod}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}: use one of {', '.join(METHODS)}")
    return METHODS[name]


def make_method(name: str, model, tokenizer, encoder, **options) -> Method:
    cls = method_class(name)
    try:
        return cls(model, tokenizer, encoder, **options)
    except TypeError as e:
        raise ConfigError(f"bad option for method {name!r}: {e}") from None
