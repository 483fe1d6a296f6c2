"""FLOPs and bytes of one prompt-tuning step through a frozen GPT-2 (docs/ARCHITECTURE.md,
'Cost of a step'), so that a benchmark can print achieved GFLOP/s next to its time and a GPU step can be
held against its floor.

Counting (matmuls only; LayerNorm, GELU, softmax and embeddings are < 1 % at these shapes):

    forward, per transformer row and layer    24 d^2             (qkv 3d^2 + proj d^2 + fc 4d^2 + proj 4d^2, x2)
    attention, per row, layer and key         4 d                (QK^T and PV)
    LM head, per logit row                    2 d V
    input-gradient-only backward              = forward for every linear (dX = dY W^T, no dW),
                                              2x forward for attention (dQ, dK, dV, dP: four matmuls)

GPT-2 Large: 24 * 1280^2 * 36 = 1.42 GFLOP per token, 2 * 1280 * 50257 = 0.129 GFLOP per logit row.

Bytes: the fewest a step must move is every frozen weight read once per pass, forward and backward:
``2 * weight_bytes(shape)`` with the blocks and the LM head (tied to wte; the position table is only
gathered). At batch 64 this, not the FLOPs, bounds a GPT-2 Large step on an H100.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPT2Shape:
    n_layer: int
    d: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "GPT2Shape":
        return cls(int(config.n_layer), int(config.n_embd), int(config.vocab_size))

    @property
    def block_params(self) -> int:
        """Weights and biases of all transformer blocks and the final LayerNorm."""
        d = self.d
        per_layer = 12 * d * d + 13 * d  # 4 matrices (3d^2 + d^2 + 4d^2 + 4d^2) + their biases + 2 LayerNorms
        return self.n_layer * per_layer + 2 * d

    @property
    def head_params(self) -> int:
        return self.vocab * self.d


def forward_flops(shape: GPT2Shape, rows: float, logit_rows: float, keys_per_row: float = 0.0) -> float:
    """One forward pass over ``rows`` transformer rows, attention over ``keys_per_row`` keys on average,
    LM head on ``logit_rows`` rows."""
    d, L = shape.d, shape.n_layer
    return rows * L * (24 * d * d + 4 * d * keys_per_row) + logit_rows * 2 * d * shape.vocab


def step_flops(shape: GPT2Shape, rows: float, logit_rows: float, keys_per_row: float = 0.0) -> float:
    """Forward + input-gradient-only backward (what every engine here computes: no weight gradients)."""
    d, L = shape.d, shape.n_layer
    linear = rows * L * 24 * d * d + logit_rows * 2 * d * shape.vocab
    attention = rows * L * 4 * d * keys_per_row
    return 2 * linear + 3 * attention


def weight_bytes(shape: GPT2Shape, bytes_per_param: int = 2) -> int:
    """Frozen weights one pass reads (blocks + LM head), in bf16 by default."""
    return (shape.block_params + shape.head_params) * bytes_per_param


def bandwidth_floor_s(shape: GPT2Shape, copy_bytes_per_s: float, bytes_per_param: int = 2) -> float:
    """The fewest seconds a step can take: every weight read twice (forward, backward) at copy bandwidth."""
    return 2 * weight_bytes(shape, bytes_per_param) / copy_bytes_per_s


def gflops_per_s(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


if __name__ == "__main__":  # the numbers quoted in docs/ARCHITECTURE.md, 'Cost of a step'
    large = GPT2Shape(36, 1280, 50257)
    print(f"GPT-2 Large: {forward_flops(large, 1, 0) / 1e9:.3f} GFLOP/token, "
          f"{forward_flops(large, 0, 1) / 1e9:.3f} GFLOP/logit row, "
          f"bf16 weights {weight_bytes(large) / 1e9:.2f} GB, "
          f"floor at 3.35 TB/s {bandwidth_floor_s(large, 3.35e12) * 1e3:.2f} ms/step")
