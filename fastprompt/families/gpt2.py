"""GPT-2 (and its family: DistilGPT-2, GPT-2 medium/large/xl): learned positions, LayerNorm, one Conv1D
q/k/v, tanh-GELU MLP, LM head tied (or not) without bias."""
from __future__ import annotations

import math

from .base import Attention, Block, MLP, ModelWeights, Reader, require, GELU_TANH

NAME = "GPT-2"
MODEL_TYPES = ("gpt2",)


def read(model, dtype=None) -> ModelWeights:
    config = model.config
    require(hasattr(model, "transformer"), NAME, f"the class {type(model).__name__} (no .transformer)")
    act = getattr(config, "activation_function", "gelu_new")
    require(act in GELU_TANH, NAME, f"activation_function={act!r}", "GPT-2's tanh GELU only")
    require(not getattr(config, "add_cross_attention", False), NAME, "add_cross_attention=True")
    head = model.get_output_embeddings()
    require(head is not None and getattr(head, "bias", None) is None, NAME, "an LM head with a bias")
    w = Reader(dtype)
    tr = model.transformer
    blocks = tuple(read_block(model, i, w) for i in range(len(tr.h)))
    embed = w(tr.wte.weight)
    lm_head = embed if head.weight is tr.wte.weight else w(head.weight)
    return ModelWeights(NAME, embed, None, w(tr.wpe.weight), blocks, w.layer_norm(tr.ln_f), lm_head)


def read_block(model, i: int, w: Reader) -> Block:
    """Layer ``i`` (``read``'s checks made)."""
    config = model.config
    block = model.transformer.h[i]
    H = config.n_head
    D = config.n_embd // H
    scale = 1.0 / math.sqrt(D) if getattr(config, "scale_attn_weights", True) else 1.0
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(i + 1)
    attn = Attention(w(block.attn.c_attn.weight), w(block.attn.c_attn.bias), w(block.attn.c_proj.weight),
                     w(block.attn.c_proj.bias), H, H, D, scale)
    mlp = MLP(w(block.mlp.c_fc.weight), w(block.mlp.c_fc.bias), w(block.mlp.c_proj.weight),
              w(block.mlp.c_proj.bias), "gelu_tanh", gated=False)
    return Block(w.layer_norm(block.ln_1), attn, w.layer_norm(block.ln_2), mlp)
