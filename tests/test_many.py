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


@pytest.mark.parametrize("kind", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("layer_kv", [False, True])
def test_prompts_of_different_lengths_in_one_pass(kind, template, layer_kv):
    """Prompts of lengths 1, 4, 2 (each batch encoded for its length, one batch shared by two prompts of one
    length) in one pass: each loss and gradient equal a naive run of that prompt alone."""
    model = model_of(kind)
    lengths = (1, 4, 2, 4)
    encs = {L: TemplateEncoder(TEMPLATES[template], tokenizer(), L) for L in set(lengths)}
    fused = make_engine("fused", model, encs[2], "fp32")
    shared = batch_of(encs[4], 3, 9)
    batches = [batch_of(encs[1], 2, 0), shared, batch_of(encs[2], 5, 1), shared]
    xs = [prompts(model, L, 1, seed=k, layer_kv=layer_kv)[0] for k, L in enumerate(lengths)]
    wrap = (lambda x: PromptInputs(layer_kv=x)) if layer_kv else (lambda x: x)
    terms = fused.loss_terms_many([wrap(x) for x in xs], batches, encoders=[encs[L] for L in lengths])
    grads = torch.autograd.grad(sum(ce / n for ce, n in terms), xs)
    for x, L, b, (ce, n), g in zip(xs, lengths, batches, terms, grads):
        ref_ce, ref_n = make_engine("naive", model, encs[L], "fp32").loss_terms(wrap(x), b)
        (ref_g,) = torch.autograd.grad(ref_ce / ref_n, x)
        assert n == ref_n and g.shape == x.shape
        assert rel_err(ce, ref_ce) <= TOL and rel_err(g, ref_g) <= TOL


def test_different_lengths_refusals():
    """A prompt whose length is not its encoder's, and an encoder of another template, are refused by name."""
    model = model_of("gpt2")
    enc3 = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3)
    enc2 = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 2)
    other = TemplateEncoder(TEMPLATES["end"], tokenizer(), 2)
    fused = make_engine("fused", model, enc3, "fp32")
    b3, b2 = batch_of(enc3, 2, 0), batch_of(enc2, 2, 0)
    with pytest.raises(ConfigError, match="prompt 1 has 3 vectors, not its encoder's prompt length 2"):
        fused.loss_terms_many([torch.zeros(3, 64)] * 2, [b3, b2], encoders=[enc3, enc2])
    with pytest.raises(ConfigError, match="another template"):
        fused.loss_terms_many([torch.zeros(3, 64), torch.zeros(2, 64)], [b3, batch_of(other, 2, 0)],
                              encoders=[enc3, other])
    with pytest.raises(ValueError, match="2 prompts but 1 encoders"):
        fused.loss_terms_many([torch.zeros(3, 64)] * 2, [b3, b3], encoders=[enc3])


def test_loss_terms_many_refuses_mixed_prompts():
    model = model_of("gpt2")
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 3)
    fused = make_engine("fused", model, enc, "fp32")
    batch = batch_of(enc, 2, 0)
    with pytest.raises(ConfigError, match="prompt length 3"):
        fused.loss_terms_many([torch.zeros(3, 64), torch.zeros(4, 64)], [batch, batch])
    with pytest.raises(ValueError, match="2 prompts but 1 batches"):
        fused.loss_terms_many([torch.zeros(3, 64)] * 2, [batch])


# ------------------------------------------------------------------------------------------ training
import fastprompt as fp  # noqa: E402
from fastprompt.errors import NonFiniteError  # noqa: E402

TRAIN = [{"input": w, "target": WORDS[-1 - i]} for i, w in enumerate(WORDS)]
TEST = TRAIN[:4]


def points():
    """Mixed learning rates, inits and seeds; one prompt per point."""
    return [dict(lr=1e-2, init="random", seed=0), dict(lr=3e-2, init="text:antonyms", seed=1),
            dict(lr=1e-3, init="random", seed=5)]


@pytest.mark.parametrize("kind,engine", [("gpt2", "fused"), ("llama", "fused"), ("gpt2", "naive"), ("llama", "generic")])
def test_fit_many_is_k_separate_fits(kind, engine):
    """Every point's prompt, Adam state and history equal its own fit run (same seeds), on the packed engine
    (one pass) and the naive reference (its loop)."""
    model = model_of(kind)
    fit = dict(train=TRAIN, epochs=2, batch_size=4, eval_data=TEST, eval_every=0)
    base = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine=engine, precision="fp32")
    tuners = [base.variant(init=p["init"], seed=p["seed"]) for p in points()]
    results = fp.PromptTuner.fit_many(tuners, [{**fit, "lr": p["lr"]} for p in points()])
    for p, tuner, history in zip(points(), tuners, results):
        alone = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine=engine, precision="fp32",
                               init=p["init"], seed=p["seed"])
        ref = alone.fit(**{**fit, "lr": p["lr"]}, progress=False)
        assert history is tuner.history and len(history) == len(ref) == 2
        assert rel_err(tuner.prompt, alone.prompt) <= TOL
        assert rel_err(tuner.optimizer.state[tuner.prompt]["exp_avg_sq"],
                       alone.optimizer.state[alone.prompt]["exp_avg_sq"]) <= TOL
        for a, b in zip(history, ref):
            assert a["step"] == b["step"] and a["lr"] == b["lr"] == p["lr"]
            assert abs(a["test_loss"] - b["test_loss"]) <= TOL * abs(b["test_loss"])


