"""Prefix-tuning on the tiny GPT-2: the naive engine's reference forward (K/V written at the slot) vs the
generic and fused engines' packed (and padded) layouts, exact in fp32; the reference against Hugging Face's
own forward; init from text = the hand-written prompt."""
import inspect

import pytest
import torch

import fastprompt as fp
from fastprompt.engines.base import PromptInputs
from fastprompt.engines.naive import gpt2_reference_forward

from helpers import rel_err, tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small"), ("wet", "dry"),
         ("incapable", "capable"), ("heterogeneity", "homogeneity")]
TEMPLATES = ["Here are two {prompt} {input} and {target}",  # context before the prompt, text after it
             "{prompt} {input} and {target}",  # prompt at the start: no context
             "Here are two {prompt}{input} and {target}",  # prompt ends the head
             "Word {input}, {prompt} now: {target}",  # a field before the prompt
             "{prompt}: {input} and {target}"]  # no constant text, text after the slot


def test_own_forward_matches_hugging_face():
    model = tiny_gpt2(seed=1, initializer_range=0.2, n_embd=48, n_head=3)
    ids = torch.randint(0, 50257, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    ours = model.lm_head(gpt2_reference_forward(model, model.transformer.wte(ids), torch.arange(9).expand(3, 9), mask))
    theirs = model(input_ids=ids).logits
    assert rel_err(ours, theirs) < 1e-5


def test_naive_prefix_matches_a_hugging_face_cache_for_a_prompt_at_the_start():
    """Independent check: HF's forward with the prefix K/V as past_key_values (the prompt first)."""
    from transformers import DynamicCache

    model, tok = tiny_gpt2(seed=2, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, "{prompt} {input} and {target}", 3, method="prefix", engine="naive", seed=4)
    kv = tuner.prompt.detach()
    enc = tuner.encode(PAIRS[:1])[0]
    cache = DynamicCache(config=model.config)
    for layer in range(kv.shape[0]):
        cache.update(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None], layer)
    ids = torch.tensor([enc.ids[3:]])
    T = ids.shape[1]
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x rename
    logits = model(input_ids=ids, **{name: cache}, position_ids=torch.arange(3, 3 + T)[None],
                   attention_mask=torch.ones(1, 3 + T, dtype=torch.long)).logits[0]
    labels = torch.tensor(enc.ids[enc.target_start:])
    ce = torch.nn.functional.cross_entropy(logits[enc.target_start - 4 : T - 1], labels, reduction="sum")
    ce_naive, _ = tuner.engine.loss_terms(PromptInputs(layer_kv=kv), [enc])
    assert rel_err(ce_naive, ce) < 1e-5


