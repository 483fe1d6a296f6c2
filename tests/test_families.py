"""The packed engine on every family against the naive engine (exactness is the contract): tiny random configs
of Llama / Qwen2 / Qwen3 / Mistral / Gemma 3 with GQA ratios 1, 3, 4, head dims 64 and 256, q/k norm, sliding
windows shorter than the sequence, tied and untied heads, rope scaling kinds, odd sizes, templates with
fields before and after the slot. fp32: loss and prompt gradient to 1e-5 relative."""
from __future__ import annotations

import copy
import functools
import random

import pytest
import torch

from fastprompt.engines import make_engine
from fastprompt.engines.fused import FusedEngine
from fastprompt.engines.naive import NaiveEngine
from fastprompt.families import FamilyError, family_of, read_weights
from fastprompt.template import TemplateEncoder

from helpers import rel_err, tiny_causal_lm, tiny_gpt2, tokenizer

FP32_TOL = 1e-5
TEMPLATES = {
    "start": "{prompt} {input} means {target}",
    "middle": "Here are two {prompt} {input} and {target}",
    "end": "Word: {input}. Opposite {prompt} {target}",
    "json": '"word": "{input}", {prompt} "hint": "{hint}", "answer": "{target}',
}
WORDS = ["a", "go", "hot", "red", "antidisestablishment", "floccinaucinihilipilification", "xylophonist", "up"]

# name -> (kind, config overrides)
CONFIGS = {
    "llama-mha": ("llama", dict(num_key_value_heads=4)),  # GQA ratio 1
    "llama-gqa3-untied": ("llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2,
                                        intermediate_size=200, tie_word_embeddings=False)),
    "llama-gqa4-hd64": ("llama", dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                      num_hidden_layers=3, intermediate_size=96)),
    "llama3-rope": ("llama", dict(rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                                       original_max_position_embeddings=16))),
    "llama-linear-rope": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "llama-yarn": ("llama", dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                      original_max_position_embeddings=32))),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qknorm": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=80, head_dim=20)),
    "mistral-window": ("mistral", dict(sliding_window=5, num_attention_heads=6, num_key_value_heads=2,
                                       hidden_size=48, intermediate_size=72)),
    "gemma3": ("gemma3", {}),
    "gemma3-hd256-untied": ("gemma3", dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1,
                                           query_pre_attn_scalar=64, sliding_window=3, tie_word_embeddings=False,
                                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                           num_hidden_layers=3)),
}


@functools.lru_cache(maxsize=None)
def model_for(name: str):
    """A tiny random model of ``CONFIGS[name]`` with random norm weights (so that a wrong norm offset, a
    missing q/k norm or a swapped norm shows), biases where the config has them random too."""
    kind, overrides = CONFIGS[name]
    model = tiny_causal_lm(kind, seed=3, **overrides)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod_name, p in model.named_parameters():
            if "norm" in mod_name or mod_name.endswith(".bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def examples(n, seed, fields=("input", "hint")):
    rng = random.Random(seed)
    return [{**{f: rng.choice(WORDS) for f in fields}, "target": rng.choice(WORDS)} for _ in range(n)]


def fresh_prompt(model, prompt_len, seed):
    table = model.get_input_embeddings().weight.detach()
    scale = getattr(model.get_input_embeddings(), "embed_scale", 1.0)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(prompt_len, table.shape[1], generator=g) * table.std() * float(scale)).requires_grad_(True)


def loss_and_grad(engine, prompt, batch):
    ce_sum, n = engine.loss_terms(prompt, batch)
    (grad,) = torch.autograd.grad(ce_sum / n, prompt)
    return (ce_sum / n).detach(), grad


def compare(model, template, prompt_len, batch_size, seed, **options):
    enc = TemplateEncoder(template, tokenizer(), prompt_len, max_len=model.config.max_position_embeddings)
    batch = enc.encode_all(examples(batch_size, seed))
    prompt = fresh_prompt(model, prompt_len, seed)
    ref = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    got = loss_and_grad(FusedEngine(model, enc, **options), prompt, batch)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all()
    return rel_err(got[0], ref[0]), rel_err(got[1], ref[1])


CASES = [(name, template) for name in CONFIGS for template in ("middle", "end")]
CASES += [("llama-gqa3-untied", "json"), ("gemma3", "json"), ("mistral-window", "start"), ("qwen3-qknorm", "start"),
          ("gemma3-hd256-untied", "start")]


@pytest.mark.parametrize("name,template", CASES)
def test_packed_engine_matches_naive_fp32(name, template):
    model = model_for(name)
    seed = CASES.index((name, template))
    loss_err, grad_err = compare(model, TEMPLATES[template], prompt_len=3 + seed % 3, batch_size=5 + seed % 4,
                                 seed=seed)
    assert loss_err <= FP32_TOL and grad_err <= FP32_TOL, (loss_err, grad_err)


