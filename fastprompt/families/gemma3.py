"""Gemma 3 (text): scaled embeddings, RMSNorm scaling by 1 + w, four norms a block (the attention's and the
MLP's outputs normalised before their residual adds), per-head q/k norm, ``query_pre_attn_scalar``, RoPE per
layer type (sliding layers: local base frequency), sliding-window layers, GeGLU MLP, final logit
soft-capping where the config has it."""
from __future__ import annotations

import torch

from .base import Attention, Block, MLP, ModelWeights, Reader, activation_of, require, rotary_of

NAME = "Gemma 3"
MODEL_TYPES = ("gemma3_text",)


def read(model, dtype=None) -> ModelWeights:
    config = model.config
    base = model.model
    require(getattr(config, "attn_logit_softcapping", None) is None, NAME,
            f"attn_logit_softcapping={config.attn_logit_softcapping}")
    require(not getattr(config, "use_bidirectional_attention", False), NAME, "use_bidirectional_attention=True")
    head = model.get_output_embeddings()
    require(getattr(head, "bias", None) is None, NAME, "an LM head with a bias")
    activation_of(config.hidden_activation, NAME)
    w = Reader(dtype)
    blocks = tuple(read_block(model, i, w) for i in range(len(base.layers)))
    module = base.embed_tokens
    embed = w(module.weight)
    scale = getattr(module, "embed_scale", None)
    scale = scale.detach().to(embed.dtype) if torch.is_tensor(scale) else scale  # as HF: scale in the weights' dtype
    lm_head = embed if head.weight is module.weight else w(head.weight)
    return ModelWeights(NAME, embed, scale, None, blocks, w.rms(base.norm, 1.0), lm_head,
                        softcap=getattr(config, "final_logit_softcapping", None))


def read_block(model, i: int, w: Reader) -> Block:
    """Layer ``i`` (``read``'s checks made)."""
    config = model.config
    base = model.model
    layer = base.layers[i]
    a = layer.self_attn
    H, D = config.num_attention_heads, a.head_dim
    G = config.num_key_value_heads
    attn = Attention(w.linear_t(a.q_proj, a.k_proj, a.v_proj), w.linear_bias(a.q_proj, a.k_proj, a.v_proj),
                     w.linear_t(a.o_proj), w(a.o_proj.bias), H, G, D, float(a.scaling),
                     window=a.sliding_window, q_norm=w.rms(a.q_norm, 1.0), k_norm=w.rms(a.k_norm, 1.0),
                     rotary=rotary_of(base.rotary_emb, config, config.layer_types[i], NAME))
    m = layer.mlp
    mlp = MLP(w.linear_t(m.gate_proj, m.up_proj), None, w.linear_t(m.down_proj), None,
              activation_of(config.hidden_activation, NAME), gated=True)
    return Block(w.rms(layer.input_layernorm, 1.0), attn, w.rms(layer.pre_feedforward_layernorm, 1.0), mlp,
                 attn_out_norm=w.rms(layer.post_attention_layernorm, 1.0),
                 mlp_out_norm=w.rms(layer.post_feedforward_layernorm, 1.0))
