
import pytest
import torch

import fastprompt as fp
from fastprompt.engines.naive import NaiveEngine
from fastprompt.template import TemplateEncoder

from helpers import rel_err, tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("antidisestablishment", "establishmentarianism"), ("up", "down"), ("null", "nan"),
         ("scatter", "crowd")]


def hand_loss(model, tok, prompt, pairs):
    """One unpadded sequence at a time, log-softmax picked by hand: an independent computation."""
    total, count = 0.0, 0
    wte = model.get_input_embeddings().weight
    for w1, w2 in pairs:
        head = tok("Here are two")["input_ids"]
        rest = tok(f" {w1} and")["input_ids"]
        target = tok(f" {w2}")["input_ids"]
        embeds = torch.cat([wte[head], prompt, wte[rest], wte[target]])
        logits = model(inputs_embeds=embeds[None]).logits[0].double()
        start = len(head) + len(prompt) + len(rest)
        for j, y in enumerate(target):
            logp = logits[start + j - 1] - torch.logsumexp(logits[start + j - 1], 0)
            total = total - logp[y]
            count += 1
    return total / count


def test_naive_loss_equals_hand_computation():
    model, tok = tiny_gpt2(seed=3), tokenizer()
    enc = TemplateEncoder("Here are two {prompt} {input} and {target}", tok, prompt_len=4)
    prompt = torch.randn(4, 64) * 0.1
    engine = NaiveEngine(model, enc)
    ce_sum, n = engine.loss_terms(prompt, enc.encode_all(PAIRS))
    expected = hand_loss(model, tok, prompt.double().float(), PAIRS)
    assert n == sum(len(tok(" " + b)["input_ids"]) for _, b in PAIRS)
    assert rel_err(ce_sum / n, expected) < 1e-5


def test_naive_gradient_flows_only_to_the_prompt():
    model, tok = tiny_gpt2(seed=4), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=3, engine="naive", seed=0)
    loss = tuner.loss(PAIRS)
    (grad,) = torch.autograd.grad(loss, tuner.prompt)
    assert grad.shape == (3, 64) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_autocast_is_close_to_fp32():
    model, tok = tiny_gpt2(seed=5), tokenizer()
    enc = TemplateEncoder("Here are two {prompt} {input} and {target}", tok, prompt_len=4)
    prompt = torch.randn(4, 64) * 0.1
    batch = enc.encode_all(PAIRS)
    ref = NaiveEngine(model, enc, "fp32").loss_terms(prompt, batch)[0]
    amp = NaiveEngine(model, enc, "autocast").loss_terms(prompt, batch)[0]
    assert torch.isfinite(amp) and rel_err(amp, ref) < 2e-2


def test_unknown_precision_is_a_config_error():
    model, tok = tiny_gpt2(), tokenizer()
    with pytest.raises(fp.ConfigError, match="precision"):
        fp.PromptTuner(model, tok, prompt_len=4, engine="naive", precision="fp8")
    with pytest.raises(fp.ConfigError, match="engine"):
        fp.PromptTuner(model, tok, prompt_len=4, engine="warp")


def test_prompt_inits():
    model, tok = tiny_gpt2(), tokenizer()
    table = model.get_input_embeddings().weight
    random = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", seed=1).prompt
    assert random.dtype == torch.float32 and random.shape == (4, 64)
    assert torch.equal(random, fp.PromptTuner(model, tok, prompt_len=4, engine="naive", seed=1).prompt)
    text = fp.PromptTuner(model, tok, prompt_len=6, engine="naive", init="text:antonyms").prompt
    ids = tok(" antonyms")["input_ids"]
    assert torch.equal(text.data, table[(ids * 2)[:6]])
    vocab = fp.PromptTuner(model, tok, prompt_len=2, engine="naive", init="vocab").prompt
    assert all((table == row).all(-1).any() for row in vocab.data)
    with pytest.raises(fp.ConfigError, match="init"):
        fp.PromptTuner(model, tok, prompt_len=2, engine="naive", init="zeros")