def test_the_sliding_window_is_shorter_than_the_sequences():
    """The window cases above would prove nothing if every key fell inside the window."""
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3, max_len=256)
    longest = max(len(e.ids) for e in enc.encode_all(examples(9, 1)))
    for name in ("mistral-window", "gemma3", "gemma3-hd256-untied"):
        windows = {b.attn.window for b in read_weights(model_for(name)).blocks} - {None}
        assert windows and max(windows) < longest - 2, (name, windows, longest)


def test_families_read_what_the_config_says():
    w = read_weights(model_for("gemma3-hd256-untied"))
    assert w.softcap == 30.0 and w.embed_scale is not None and w.lm_head is not w.embed
    assert [b.attn.window for b in w.blocks] == [3, 3, None]
    assert all(b.attn.q_norm.offset == 1.0 and b.attn_out_norm is not None for b in w.blocks)
    assert w.blocks[0].attn.scale == 64 ** -0.5 and w.kv_shape == (1, 256)
    # sliding layers use the local RoPE base, full ones the global: different frequencies
    assert not torch.equal(w.blocks[0].attn.rotary.inv_freq, w.blocks[2].attn.rotary.inv_freq)
    w = read_weights(model_for("qwen2-bias"))
    assert w.blocks[0].attn.qkv_b is not None and w.lm_head is w.embed and w.blocks[0].attn.window is None
    w = read_weights(model_for("llama-yarn"))
    assert w.blocks[0].attn.rotary.scaling != 1.0  # yarn's attention factor, from HF's own rope init
    w = read_weights(model_for("mistral-window"))
    assert {b.attn.window for b in w.blocks} == {5} and w.kv_shape == (2, 8)
    assert family_of(tiny_gpt2()).NAME == "GPT-2" and read_weights(tiny_gpt2()).positions is not None


def test_weights_are_views_not_copies():
    """Single nn.Linear weights and the embeddings are read as views; only q/k/v and gate/up are concatenated."""
    model = model_for("llama-gqa3-untied")
    w = read_weights(model)
    layer = model.model.layers[0]
    assert w.blocks[0].attn.out_w.data_ptr() == layer.self_attn.o_proj.weight.data_ptr()
    assert w.blocks[0].mlp.down_w.data_ptr() == layer.mlp.down_proj.weight.data_ptr()
    assert w.embed.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in model.parameters())


def test_engines_over_one_model_share_one_read_until_a_weight_changes():
    """Engines of other prompt lengths (a sweep's) hold the concatenated q/k/v and gate/up copies, and a bf16
    copy, once; an in-place change of a weight makes the next engine read the model again (its loss is the
    naive loss of the changed model), and a read no engine holds is freed."""
    import gc
    import weakref

    model = copy.deepcopy(model_for("llama-gqa3-untied"))
    template = TEMPLATES["middle"]
    encs = [TemplateEncoder(template, tokenizer(), n, max_len=model.config.max_position_embeddings) for n in (2, 3)]
    a, b = (FusedEngine(model, enc) for enc in encs)
    assert a.weights is b.weights
    low = [FusedEngine(model, enc, precision="bf16") for enc in encs]
    assert low[0].weights is low[1].weights and low[0].weights is not a.weights
    gone = weakref.ref(low[0].weights)
    del low
    gc.collect()
    assert gone() is None
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # inside the concatenated q/k/v copy
    c = FusedEngine(model, encs[1])
    assert c.weights is not b.weights
    batch = encs[1].encode_all(examples(4, 11))
    prompt = fresh_prompt(model, 3, 11)
    got, ref = loss_and_grad(c, prompt, batch), loss_and_grad(NaiveEngine(model, encs[1]), prompt, batch)
    assert rel_err(got[0], ref[0]) <= FP32_TOL and rel_err(got[1], ref[1]) <= FP32_TOL


def test_unsupported_settings_are_named_and_auto_falls_back_to_generic():
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3)
    model = copy.copy(model_for("llama-mha"))
    model.config = copy.deepcopy(model.config)
    model.config.hidden_act = "relu"
    with pytest.raises(FamilyError, match="relu"):
        FusedEngine(model, enc)
    engine = make_engine("auto", model, enc)
    assert engine.name == "generic" and "relu" in engine.describe()
    assert make_engine("auto", model_for("llama-mha"), enc).name == "fused"
    assert "Llama" in make_engine("auto", model_for("llama-mha"), enc).describe()
    gemma = copy.copy(model_for("gemma3"))
    gemma.config = copy.deepcopy(gemma.config)
    gemma.config.attn_logit_softcapping = 50.0
    with pytest.raises(FamilyError, match="attn_logit_softcapping"):
        read_weights(gemma)
    rope = copy.copy(model_for("llama-mha"))
    rope.config = copy.deepcopy(rope.config)
    rope.config.rope_parameters = {**rope.config.rope_parameters, "rope_type": "dynamic"}
    with pytest.raises(FamilyError, match="dynamic"):
        read_weights(rope)


