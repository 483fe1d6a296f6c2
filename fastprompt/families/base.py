"""What a model family gives the packed engine: its weights as shared pieces (docs/ARCHITECTURE.md, 'Families').

A family module (``gpt2.py``, ``llama.py``, ``gemma3.py``) reads a Hugging Face model into a ``ModelWeights``:
detached views of the frozen weights (copies only where a layout is converted once: q/k/v and gate/up
concatenated into one GEMM each, or a bf16 copy), every setting the forward needs as plain values. The
engine (``engines/fused.py``) runs any ``ModelWeights`` through the same ops and never names a family.

Under ``--shard-weights`` (fastprompt/sharding.py) a sharded parameter (a DTensor) reads as a meta tensor of
its full shape: the read is then a skeleton (every setting, shapes, the unsharded tensors), and the fused
engine reads each layer's tensors with ``read_block`` while the layer is gathered.

Linear weights are in the ``(in, out)`` layout of ``ops.linear`` (GPT-2's Conv1D as it is; ``nn.Linear``'s
``(out, in)`` weight as its transposed view, no copy). A setting a family does not implement is a
``FamilyError`` naming it (a ``ModelError``; also a ``ConfigError``, as the engines' refusals are).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError, ModelError

ACTIVATIONS = ("gelu_tanh", "silu")  # what ops.bias_gelu / ops.gated_act compute
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # Hugging Face's names of the tanh GELU
# RoPE kinds whose frequencies are a constant of the config (HF's ROPE_INIT_FUNCTIONS computes them once);
# "dynamic" and "longrope" change them with the sequence length and are refused.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


class FamilyError(ModelError, ConfigError):
    """A model (or one setting of its config) that no family of the packed engine implements."""


@dataclass(frozen=True)
class Norm:
    """LayerNorm (``bias`` set) or RMSNorm (``bias`` None) over the last dimension; RMSNorm scales by
    ``offset + weight`` (Gemma: 1 + w)."""

    weight: torch.Tensor  # (n,)
    bias: torch.Tensor | None  # (n,) for LayerNorm
    eps: float
    offset: float = 0.0
    rms: bool = False


@dataclass(frozen=True)
class Rotary:
    """RoPE: angle ``position * inv_freq`` on dimension pairs (i, i + D/2), cos/sin times ``scaling``."""

    inv_freq: torch.Tensor  # (D/2,) fp32, as the model's rotary module computed it
    scaling: float  # HF's attention_scaling (yarn; 1 elsewhere)


@dataclass(frozen=True)
class Attention:
    qkv_w: torch.Tensor  # (d, (H + 2 Hkv) D): queries, keys, values side by side
    qkv_b: torch.Tensor | None
    out_w: torch.Tensor  # (H D, d)
    out_b: torch.Tensor | None
    n_head: int
    n_kv_head: int  # GQA: every n_head / n_kv_head query heads share one K/V head
    head_dim: int
    scale: float  # softmax(q k^T * scale)
    window: int | None = None  # sliding window: a query at position p sees keys at positions > p - window
    q_norm: Norm | None = None  # per head, over D, before RoPE (Qwen3, Gemma 3)
    k_norm: Norm | None = None
    rotary: Rotary | None = None


@dataclass(frozen=True)
class MLP:
    """``down(act(x @ up_w + up_b))``, or gated: ``down(act(gate) * up)`` with ``up_w = [gate | up]``."""

    up_w: torch.Tensor  # (d, I), or (d, 2I) gated
    up_b: torch.Tensor | None
    down_w: torch.Tensor  # (I, d)
    down_b: torch.Tensor | None
    activation: str  # ACTIVATIONS
    gated: bool


@dataclass(frozen=True)
class Block:
    """Pre-norm residual block; ``*_out_norm`` normalise a branch's output before its residual add (Gemma)."""

    attn_norm: Norm
    attn: Attention
    mlp_norm: Norm
    mlp: MLP
    attn_out_norm: Norm | None = None
    mlp_out_norm: Norm | None = None