def test_fit_many_a_nan_prompt_stops_alone():
    """A prompt whose every step is NaN stops with its NonFiniteError (after the guard's 3 steps, not applied);
    the others train on, exactly as alone."""
    model = model_of("llama")
    base = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine="fused", precision="fp32")
    bad = torch.full_like(base.prompt, float("nan"))
    tuners = [base.variant(seed=0), base.variant(prompt=bad), base.variant(seed=2)]
    fit = dict(train=TRAIN, epochs=2, batch_size=4, lr=1e-2)
    results = fp.PromptTuner.fit_many(tuners, [fit] * 3)
    assert isinstance(results[1], NonFiniteError) and tuners[1].nonfinite.skipped == 3
    assert torch.isnan(tuners[1].prompt).all()
    for k in (0, 2):
        alone = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine="fused", precision="fp32", seed=k)
        alone.fit(**fit, progress=False)
        assert results[k] is tuners[k].history and len(results[k]) == 2
        assert rel_err(tuners[k].prompt, alone.prompt) <= TOL


def test_fit_many_budgets_and_resume_per_point():
    """max_steps per point: each stops at its own budget with resume_at set; a second fit_many continues each
    to the same prompt as one uninterrupted fit."""
    model = model_of("gpt2")
    base = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine="fused", precision="fp32")
    tuners = [base.variant(seed=0), base.variant(seed=1)]
    fit = dict(train=TRAIN, epochs=2, batch_size=4, lr=1e-2)
    fp.PromptTuner.fit_many(tuners, [{**fit, "max_steps": 2}, {**fit, "max_steps": 4}])
    assert [t.resume_at["step"] for t in tuners] == [2, 1]
    fp.PromptTuner.fit_many(tuners, [{**fit, "epochs": 2 - len(t.history)} for t in tuners])
    for k, t in enumerate(tuners):
        alone = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine="fused", precision="fp32", seed=k)
        alone.fit(**fit, progress=False)
        assert t.history[-1]["step"] == 6 and rel_err(t.prompt, alone.prompt) <= TOL


@pytest.mark.parametrize("engine", ["fused", "generic", "naive"])
def test_fit_many_prompts_of_different_lengths(engine):
    """Tuners of prompt lengths 3, 1, 3 (two engines, the first's variant for the second 3) trained together:
    one pass for all on the packed engine, each length's own loop elsewhere; every prompt equals its fit."""
    model = model_of("llama")
    fit = dict(train=TRAIN, epochs=2, batch_size=4, eval_data=TEST, eval_every=0)
    make = lambda L, seed: fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], L, engine=engine,  # noqa: E731
                                          precision="fp32", seed=seed)
    base3 = make(3, 0)
    tuners = [base3, make(1, 1), base3.variant(seed=2)]
    lrs = (1e-2, 3e-2, 2e-2)
    from fastprompt.step import ManyStep, TrainStep

    step = ManyStep(base3.engine, [TrainStep(t.method, t.engine, t.prompt, None, t.nonfinite, 4, static=False)
                                   for t in tuners])
    assert step.one_pass() == (engine == "fused")
    fp.PromptTuner.fit_many(tuners, [{**fit, "lr": lr} for lr in lrs])
    for tuner, L, seed, lr in zip(tuners, (3, 1, 3), (0, 1, 2), lrs):
        alone = make(L, seed)
        ref = alone.fit(**{**fit, "lr": lr}, progress=False)
        assert tuner.prompt.shape[0] == L and rel_err(tuner.prompt, alone.prompt) <= TOL
        assert abs(tuner.history[-1]["test_loss"] - ref[-1]["test_loss"]) <= TOL * abs(ref[-1]["test_loss"])


def test_fit_many_refuses_tuners_of_other_engines():
    model = model_of("gpt2")
    a = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 3, engine="fused")
    for b in (fp.PromptTuner(model_of("gpt2"), tokenizer(), TEMPLATES["middle"], 3, engine="fused"),
              fp.PromptTuner(model, tokenizer(), TEMPLATES["end"], 3, engine="fused"),
              fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 2, engine="naive")):
        with pytest.raises(ConfigError, match="share one engine"):
            fp.PromptTuner.fit_many([a, b], [dict(train=TRAIN)] * 2)
    with pytest.raises(ConfigError, match="no argument lrr"):
        fp.PromptTuner.fit_many([a], [dict(train=TRAIN, lrr=1)])


@pytest.mark.parametrize("method", ["relaxed", "hard", "prefix"])
def test_fit_many_other_methods(method):
    """Every method's points through one pass equal their own fits (relaxed: its lr_scale and schedule;
    prefix: per-layer K/V prompts)."""
    model = model_of("gpt2")
    fit = dict(train=TRAIN, epochs=1, batch_size=4)
    base = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 2, engine="fused", precision="fp32",
                          method=method)
    tuners = [base.variant(seed=3), base.variant(seed=4)]
    fp.PromptTuner.fit_many(tuners, [{**fit, "lr": 1e-2}, {**fit, "lr": 3e-2}])
    for tuner, seed, lr in zip(tuners, (3, 4), (1e-2, 3e-2)):
        alone = fp.PromptTuner(model, tokenizer(), TEMPLATES["middle"], 2, engine="fused", precision="fp32",
                               method=method, seed=seed)
        alone.fit(**fit, lr=lr, progress=False)
        assert rel_err(tuner.prompt, alone.prompt) <= TOL and tuner.method.step == alone.method.step