@pytest.mark.parametrize("engine", ["fused", "generic-packed", "generic-padded"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_fast_equals_naive_fp32(template, engine):
    model, tok = tiny_gpt2(seed=3, initializer_range=0.2), tokenizer()
    naive = fp.PromptTuner(model, tok, template, 4, method="prefix", engine="naive", seed=5)
    name, _, layout = engine.partition("-")
    options = {"layout": layout} if layout else {}
    if layout == "packed" and "{input}," in template:  # the slot after a field: the naive forward, no layout
        options = {}
    fast = fp.PromptTuner(model, tok, template, 4, method="prefix", engine=name, prompt=naive.prompt.detach(),
                          **options)
    assert fast.engine.name == name
    g = torch.Generator().manual_seed(0)
    kv = naive.prompt.detach() + 0.3 * torch.randn(naive.prompt.shape, generator=g)  # away from the init
    for tuner in (naive, fast):
        tuner.prompt.data.copy_(kv)
    losses, grads = [], []
    for tuner in (naive, fast):
        loss = tuner.loss(PAIRS)
        (grad,) = torch.autograd.grad(loss, tuner.prompt)
        losses.append(loss)
        grads.append(grad)
    assert rel_err(losses[1], losses[0]) <= 1e-5 and rel_err(grads[1], grads[0]) <= 1e-5
    assert grads[0].abs().sum() > 0 and torch.isfinite(grads[1]).all()
    if layout == "packed" and options:
        assert fast.engine._packed  # the packed layout ran (its check against the padded layout passed)


def test_text_init_equals_the_hand_written_soft_prompt():
    model, tok = tiny_gpt2(seed=4, initializer_range=0.2), tokenizer()
    L = len(tok(" antonyms", add_special_tokens=False)["input_ids"])
    soft = fp.PromptTuner(model, tok, prompt_len=L, engine="naive", init="text:antonyms")
    for engine in ("naive", "generic", "fused"):
        prefix = fp.PromptTuner(model, tok, prompt_len=L, method="prefix", engine=engine, init="text:antonyms")
        assert rel_err(prefix.loss(PAIRS), soft.loss(PAIRS)) < 1e-5
    assert prefix.generate(["hot", "up"]) == soft.generate(["hot", "up"])  # greedy readout agrees too


def test_training_lowers_the_loss_and_save_load(tmp_path):
    model, tok = tiny_gpt2(seed=5, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=4, method="prefix", seed=1)
    assert tuner.prompt.shape == (2, 2, 4, 4, 16)
    before = tuner.loss(PAIRS).item()
    tuner.fit(PAIRS, epochs=4, batch_size=4, lr=1e-2, progress=False)
    assert tuner.loss(PAIRS).item() < before
    path = str(tmp_path / "prefix.safetensors")
    tuner.save(path)
    loaded = fp.PromptTuner.load(path, model, tok)
    assert loaded.method.name == "prefix" and torch.equal(loaded.prompt, tuner.prompt)
    assert rel_err(loaded.loss(PAIRS), tuner.loss(PAIRS)) < 1e-6
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["prefix"] and meta["method"] == "prefix" and meta["n_layer"] == "2"
    other = tiny_gpt2(seed=5, n_layer=3)
    with pytest.raises(fp.PromptFileError):
        fp.PromptTuner.load(path, other, tok, strict=False)


def test_refusals():
    model, tok = tiny_gpt2(), tokenizer()
    with pytest.raises(fp.ConfigError, match="cannot directly"):
        fp.PromptTuner(model, tok, "Q: {input} A: {prompt} {target}", 2, method="prefix")


def test_cli_prefix(tmp_path):
    from fastprompt.train import main

    out = tmp_path / "p"
    assert main(["--model", "tiny", "--epochs", "1", "--train-size", "32", "--test-size", "0.005", "--method",
                 "prefix", "--out", str(out), "--no-progress", "--samples", "2"]) == 0
    assert "no vocabulary readout" in (out / "nearest.txt").read_text()
    assert (out / "samples.txt").read_text().count("Predicted:") == 2


@pytest.mark.parametrize("template", [t for t in TEMPLATES if not t.startswith("Word {input}")])
def test_cached_decoding_equals_the_reference_forward(template):
    """Where the slot lies among the shared tokens, decoding runs the cached decoder with the K/V in the shared
    cache: the same words as re-running the reference forward over every sequence per token."""
    from fastprompt.generate import slot_is_shared

    model, tok = tiny_gpt2(seed=6, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, template, 3, method="prefix", engine="naive", seed=2)
    g = torch.Generator().manual_seed(1)
    kv = tuner.prompt.detach() + 0.5 * torch.randn(tuner.prompt.shape, generator=g)
    encoded = tuner.encode(PAIRS)
    prefixes = [(e.ids[: e.target_start], e.prompt_start) for e in encoded]
    assert slot_is_shared(prefixes, 3)
    cached = tuner.method.greedy(kv, prefixes, 4, autocast=False)
    reference = tuner.method._greedy_batch(kv, prefixes, 4, autocast=False)
    assert cached == reference and any(cached)


MULTI_FIELD = {  # the other tests' templates with more fields (a field before the slot, one after it)
    '"word": "{input}", {prompt} "hint": "{hint}", "answer": "{target}': ["input", "hint", "target"],
    "{first} {prompt} {second} gives {target}": ["first", "second", "target"],
}


@pytest.mark.parametrize("engine", ["fused", "generic"])
@pytest.mark.parametrize("template", list(MULTI_FIELD))
def test_fast_equals_naive_fp32_with_fields_around_the_slot(template, engine):
    model, tok = tiny_gpt2(seed=7, initializer_range=0.2), tokenizer()
    names = MULTI_FIELD[template]
    examples = [dict(zip(names, (a, b, a + b))) for a, b in PAIRS]
    naive = fp.PromptTuner(model, tok, template, 3, method="prefix", engine="naive", seed=8)
    fast = fp.PromptTuner(model, tok, template, 3, method="prefix", engine=engine, prompt=naive.prompt.detach())
    g = torch.Generator().manual_seed(2)
    kv = naive.prompt.detach() + 0.3 * torch.randn(naive.prompt.shape, generator=g)
    results = []
    for tuner in (naive, fast):
        tuner.prompt.data.copy_(kv)
        loss = tuner.loss(examples)
        results.append((loss, *torch.autograd.grad(loss, tuner.prompt)))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) <= 1e-5 and rel_err(g1, g0) <= 1e-5 and g0.abs().sum() > 0


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_generic_layer_kv_on_llama_equals_hugging_face_with_the_kv_as_cache(layout):
    """Beyond the GPT-2 family, per-layer K/V are keys and values as the model's cache holds them (rotary
    models: already rotated). With the slot at the start, Hugging Face's own forward with the K/V as its
    cache is an independent reference: the generic engine's loss and gradient equal it on a tiny Llama (GQA)."""
    from transformers import DynamicCache

    from fastprompt.engines import make_engine
    from helpers import tiny_causal_lm

    model, tok = tiny_causal_lm("llama"), tokenizer()
    L = 3
    encoder = fp.PromptTuner(model, tok, "{prompt} {input} and {target}", L, engine="naive").encoder
    batch = encoder.encode_all(PAIRS)
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    kv = (0.5 * torch.randn(c.num_hidden_layers, 2, L, c.num_key_value_heads, hd,
                            generator=torch.Generator().manual_seed(3))).requires_grad_(True)
    engine = make_engine("generic", model, encoder, "fp32", layout=layout)
    ce, n = engine.loss_terms(PromptInputs(layer_kv=kv), batch)
    (grad,) = torch.autograd.grad(ce / n, kv)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ref_ce = 0
    for e in batch:
        cache = DynamicCache(config=c)
        for layer in range(c.num_hidden_layers):
            cache.update(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None], layer)
        ids = torch.tensor([e.ids[L:]])
        T = ids.shape[1]
        logits = model(input_ids=ids, **{name: cache}, position_ids=torch.arange(L, L + T)[None],
                       attention_mask=torch.ones(1, L + T, dtype=torch.long)).logits[0]
        labels = torch.tensor(e.ids[e.target_start:])
        ref_ce = ref_ce + torch.nn.functional.cross_entropy(logits[e.target_start - L - 1 : T - 1], labels,
                                                            reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref_ce / n, kv)
    assert rel_err(ce, ref_ce) < 1e-5 and rel_err(grad, ref_grad) < 1e-5 and ref_grad.abs().sum() > 0
    assert (engine._packed is not False) == (layout == "packed")