@dataclass(frozen=True)
class ModelWeights:
    family: str  # for messages only: the engine never branches on it
    embed: torch.Tensor  # (V, d) token embedding table
    embed_scale: torch.Tensor | float | None  # token embeddings times this (Gemma: sqrt(d) in the weights' dtype)
    positions: torch.Tensor | None  # (n_positions, d) learned absolute positions (GPT-2), added after the prompt
    blocks: tuple  # Block per layer
    final_norm: Norm
    lm_head: torch.Tensor  # (V, d), tied to embed or not
    softcap: float | None = None  # final logit soft-capping: cap * tanh(logits / cap)

    @property
    def n_layer(self) -> int:
        return len(self.blocks)

    @property
    def kv_shape(self) -> tuple[int, int]:
        """(K/V heads, head dim) of every layer: what a layer's cache (and a prefix's K/V) holds."""
        a = self.blocks[0].attn
        return a.n_kv_head, a.head_dim


# ------------------------------------------------------------------------------------- shared readers
class Reader:
    """Detached views of a model's weights, copies in ``dtype`` where it differs."""

    def __init__(self, dtype: torch.dtype | None = None):
        self.dtype = dtype

    @staticmethod
    def raw(t: torch.Tensor) -> torch.Tensor:
        """``t`` detached; a sharded parameter (DTensor) as a meta tensor of its full shape (module docstring)."""
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            if isinstance(t, DTensor):
                return torch.empty(t.shape, dtype=t.dtype, device="meta")
        return t.detach()

    def __call__(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = self.raw(t)
        return t if self.dtype is None or t.dtype == self.dtype else t.to(self.dtype)

    def linear_t(self, *modules) -> torch.Tensor:
        """``nn.Linear`` weights as one ``(in, out)`` weight: the transposed view of one, or of the
        concatenation of several (one copy, made once)."""
        ws = [self.raw(m.weight) for m in modules]
        w = ws[0] if len(ws) == 1 else torch.cat(ws)
        return self(w).t()

    def linear_bias(self, *modules) -> torch.Tensor | None:
        bs = [getattr(m, "bias", None) for m in modules]
        if all(b is None for b in bs):
            return None
        ws = [self.raw(m.weight) for m in modules]
        bs = [self.raw(b) if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
              for b, w in zip(bs, ws)]
        return self(bs[0] if len(bs) == 1 else torch.cat(bs))

    def rms(self, module, offset: float = 0.0) -> Norm:
        eps = getattr(module, "variance_epsilon", None)
        if eps is None:
            eps = getattr(module, "eps")
        return Norm(self(module.weight), None, float(eps), offset, rms=True)

    def layer_norm(self, module) -> Norm:
        return Norm(self(module.weight), self(module.bias), float(module.eps))


def require(condition: bool, family: str, setting: str, hint: str = "") -> None:
    """A ``FamilyError`` naming ``setting`` where ``condition`` fails."""
    if not condition:
        raise FamilyError(f"the packed engine's {family} family does not implement {setting}"
                          f"{'; ' + hint if hint else ''}: use engine='generic'")


def rotary_of(rotary_module, config, layer_type: str | None, family: str) -> Rotary:
    """RoPE frequencies exactly as the model's own rotary module computed them (HF's ROPE_INIT_FUNCTIONS,
    run by the module at init): its ``inv_freq`` buffer (per layer type where the module keeps several) and
    ``attention_scaling``. Only static kinds (``STATIC_ROPE``)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    kind = params.get("rope_type", "default") if isinstance(params, dict) else "default"
    require(kind in STATIC_ROPE, family, f"rope_type={kind!r}", f"implemented: {', '.join(STATIC_ROPE)}")
    prefix = f"{layer_type}_" if layer_type is not None and hasattr(rotary_module, f"{layer_type}_inv_freq") else ""
    inv_freq = getattr(rotary_module, f"{prefix}inv_freq")
    scaling = getattr(rotary_module, f"{prefix}attention_scaling", 1.0)
    return Rotary(inv_freq.detach().float(), float(scaling))


def activation_of(name: str, family: str) -> str:
    if name in GELU_TANH:
        return "gelu_tanh"
    require(name in ("silu", "swish"), family, f"the activation {name!r}", "implemented: silu, tanh GELU")
    return "silu"
