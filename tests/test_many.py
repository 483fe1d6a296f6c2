"""K prompts in one pass (issue 24): ``loss_terms_many`` of the packed engine against the naive reference
(K separate runs), and K-prompt training against K separate ``fit`` runs, fp32 1e-5 relative."""
from __future__ import annotations

import math
import random

import pytest
import torch

from fastprompt.engines import make_engine
from fastprompt.engines.base import PromptInputs
from fastprompt.errors import ConfigError
from fastprompt.template import TemplateEncoder

from helpers import rel_err, tiny_causal_lm, tiny_gpt2, tokenizer

TOL = 1e-5
TEMPLATES = {
    "middle": "Here are two {prompt} {input} and {target}",  # the prompt in the trunk
    "end": "Word: {input}. Opposite {prompt} {target}",  # a field before the prompt: the prompt in every suffix
}
WORDS = ["a", "go", "up", "hot", "red", "antidisestablishment", "big", "dry", "xylophonist", "new", "low"]


def model_of(kind):
    return tiny_gpt2(seed=1) if kind == "gpt2" else tiny_causal_lm(kind, seed=2)


def batch_of(encoder, n, seed):
    rng = random.Random(seed)
    return encoder.encode_all([{"input": rng.choice(WORDS), "target": rng.choice(WORDS)} for _ in range(n)])


def prompts(model, L, K, seed=0, layer_kv=False):
    g = torch.Generator().manual_seed(seed)
    if layer_kv:
        c = model.config
        H = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n = c.num_hidden_layers
        return [torch.randn(n, 2, L, H, D, generator=g).requires_grad_(True) for _ in range(K)]
    d = model.get_input_embeddings().weight.shape[1]
    return [(0.3 * torch.randn(L, d, generator=g)).requires_grad_(True) for _ in range(K)]


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mistral", "gemma3"])
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("shared", [True, False])
def test_loss_terms_many_is_k_separate_runs(kind, template, shared):
    """Each prompt's (ce_sum, n_tokens) and gradient equal a naive run of that prompt alone; prompts on one
    shared batch object and on their own batches of different sizes (1, 7, 3)."""
    model = model_of(kind)
    enc = TemplateEncoder(TEMPLATES[template], tokenizer(), 3)
    fused = make_engine("fused", model, enc, "fp32")
    naive = make_engine("naive", model, enc, "fp32")
    assert fused.many_in_one_pass and not naive.many_in_one_pass
    xs = prompts(model, 3, 3)
    batches = [batch_of(enc, 5, 0)] * 3 if shared else [batch_of(enc, n, s) for s, n in enumerate((1, 7, 3))]
    terms = fused.loss_terms_many(xs, batches)
    total = sum(ce / n for ce, n in terms)
    grads = torch.autograd.grad(total, xs)
    for x, b, (ce, n), g in zip(xs, batches, terms, grads):
        ref_ce, ref_n = naive.loss_terms(x, b)
        (ref_g,) = torch.autograd.grad(ref_ce / ref_n, x)
        assert n == ref_n
        assert rel_err(ce, ref_ce) <= TOL and rel_err(g, ref_g) <= TOL


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_loss_terms_many_prefix_kv(kind):
    """Per-layer K/V prompts (prefix-tuning) in one pass: each equal to its naive run."""
    model = model_of(kind)
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 2)
    fused = make_engine("fused", model, enc, "fp32")
    naive = make_engine("naive", model, enc, "fp32")
    xs = prompts(model, 2, 2, layer_kv=True)
    batches = [batch_of(enc, 4, 1), batch_of(enc, 2, 2)]
    terms = fused.loss_terms_many([PromptInputs(layer_kv=x) for x in xs], batches)
    grads = torch.autograd.grad(sum(ce / n for ce, n in terms), xs)
    for x, b, (ce, n), g in zip(xs, batches, terms, grads):
        ref_ce, ref_n = naive.loss_terms(PromptInputs(layer_kv=x), b)
        (ref_g,) = torch.autograd.grad(ref_ce / ref_n, x)
        assert rel_err(ce, ref_ce) <= TOL and rel_err(g, ref_g) <= TOL


def test_a_nan_prompt_stays_in_its_rows():
    """A NaN in one prompt makes its own loss and gradient NaN, never another prompt's."""
    model = model_of("llama")
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3)
    fused = make_engine("fused", model, enc, "fp32")
    xs = prompts(model, 3, 3)
    with torch.no_grad():
        xs[1][0, 0] = float("nan")
    batch = batch_of(enc, 4, 0)
    terms = fused.loss_terms_many(xs, [batch] * 3)
    grads = torch.autograd.grad(sum(ce / n for ce, n in terms), xs)
    assert math.isnan(terms[1][0].item()) and not torch.isfinite(grads[1]).all()
    for k in (0, 2):
        assert math.isfinite(terms[k][0].item()) and torch.isfinite(grads[k]).all()


def test_loss_terms_many_refuses_mixed_prompts():
    model = model_of("gpt2")
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3)
    fused = make_engine("fused", model, enc, "fp32")
    batch = batch_of(enc, 2, 0)
    with pytest.raises(ConfigError, match="prompt length 3"):
        fused.loss_terms_many([torch.zeros(3, 64), torch.zeros(4, 64)], [batch, batch])
    with pytest.raises(ValueError, match="2 prompts but 1 batches"):
        fused.loss_terms_many([torch.zeros(3, 64)] * 2, [batch])
