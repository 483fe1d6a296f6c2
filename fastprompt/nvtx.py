"""NVTX ranges around the training step's phases, for Nsight Systems (``nsys profile``).

Uses the ``nvtx`` package when it is installed (``pip install 'fastprompt[nvtx]'``), else does nothing:
no cost and no dependency on machines without it.
"""
from __future__ import annotations

import contextlib

try:
    import nvtx as _nvtx
except ImportError:
    _nvtx = None

NVTX_AVAILABLE = _nvtx is not None


def nvtx_range(name: str):
    """``with nvtx_range("forward"): ...`` — a named range on the NVTX timeline, or a no-op."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, color="green", domain="fastprompt")
