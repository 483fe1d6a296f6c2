"""The Llama kind: Llama 2/3.x, Qwen2/2.5, Qwen3, Mistral, SmolLM2 (model types llama, qwen2, qwen3, mistral).

RMSNorm, RoPE (default, linear, llama3, yarn: the model's own inv_freq), MHA/GQA with optional q/k/v bias
(Qwen2), per-head q/k RMSNorm before RoPE (Qwen3), a sliding window on the layers the config slides
(Mistral's ``sliding_window`` on every layer; Qwen's ``layer_types``), a SwiGLU MLP, tied or untied head.
"""
from __future__ import annotations

from .base import Attention, Block, MLP, ModelWeights, Reader, activation_of, require, rotary_of

NAME = "Llama"
MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def layer_window(config, i: int) -> int | None:
    """The sliding window of layer ``i`` as the model's attention applies it, or None."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        return window  # every layer (HF: create_sliding_window_causal_mask where it is set)
    types = getattr(config, "layer_types", None)
    return window if types is not None and types[i] == "sliding_attention" else None


def read(model, dtype=None, name: str = NAME) -> ModelWeights:
    config = model.config
    base = model.model
    require(getattr(config, "pretraining_tp", 1) == 1, name, f"pretraining_tp={getattr(config, 'pretraining_tp', 1)}")
    require(not getattr(config, "mlp_bias", False), name, "mlp_bias=True")
    head = model.get_output_embeddings()
    require(getattr(head, "bias", None) is None, name, "an LM head with a bias")
    activation_of(config.hidden_act, name)
    w = Reader(dtype)
    blocks = tuple(read_block(model, i, w, name) for i in range(len(base.layers)))
    embed = w(base.embed_tokens.weight)
    lm_head = embed if head.weight is base.embed_tokens.weight else w(head.weight)
    return ModelWeights(name, embed, None, None, blocks, w.rms(base.norm), lm_head)


def read_block(model, i: int, w: Reader, name: str = NAME) -> Block:
    """Layer ``i`` (``read``'s checks made)."""
    config = model.config
    base = model.model
    layer = base.layers[i]
    a = layer.self_attn
    H, D = config.num_attention_heads, a.head_dim
    G = getattr(config, "num_key_value_heads", None) or H
    q_norm, k_norm = getattr(a, "q_norm", None), getattr(a, "k_norm", None)
    attn = Attention(w.linear_t(a.q_proj, a.k_proj, a.v_proj), w.linear_bias(a.q_proj, a.k_proj, a.v_proj),
                     w.linear_t(a.o_proj), w(a.o_proj.bias), H, G, D, float(a.scaling),
                     window=layer_window(config, i),
                     q_norm=w.rms(q_norm) if q_norm is not None else None,
                     k_norm=w.rms(k_norm) if k_norm is not None else None,
                     rotary=rotary_of(base.rotary_emb, config, None, name))
    m = layer.mlp
    mlp = MLP(w.linear_t(m.gate_proj, m.up_proj), None, w.linear_t(m.down_proj), None,
              activation_of(config.hidden_act, name), gated=True)
    return Block(w.rms(layer.input_layernorm), attn, w.rms(layer.post_attention_layernorm), mlp)