@pytest.mark.parametrize("name", ["llama-gqa3-untied", "gemma3"])
def test_low_precision_close_to_fp32(name):
    model = model_for(name)
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3, max_len=256)
    batch = enc.encode_all(examples(6, 2))
    prompt = fresh_prompt(model, 3, 2)
    ref = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    got = loss_and_grad(FusedEngine(model, enc, "bf16"), prompt, batch)
    assert rel_err(got[0], ref[0]) < 2e-2 and rel_err(got[1], ref[1]) < 5e-2


# ------------------------------------------------------------------------------------- a real model
@pytest.mark.slow
@pytest.mark.parametrize("template", ["middle", "end"])
def test_smollm2_matches_the_float64_naive_loop(template):
    """SmolLM2-135M (30 layers, GQA 3, tied head): against the float64 naive loop, the packed engine's fp32 loss
    and gradient are within 1e-5, or within 3x the fp32 naive loop's own error, whichever is larger.

    The float64 loop must be float64 throughout: Hugging Face's RMSNorm computes its statistics in fp32
    whatever the dtype (a float64 copy would keep fp32 roundings that the fp32 naive loop shares, making it
    look more accurate than it is), so the copy's norms run in float64 here (its own modules, patched per
    instance); the naive engine's CE runs in the logits' float64. (RoPE's cos/sin tables are fp32 in HF's
    definition and in the engine alike.) With that, the packed engine in float64 equals the loop to ~1e-15
    in every layer's hidden state."""
    import types

    from helpers import smollm2

    model, tok = smollm2()
    model64 = copy.deepcopy(model).double()

    def rms_norm64(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for module in model64.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(rms_norm64, module)
    enc = TemplateEncoder(TEMPLATES[template], tok, 4, max_len=512)
    batch = enc.encode_all(examples(8, 11))
    prompt = fresh_prompt(model, 4, 11)
    prompt64 = prompt.detach().double().requires_grad_(True)
    truth = loss_and_grad(NaiveEngine(model64, enc), prompt64, batch)
    naive = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    engine = make_engine("auto", model, enc)
    assert engine.name == "fused" and "Llama" in engine.describe()
    got = loss_and_grad(engine, prompt, batch)
    for i, what in enumerate(("loss", "gradient")):
        own = rel_err(naive[i], truth[i])
        assert rel_err(got[i], truth[i]) <= max(1e-5, 3 * own), (what, rel_err(got[i], truth[i]), own)
    del model64


@pytest.mark.parametrize("name", ["gemma3", pytest.param("llama-gqa3-untied", marks=pytest.mark.slow),
                                  pytest.param("qwen3-qknorm", marks=pytest.mark.slow)])
def test_packed_engine_with_triton_kernels_matches_naive(name):
    """The same engine with its ops from fastprompt.kernels (interpreted on the CPU; the LM head stays torch:
    its vocabulary-wide loop costs ~10 s in the interpreter): within 1e-4 of naive."""
    import dataclasses

    from fastprompt import kernels
    from fastprompt.engines import ops as ops_mod

    if not kernels.TRITON_AVAILABLE:
        pytest.skip("needs triton")
    model = model_for(name)
    enc = TemplateEncoder(TEMPLATES["end"], tokenizer(), 2, max_len=256)
    batch = enc.encode_all(examples(3, 4))
    prompt = fresh_prompt(model, 2, 4)
    engine = FusedEngine(model, enc, kernels="triton")
    assert {engine.ops.sources[n] for n in ("tree_attention", "add_rms_norm", "rotary", "gated_act")} == {"triton"}
    engine.ops = dataclasses.replace(engine.ops, lm_head_ce=ops_mod.lm_head_ce)
    ref = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    got = loss_and_grad(engine, prompt, batch)
    assert rel_err(got[0], ref[0]) <= 1e-4 and rel_err(got[1], ref[1]) <= 1e-4


# --------------------------------------------------------------- the CPU tree attention, per segment
@pytest.mark.parametrize("n_context,trunk_rows,lengths,heads,kv_heads", [
    (3, 4, [2, 3, 1, 5], 4, 4),  # context, prompt rows in the trunk, MHA
    (0, 0, [3, 1, 2], 6, 2),  # no trunk at all, GQA 3
    (2, 0, [1, 1, 4, 0, 2], 6, 3),  # an empty segment, the trunk only the context
    (3, 5, [0, 2, 7, 0], 9, 3),  # empty first and last segments
    (0, 2, [4], 2, 1),  # one segment, GQA 2
])
def test_segmented_cpu_attention_is_the_dense_tree_attention(n_context, trunk_rows, lengths, heads, kv_heads):
    """float64: the per-segment form and the dense masked form agree to rounding, output and all three input
    gradients (q, k, v)."""
    from fastprompt.engines import ops

    g = torch.Generator().manual_seed(len(lengths) + heads)
    n_trunk, rows = n_context + trunk_rows, trunk_rows + sum(lengths)
    n_keys = n_context + rows
    cu = torch.tensor([n_trunk] + [n_trunk + sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int32)
    q = torch.randn(rows, heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(n_keys, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(n_keys, kv_heads, 8, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(rows, heads, 8, generator=g, dtype=torch.float64)
    bias = ops._additive(ops.tree_mask(rows, n_keys, n_trunk, cu), heads // kv_heads)
    dense = ops._grouped_attention(q, k, v, bias, 0.3)
    seg = ops._segmented_attention(q, k, v, n_trunk, cu, 0.3)
    assert rel_err(seg, dense) <= 1e-12
    for a, b in zip(torch.autograd.grad((dense * up).sum(), (q, k, v)), torch.autograd.grad((seg * up).sum(), (q, k, v))):
        assert rel_err(b, a) <= 1e-12


SEGMENTED_CASES = [("gpt2", "middle"), ("gpt2", "json"), ("llama-gqa3-untied", "json"), ("llama-mha", "end"),
                   ("qwen3-qknorm", "start"), ("qwen2-bias", "middle"), ("gemma3", "end"), ("llama3-rope", "start"),
                   ("gemma3-wide-window", "middle"), ("mistral-wide-window", "json")]
CONFIGS["gemma3-wide-window"] = ("gemma3", dict(sliding_window=64))  # windows past every sequence here
CONFIGS["mistral-wide-window"] = ("mistral", dict(sliding_window=64))


@pytest.mark.parametrize("name,template", SEGMENTED_CASES)
def test_packed_engine_with_segmented_cpu_attention_matches_naive_fp32(name, template, monkeypatch):
    """Large blocks (many examples: evaluation's 256) take the per-segment CPU attention; here every block
    does (threshold 0), and the packed engine still equals the naive loop: loss and prompt gradient."""
    from fastprompt.engines import ops

    calls = []
    real = ops._segmented_attention
    monkeypatch.setattr(ops, "SEGMENTED_MIN_SCORES", 0)
    monkeypatch.setattr(ops, "_segmented_attention", lambda *a: calls.append(1) or real(*a))
    model = tiny_gpt2(seed=4) if name == "gpt2" else model_for(name)
    seed = SEGMENTED_CASES.index((name, template))
    loss_err, grad_err = compare(model, TEMPLATES[template], prompt_len=2 + seed % 3, batch_size=6 + seed % 5,
                                 seed=seed)
    assert calls  # the segmented form ran (gemma3: in its full layers; the window of 4 binds in its sliding one)
    assert loss_err <= FP32_TOL and grad_err <= FP32_TOL, (loss_err, grad_err)


def test_a_window_past_every_key_is_the_tree_attention(monkeypatch):
    """CPU: a sliding layer whose window reaches past every key of the block is the tree attention itself
    (per segment where large); a window that binds keeps its own mask."""
    from fastprompt.engines import ops

    calls = []
    real = ops._segmented_attention
    monkeypatch.setattr(ops, "SEGMENTED_MIN_SCORES", 0)
    monkeypatch.setattr(ops, "_segmented_attention", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    lengths, n_trunk = [3, 5, 2], 4
    cu = torch.tensor([4, 7, 12, 14], dtype=torch.int32)
    positions = torch.tensor(list(range(4)) + [4 + i for n in lengths for i in range(n)])  # each segment after the trunk
    q = torch.randn(14, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(14, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dense = ops._grouped_attention(q, k, v, ops._additive(ops.tree_mask(14, 14, n_trunk, cu), 2), 0.3)
    wide = ops.window_attention(q, k, v, n_trunk, cu, 0.3, 9, positions)  # positions 0 .. 8: nothing out of reach
    assert calls == [1] and rel_err(wide, dense) <= 1e-12
    narrow = ops.window_attention(q, k, v, n_trunk, cu, 0.3, 3, positions)
    assert calls == [1] and rel_err(narrow, dense) > 1e-3  # the window of 3 masks keys the tree allows
