"""Triton kernels for the fused GPT-2 engine, imported as ``fastprompt.kernels``.

One op a file: Triton kernel -> launcher -> autograd.Function -> public function, with a plain-torch
reference (``*_ref``) beside it. Only input gradients: weights are frozen everywhere.
Importing this package never needs Triton (``TRITON_AVAILABLE`` says whether it is there); calling a
Triton function without it raises with the install hint. The ``*_ref`` functions work everywhere.
"""
from ._common import TRITON_AVAILABLE
from .bias_gelu import bias_gelu, bias_gelu_ref
from .layer_norm import add_layer_norm, add_layer_norm_ref
from .linear import linear, linear_ref
from .lm_head_ce import lm_head_ce, lm_head_ce_ref
from .tree_attention import tree_attention, tree_attention_ref

__all__ = [
    "TRITON_AVAILABLE",
    "add_layer_norm", "add_layer_norm_ref",
    "bias_gelu", "bias_gelu_ref",
    "linear", "linear_ref",
    "lm_head_ce", "lm_head_ce_ref",
    "tree_attention", "tree_attention_ref",
]
