"""The generic engine against the naive reference: same loss, same prompt gradient, same training run.

Tiny random models (GPT-2, Llama, Qwen2, Gemma3 with a sliding window shorter than the sequences and logit
soft-capping) with the GPT-2 tokenizer. fp32 tolerance 1e-5 (relative, norm; measured <= ~9e-7 against naive
fp32 at >= 16 rows and against naive float64); in float64 both engines agree to ~1e-16 (GPT-2).
"""
import copy
import functools
import random

import pytest
import torch

from fastprompt.engines import make_engine
from fastprompt.engines.generic import GenericEngine
from fastprompt.engines.naive import NaiveEngine
from fastprompt.errors import ConfigError
from fastprompt.kvcache import cache_kwarg
from fastprompt.models import gpt2_tokenizer, random_gpt2
from fastprompt.template import TemplateEncoder
from fastprompt.tuner import PromptTuner

from helpers import tiny_causal_lm

START = "{prompt} {input} and {target}"
MIDDLE = "Here are two {prompt} {input} and {target}"
END = "Word: {input}. Opposite {prompt} {target}"  # a field before the prompt: empty head
TWO_FIELDS = "{first} {prompt} {second} gives {target}"  # the prompt between two fields
HEAD_ROW = "Here are two {prompt} {target}"  # the head's last row predicts the first target token

# short words; some targets are 2-3 GPT-2 tokens (" gregarious", " ephemeral", " nadir" ...)
PAIRS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("wet", "dry"), ("old", "new"),
         ("verbose", "laconic"), ("taciturn", "gregarious"), ("symmetric", "asymmetric"), ("zenith", "nadir"),
         ("perennial", "ephemeral"), ("frugal", "extravagant"), ("benevolent", "malevolent"),
         ("timid", "audacious"), ("dense", "sparse"), ("underestimate", "overestimate"), ("win", "lose")]
WORDS = sorted({w for pair in PAIRS for w in pair})


@functools.lru_cache(maxsize=None)
def tokenizer():
    return gpt2_tokenizer()


@functools.lru_cache(maxsize=None)
def tiny(kind: str):
    """A tiny random causal LM with GPT-2's vocabulary (50,257), eval mode, frozen."""
    if kind == "gpt2":
        return random_gpt2(dict(n_layer=2, n_embd=64, n_head=4, n_positions=128), seed=0).requires_grad_(False)
    model = tiny_causal_lm("llama" if kind == "llama_eager" else kind)
    if kind == "llama_eager":
        model.config._attn_implementation = "eager"  # the default elsewhere is sdpa
    return model


@functools.lru_cache(maxsize=None)
def tiny64(kind: str):
    """The same model in float64: a reference that fp32 rounding does not blur."""
    return copy.deepcopy(tiny(kind)).to(torch.float64)


def examples(template: str, n: int, seed: int = 0):
    """``n`` examples with mixed lengths and multi-token targets (pairs first, then random word pairs)."""
    rng = random.Random(seed)
    pairs = [PAIRS[i % len(PAIRS)] if i < len(PAIRS) else (rng.choice(WORDS), rng.choice(WORDS)) for i in range(n)]
    rng.shuffle(pairs)
    if "{first}" in template:
        return [{"first": a, "second": rng.choice(WORDS), "target": b} for a, b in pairs]
    if "{input}" not in template:
        return [{"target": b} for _, b in pairs]
    return pairs


def encode(model, template, prompt_len, n, seed=0):
    encoder = TemplateEncoder(template, tokenizer(), prompt_len)
    return encoder, encoder.encode_all(examples(template, n, seed))


def loss_and_grad(engine, prompt, batch):
    prompt = prompt.detach().clone().requires_grad_(True)
    ce_sum, n_tokens = engine.loss_terms(prompt, batch)
    loss = ce_sum / n_tokens
    (grad,) = torch.autograd.grad(loss, prompt)
    return loss.detach(), grad


