"""Triton kernels for the packed (fused) engine, imported as ``fastprompt.kernels``.

One op a file: Triton kernel -> launcher -> autograd.Function -> public function; ``add_layer_norm_cuda`` is
the same function with the CUDA C++ extension's launchers. Only input gradients: weights are frozen
everywhere. Each op's torch implementation (``<op>_ref``: the CPU path, and these kernels' reference in tests and
benchmarks) is in the op's own file, after its kernel; ``fastprompt.engines.ops`` re-exports it.
Importing this package never needs Triton (``TRITON_AVAILABLE`` says whether it is there); calling a
Triton function without it raises with the install hint.
"""
from ._common import TRITON_AVAILABLE
from .bias_gelu import bias_gelu
from .layer_norm import add_layer_norm, add_layer_norm_cuda
from .linear import linear
from .lm_head_ce import lm_head_ce
from .tree_attention import tree_attention
from .rms_norm import add_rms_norm  # the other families' ops (Llama kind, Gemma 3)
from .rotary import rotary
from .gated_act import gated_act

__all__ = [
    "TRITON_AVAILABLE", "add_layer_norm", "add_layer_norm_cuda", "bias_gelu", "linear", "lm_head_ce", "tree_attention",
    "add_rms_norm", "rotary", "gated_act",
]
