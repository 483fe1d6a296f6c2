"""Loads the optional CUDA C++ extension ``fastprompt.kernels._C`` (csrc/): fused residual-add + LayerNorm launchers.

The op itself is ``fastprompt.kernels.layer_norm.add_layer_norm_cuda``: the Triton op's autograd function
with ``_C.add_layer_norm_fwd`` / ``_C.add_layer_norm_bwd`` as its launchers. Importing this module never
fails; ``require_ext`` raises a RuntimeError that says how to build the extension.
"""
from __future__ import annotations

import importlib

try:  # built by setup.py next to this file; by module name, not ``from . import``, which imports the package
    _C = importlib.import_module(f"{__package__}._C")
except ImportError as exc:  # not built (CPU-only install) or built against another torch
    _C = None
    _C_IMPORT_ERROR: str | None = f"{type(exc).__name__}: {exc}"
else:
    _C_IMPORT_ERROR = None

CUDA_EXT_AVAILABLE = _C is not None

BUILD_HINT = (
    "build it on a machine with a CUDA build of torch and nvcc: "
    "`FASTPROMPT_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
    "(FASTPROMPT_CUDA_ARCH picks the GPU architecture, default 90 = H100)"
)


def require_ext():
    """The extension module, or a RuntimeError that explains how to get it (read at call time, so tests
    can monkeypatch ``_C``)."""
    if _C is None:
        why = f" (import failed with {_C_IMPORT_ERROR})" if _C_IMPORT_ERROR else ""
        raise RuntimeError(
            f"add_layer_norm_cuda needs the CUDA extension fastprompt.kernels._C, which is not available{why}; "
            f"{BUILD_HINT}. The Triton op fastprompt.kernels.add_layer_norm needs no build step."
        )
    return _C