def random_prompt(model, prompt_len, seed=1, dtype=torch.float32):
    d = model.get_input_embeddings().weight.shape[1]
    return torch.randn(prompt_len, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def compare(kind, template, prompt_len, n, precision="fp32", seed=0, reference=torch.float32):
    """Relative (loss, gradient) error of the generic engine against naive, run at ``reference`` dtype."""
    model = tiny(kind)
    encoder, batch = encode(model, template, prompt_len, n, seed)
    prompt = random_prompt(model, prompt_len)
    ref_model = model if reference == torch.float32 else tiny64(kind)
    ref_loss, ref_grad = loss_and_grad(NaiveEngine(ref_model, encoder), prompt.to(reference), batch)
    loss, grad = loss_and_grad(GenericEngine(model, encoder, precision), prompt, batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    return rel(loss, ref_loss), rel(grad, ref_grad)


def test_data_is_awkward():
    """Multi-token targets and suffixes of several lengths, in every template."""
    for template in (START, MIDDLE, END, TWO_FIELDS, HEAD_ROW):
        encoder, batch = encode(tiny("gpt2"), template, 5, 7)
        assert any(e.target_len > 1 for e in batch)
        assert len({len(e.ids) for e in batch}) > 1


# ---------------------------------------------------------------------------------- exactness, fp32
@pytest.mark.parametrize("template", [START, MIDDLE, END, TWO_FIELDS, HEAD_ROW])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2", "gemma3"])
def test_matches_naive(kind, template):
    loss_err, grad_err = compare(kind, template, prompt_len=5, n=7)
    assert loss_err <= 1e-5 and grad_err <= 1e-5, (loss_err, grad_err)


@pytest.mark.parametrize("template", [MIDDLE, END])
def test_matches_naive_eager_attention(template):
    """Eager attention as well as SDPA (the default of every other test)."""
    assert tiny("llama_eager").config._attn_implementation == "eager"
    loss_err, grad_err = compare("llama_eager", template, prompt_len=5, n=7)
    assert loss_err <= 1e-5 and grad_err <= 1e-5, (loss_err, grad_err)


@pytest.mark.parametrize("template,prompt_len,batch_size", [
    (END, 1, 64), (MIDDLE, 5, 1), (MIDDLE, 5, 64), (END, 64, 1), (MIDDLE, 64, 7)])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_prompt_lengths_and_batch_sizes(kind, template, prompt_len, batch_size):
    """At batch 1 the reference is naive in float64: there the fp32 naive loop has fewer than 16 rows and is
    itself ~7e-6 off (the CPU BLAS effect described at ROW_BUCKET in generic.py), too close to 1e-5."""
    reference = torch.float64 if batch_size == 1 else torch.float32
    loss_err, grad_err = compare(kind, template, prompt_len, batch_size, seed=batch_size, reference=reference)
    assert loss_err <= 1e-5 and grad_err <= 1e-5, (loss_err, grad_err)


@pytest.mark.parametrize("kind,template", [("gpt2", MIDDLE), ("gpt2", TWO_FIELDS), ("gemma3", END)])
def test_exact_in_float64(kind, template):
    """The same computation, not an approximation: float64 models agree far below fp32 rounding. Both
    engines take the cross-entropy in fp32 by contract (``logits.float()``), which bounds the agreement: ~1e-16
    for GPT-2, ~1e-7 with Gemma's soft-capped logits."""
    model = tiny64(kind)
    encoder, batch = encode(model, template, 5, 7)
    prompt = random_prompt(model, 5, dtype=torch.float64)
    ref_loss, ref_grad = loss_and_grad(NaiveEngine(model, encoder), prompt, batch)
    loss, grad = loss_and_grad(GenericEngine(model, encoder), prompt, batch)
    assert rel(loss, ref_loss) <= 1e-6 and rel(grad, ref_grad) <= 1e-6, (rel(loss, ref_loss), rel(grad, ref_grad))


def test_fit_matches_naive():
    """Two epochs of PromptTuner.fit end at the same prompt (within fp32 rounding) with either engine."""
    model = tiny("gpt2")
    train = examples(MIDDLE, 24, seed=3)
    prompts, histories = [], []
    for engine in ("naive", "generic"):
        tuner = PromptTuner(model, tokenizer(), MIDDLE, prompt_len=4, engine=engine, seed=7)
        start = tuner.prompt.detach().clone()
        histories.append(tuner.fit(train, epochs=2, batch_size=8, lr=1e-2, progress=False))
        prompts.append(tuner.prompt.detach().clone())
    moved = (prompts[0] - start).norm()
    assert moved > 0
    assert ((prompts[1] - prompts[0]).norm() / moved).item() <= 1e-5  # measured 3e-7
    for a, b in zip(*histories):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)


# ------------------------------------------------------------------------------------ bf16, autocast
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_reduced_precision(kind):
    """bf16 (a bf16 copy of the weights, fp32 prompt and loss) and autocast, against naive fp32."""
    model = tiny(kind)
    encoder, batch = encode(model, MIDDLE, 5, 16)
    prompt = random_prompt(model, 5)
    ref_loss, ref_grad = loss_and_grad(NaiveEngine(model, encoder), prompt, batch)
    base_loss, base_grad = loss_and_grad(NaiveEngine(model, encoder, "autocast"), prompt, batch)
    baseline = rel(base_grad, ref_grad)  # plain torch bf16 against fp32: the error budget's unit
    for precision in ("bf16", "autocast"):
        loss, grad = loss_and_grad(GenericEngine(model, encoder, precision), prompt, batch)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert grad.dtype == torch.float32
        assert rel(loss, ref_loss) < 2e-2
        assert rel(grad, ref_grad) < max(2e-2, 2 * baseline), (precision, rel(grad, ref_grad), baseline)


def test_bf16_model_is_used_as_is():
    """A model already in bf16 runs itself (no copy); the prompt stays fp32 and gets an fp32 gradient."""
    model = random_gpt2(dict(n_layer=2, n_embd=64, n_head=4, n_positions=128), seed=0).to(torch.bfloat16)
    encoder, batch = encode(model, MIDDLE, 5, 7)
    engine = GenericEngine(model, encoder, "bf16")
    assert engine.runner is model
    loss, grad = loss_and_grad(engine, random_prompt(model, 5), batch)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.dtype == torch.float32


# ----------------------------------------------------------------------------- the user's model
def _state(model):
    return ([(n, p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()],
            [m.training for m in model.modules()], {n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize("precision", ["fp32", "autocast", "bf16"])
def test_model_unchanged(precision):
    model = random_gpt2(dict(n_layer=2, n_embd=64, n_head=4, n_positions=128), seed=1)
    model.train()  # a user's model in train mode with trainable weights: all of it must stay as it was
    model.transformer.h[1].eval()
    model.lm_head.requires_grad_(False)
    before = _state(model)
    encoder, batch = encode(model, MIDDLE, 5, 7)
    loss_and_grad(GenericEngine(model, encoder, precision), random_prompt(model, 5), batch)
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1]
    assert all(torch.equal(after[2][n], before[2][n]) for n in before[2])
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------- what is computed
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("template", [MIDDLE, END])
def test_shared_work_runs_once(template, layout):
    """After the first step: the head once at batch 1; the suffix once, either packed (the head's rows and all
    examples' rows side by side in one sequence at batch 1: no padding) or padded (batch B against an expanded, not copied, cache); no prefix
    recomputation, no row after the last input token."""
    model = tiny("llama")
    encoder, batch = encode(model, template, 5, 7)
    engine = GenericEngine(model, encoder, layout=layout)
    prompt = random_prompt(model, 5)
    loss_and_grad(engine, prompt, batch)  # first step: prefix cache, logit check, packed-layout check
    assert engine._packed is (layout == "packed")
    calls = []

    def record(module, args, kwargs):
        cache = kwargs.get(engine.cache_kwarg)
        layers = [layer for layer in cache.layers if torch.is_tensor(getattr(layer, "keys", None))] if cache is not None else []
        calls.append((tuple(kwargs["inputs_embeds"].shape[:2]), [(layer.keys.shape[0], layer.keys.stride(0)) for layer in layers]))

    handle = engine.decoder.register_forward_pre_hook(record, with_kwargs=True)
    try:
        loss_and_grad(engine, prompt, batch)
    finally:
        handle.remove()
    lens = [len(e.ids) - 1 - encoder.n_shared for e in batch]
    H = encoder.n_shared - encoder.n_context
    if template == MIDDLE and layout == "padded":
        head, suffix = calls
        assert head[0] == (1, H)
    else:  # packed: the head's rows open the one pack
        (suffix,) = calls
    assert suffix[1]  # the shared cache (packed: the prefix only)
    if layout == "packed":
        assert suffix[0] == (1, H + sum(lens))
        assert all(batch_size == 1 for batch_size, _ in suffix[1])  # the batch-1 cache itself
        assert engine.rows_per_example(batch) == pytest.approx((H + sum(lens)) / len(batch))
    else:
        assert suffix[0] == (len(batch), max(lens))
        assert all(stride == 0 for _, stride in suffix[1])  # batch stride 0: a view of the batch-1 cache
        assert engine.rows_per_example(batch) == pytest.approx((H + len(batch) * max(lens)) / len(batch))


@pytest.mark.parametrize("template", [MIDDLE, END, TWO_FIELDS])
@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
def test_padded_layout_matches_naive(kind, template):
    """The padded layout (the fallback where a model takes no packed mask) stays exact."""
    model = tiny(kind)
    encoder, batch = encode(model, template, 5, 7)
    prompt = random_prompt(model, 5)
    ref_loss, ref_grad = loss_and_grad(NaiveEngine(model, encoder), prompt, batch)
    engine = GenericEngine(model, encoder, layout="padded")
    loss, grad = loss_and_grad(engine, prompt, batch)
    assert engine._packed is False
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5


@pytest.mark.parametrize("kind", ["gpt2", "llama_eager", "gemma3"])
def test_several_packs_match_naive(kind, monkeypatch):
    """Suffix rows beyond PACK_ROWS go to further packs (batch P, padded to the longest pack): still exact."""
    import fastprompt.engines.generic as generic

    monkeypatch.setattr(generic, "PACK_ROWS", 9)
    model = tiny(kind)
    encoder, batch = encode(model, MIDDLE, 5, 11)
    prompt = random_prompt(model, 5)
    ref_loss, ref_grad = loss_and_grad(NaiveEngine(model, encoder), prompt, batch)
    engine = GenericEngine(model, encoder, layout="packed")
    loss, grad = loss_and_grad(engine, prompt, batch)
    assert generic._pack_shape(engine.suffix_lens(batch))[0] > 1
    assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5


def test_layout_falls_back_to_padded():
    """A decoder that refuses the packed mask: auto runs padded (and says why), packed raises."""
    model = tiny("llama")
    encoder, batch = encode(model, MIDDLE, 5, 7)
    prompt = random_prompt(model, 5)
    ref_loss, ref_grad = loss_and_grad(NaiveEngine(model, encoder), prompt, batch)

    def refuse(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            raise TypeError("no 4D masks here")

    handle = model.base_model.register_forward_pre_hook(refuse, with_kwargs=True)
    try:
        engine = GenericEngine(model, encoder)
        loss, grad = loss_and_grad(engine, prompt, batch)
        assert engine._packed is False and "no 4D masks" in engine.packed_reason
        assert rel(loss, ref_loss) < 1e-5 and rel(grad, ref_grad) < 1e-5
        with pytest.raises(TypeError):
            loss_and_grad(GenericEngine(model, encoder, layout="packed"), prompt, batch)
    finally:
        handle.remove()
    with pytest.raises(ConfigError, match="layout"):
        make_engine("generic", model, encoder, layout="sideways")  # options are checked where engines are made


def test_fused_options_at_their_defaults_are_accepted_and_others_refused():
    model = tiny("gpt2")
    encoder, batch = encode(model, MIDDLE, 4, 3)
    engine = make_engine("generic", model, encoder, "fp32", kernels="auto", cuda_graphs="auto")  # what the CLI passes
    assert isinstance(engine, GenericEngine)
    loss_and_grad(engine, random_prompt(model, 4), batch)
    with pytest.raises(ConfigError, match="kernels='torch' is an option of the fused engine"):
        make_engine("generic", model, encoder, "fp32", kernels="torch")
    with pytest.raises(ConfigError, match="unknown engine option"):
        make_engine("generic", model, encoder, "fp32", layuot="packed")


def test_unknown_logit_transform_is_refused():
    from transformers import GPT2LMHeadModel

    class Scaled(GPT2LMHeadModel):  # a model whose forward changes the logits in a way we do not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    model = Scaled(tiny("gpt2").config).eval()
    encoder, batch = encode(model, MIDDLE, 4, 3)
    with pytest.raises(ConfigError, match="naive"):
        GenericEngine(model, encoder).loss_terms(random_prompt(model, 4), batch)


def test_cache_keyword_follows_the_signature():
    """transformers renamed the decoder's past_key_values argument to cache within 5.x: both are found."""

    class Old(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None):
            return inputs_embeds

    class New(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None):
            return inputs_embeds

    assert cache_kwarg(Old()) == "past_key_values"
    assert cache_kwarg(New()) == "cache"