# ------------------------------------------------------------------------ every family (rotary models)
FAMILY_MODELS = {  # kind -> overrides: GQA, q/k norm, sliding windows shorter than the sequences
    "llama": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48),
    "qwen3": {},
    "mistral": dict(sliding_window=12),  # shorter than the json template's sequences, reaching the slot from the target
    "gemma3": dict(sliding_window=3),
}


def _family_model(kind):
    from helpers import tiny_causal_lm

    model = tiny_causal_lm(kind, seed=4, **FAMILY_MODELS[kind])
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # random norms: a missing or misplaced q/k norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("engine", ["fused", "generic"])
@pytest.mark.parametrize("template", [TEMPLATES[0], TEMPLATES[1], TEMPLATES[3],
                                      '"word": "{input}", {prompt} "hint": "{hint}", "answer": "{target}'])
@pytest.mark.parametrize("kind", list(FAMILY_MODELS))
def test_every_family_fast_equals_naive_fp32(kind, template, engine):
    """Keys after q/k norm and RoPE, as the cache holds them, wherever the slot stands: the packed and generic
    engines equal the naive reference (the model's own forward, the slot's K/V written over at its cache
    update)."""
    model, tok = _family_model(kind), tokenizer()
    examples = [{"input": a, "hint": b, "target": b} for a, b in PAIRS]
    if "{hint}" not in template:
        examples = [(a, b) for a, b in PAIRS]
    naive = fp.PromptTuner(model, tok, template, 3, method="prefix", engine="naive", seed=8)
    fast = fp.PromptTuner(model, tok, template, 3, method="prefix", engine=engine, prompt=naive.prompt.detach())
    assert fast.engine.name == engine
    kv = naive.prompt.detach() + 0.3 * torch.randn(naive.prompt.shape, generator=torch.Generator().manual_seed(2))
    c = model.config
    assert kv.shape[3:] == (c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    results = []
    for tuner in (naive, fast):
        tuner.prompt.data.copy_(kv)
        loss = tuner.loss(examples)
        results.append((loss, *torch.autograd.grad(loss, tuner.prompt)))
    (l0, g0), (l1, g1) = results
    assert rel_err(l1, l0) <= 1e-5 and rel_err(g1, g0) <= 1e-5 and g0.abs().sum() > 0


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_rotary_reference_equals_hugging_face_with_the_kv_as_cache(kind):
    """The naive reference on a rotary model, slot first: Hugging Face's forward with the K/V as its cache."""
    from transformers import DynamicCache

    model, tok = _family_model(kind), tokenizer()
    L = 3
    naive = fp.PromptTuner(model, tok, "{prompt} {input} and {target}", L, method="prefix", engine="naive", seed=1)
    kv = naive.prompt.detach() + 0.3 * torch.randn(naive.prompt.shape, generator=torch.Generator().manual_seed(4))
    e = naive.encode(PAIRS[-1:])[0]
    c = model.config
    cache = DynamicCache(config=c)
    for layer in range(c.num_hidden_layers):
        cache.update(kv[layer, 0].transpose(0, 1)[None], kv[layer, 1].transpose(0, 1)[None], layer)
    ids = torch.tensor([e.ids[L:]])
    T = ids.shape[1]
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    logits = model(input_ids=ids, **{name: cache}, position_ids=torch.arange(L, L + T)[None],
                   attention_mask=torch.ones(1, L + T, dtype=torch.long)).logits[0]
    ce = torch.nn.functional.cross_entropy(logits[e.target_start - L - 1 : T - 1], torch.tensor(e.ids[e.target_start:]),
                                           reduction="sum")
    ce_naive, _ = naive.engine.loss_terms(PromptInputs(layer_kv=kv), [e])
    assert rel_err(ce_naive, ce) < 1e-5


@pytest.mark.parametrize("template", [TEMPLATES[0], TEMPLATES[1]])
def test_rotary_init_and_decoding(template):
    """init: the K/V a soft prompt produces at the slot (the same loss as that soft prompt); cached decoding
    equals re-running the reference forward per token."""
    model, tok = _family_model("qwen3"), tokenizer()
    soft = fp.PromptTuner(model, tok, template, 3, engine="naive", init="text:antonyms of", seed=0)
    prefix = fp.PromptTuner(model, tok, template, 3, method="prefix", engine="fused", init="text:antonyms of", seed=0)
    assert rel_err(prefix.loss(PAIRS), soft.loss(PAIRS)) < 1e-5
    encoded = prefix.encode(PAIRS)
    prefixes = [(e.ids[: e.target_start], e.prompt_start) for e in encoded]
    kv = prefix.prompt.detach() + 0.5 * torch.randn(prefix.prompt.shape, generator=torch.Generator().manual_seed(1))
    cached = prefix.method.greedy(kv, prefixes, 3, autocast=False)
    assert cached == prefix.method._greedy_batch(kv, prefixes, 3, autocast=False)
