"""Shared plumbing for the Triton kernels: the optional-import guard and small launch helpers.

Importing ``fastprompt.kernels`` never fails where Triton is missing: ``triton`` / ``tl`` become inert
stand-ins so the ``@triton.jit`` definitions still parse, and every launcher calls ``require_triton``
first, which raises with the install hint.
"""
import os

import torch

try:  # Triton is optional (Linux-only wheels); a broken install must not break import either.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
    _TRITON_IMPORT_ERROR = None
except Exception as exc:  # noqa: BLE001 - ImportError, or a broken install raising anything else
    TRITON_AVAILABLE = False
    _TRITON_IMPORT_ERROR = exc

    class _Missing:
        """Stands in for `triton` and `triton.language`: decorators return the function unchanged,
        attribute access (tl.constexpr, tl.float32, ...) returns the stand-in itself."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]  # used as a bare decorator
            return self  # used as a decorator factory: @triton.jit(...), @triton.heuristics({...})

    triton = tl = _Missing()

INSTALL_HINT = (
    "fastprompt.kernels needs Triton for this function: `pip install triton` (Linux, CUDA GPU), "
    "or use the torch ops (fastprompt.engines.ops, kernels='torch')."
)


COMPILE_ONLY = [False]  # True inside compile_check.compile_only(): launches compile for a target, never run


def require_triton(*tensors):
    """Raise a clear error where a Triton kernel cannot run on these tensors."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{INSTALL_HINT} (import failed: {_TRITON_IMPORT_ERROR!r})")
    if interpreting() or COMPILE_ONLY[0]:
        return
    for t in tensors:
        if t is not None and not t.is_cuda:
            raise RuntimeError(
                "fastprompt.kernels Triton kernels need CUDA tensors (got a tensor on "
                f"{t.device}); use the torch ops (kernels='torch') on CPU, or set TRITON_INTERPRET=1 "
                "before importing triton to run them (slowly) in the interpreter."
            )


def interpreting():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def check_float(t, name):
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def use_lowp_dot(*tensors):
    """tl.dot on 16-bit operands (tensor cores) on the GPU. The interpreter computes bf16 wrongly,
    so there every operand is upcast to fp32 right after its load and the dot runs in fp32."""
    return (not interpreting()) and all(t.dtype in (torch.bfloat16, torch.float16) for t in tensors)
