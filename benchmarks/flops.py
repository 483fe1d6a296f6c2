"""FLOPs and bytes of one prompt-tuning step through a frozen GPT-2 or another family (docs/ARCHITECTURE.md,
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

Other families (``ModelShape``, ``shape_of(config)``): per row and layer ``2 * (d (q + 2 kv) + q d + m d I)``
(q = H * head_dim, kv = K/V heads * head_dim, m = 3 for a gated MLP: gate, up, down); attention 4 q per key;
the LM head 2 d V. The GPT-2 formulas are this with q = kv = d, m = 2, I = 4d.
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


@dataclass(frozen=True)
class ModelShape:
    """Any family: the sizes the step's matmuls depend on."""

    n_layer: int
    d: int
    vocab: int
    q_dim: int  # heads * head_dim
    kv_dim: int  # K/V heads * head_dim
    inner: int  # MLP width
    gated: bool
    tied: bool = True

    @property
    def linear_params(self) -> int:
        """Matmul weights of one layer."""
        return self.d * (self.q_dim + 2 * self.kv_dim) + self.q_dim * self.d + (3 if self.gated else 2) * self.d * self.inner

    @property
    def block_params(self) -> int:
        return self.n_layer * (self.linear_params + 4 * self.d) + self.d

    @property
    def head_params(self) -> int:
        return self.vocab * self.d


def shape_of(config):
    """``GPT2Shape`` for GPT-2 configs, else a ``ModelShape`` from a Hugging Face config."""
    if getattr(config, "model_type", None) == "gpt2":
        return GPT2Shape.from_config(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return ModelShape(int(config.num_hidden_layers), int(config.hidden_size), int(config.vocab_size), heads * head_dim,
                      kv * head_dim, int(config.intermediate_size), True, bool(getattr(config, "tie_word_embeddings", True)))


def _per_row(shape) -> tuple[float, float]:
    """(linear FLOPs per row and layer, attention FLOPs per row, layer and key), forward."""
    if isinstance(shape, ModelShape):
        return 2 * shape.linear_params, 4 * shape.q_dim
    return 24 * shape.d * shape.d, 4 * shape.d


def forward_flops(shape: GPT2Shape, rows: float, logit_rows: float, keys_per_row: float = 0.0) -> float:
    """One forward pass over ``rows`` transformer rows, attention over ``keys_per_row`` keys on average,
    LM head on ``logit_rows`` rows."""
    lin, att = _per_row(shape)
    return rows * shape.n_layer * (lin + att * keys_per_row) + logit_rows * 2 * shape.d * shape.vocab


def step_flops(shape: GPT2Shape, rows: float, logit_rows: float, keys_per_row: float = 0.0) -> float:
    """Forward + input-gradient-only backward (what every engine here computes: no weight gradients)."""
    lin, att = _per_row(shape)
    linear = rows * shape.n_layer * lin + logit_rows * 2 * shape.d * shape.vocab
    attention = rows * shape.n_layer * att * keys_per_row
    return 2 * linear + 3 * attention


def weight_bytes(shape: GPT2Shape, bytes_per_param: int = 2) -> int:
    """Frozen weights one pass reads (blocks + LM head), in bf16 by default."""
    return (shape.block_params + shape.head_params) * bytes_per_param  # tied or not: the embedding is only gathered


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
