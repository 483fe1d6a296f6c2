"""The fused engine's static-shape step (the body of a CUDA graph) equals the ordinary step."""
import pytest
import torch

import fastprompt as fp
from fastprompt.engines.base import PromptInputs
from fastprompt.engines.graphs import bucket, pad_packed, static_shape
from fastprompt.step import TrainStep

from helpers import rel_err, tiny_gpt2, tokenizer

WORDS = [("hot", "cold"), ("antidisestablishment", "establishment"), ("up", "down"), ("big", "small"),
         ("wet", "dry"), ("electroencephalography", "x"), ("fast", "slow")]


def test_bucket_bounds_padding():
    for n in list(range(1, 300)) + [1000, 4097]:
        b = bucket(n)
        assert b >= n and b - n < max(16, n // 4 + 1)
    assert len({bucket(n) for n in range(200, 400)}) <= 6


@pytest.mark.parametrize("template", ["Here are two {prompt} {input} and {target}",
                                      "Word: {input}. Opposite {prompt} {target}",
                                      "{prompt} {input} means {target}"])
def test_padded_loss_and_grad_equal_unpadded(template):
    model, tok = tiny_gpt2(seed=11), tokenizer()
    tuner = fp.PromptTuner(model, tok, template, prompt_len=3, engine="fused", seed=2)
    engine = tuner.engine
    batch = tuner.encode(WORDS[:5])
    packed = engine.pack(batch)
    shape = static_shape(packed, 8, tuner.encoder.prompt_start is not None, 3)
    static = pad_packed(packed, shape)
    assert static.packed.n_rows == shape.rows > packed.n_rows
    assert static.packed.cu_seqlens.shape[0] == 8 + 2
    ce_ref, n = engine.loss_terms(tuner.prompt, batch)
    (g_ref,) = torch.autograd.grad(ce_ref / n, tuner.prompt)
    ce = engine.static_loss(PromptInputs(embeds=tuner.prompt), static)
    (g,) = torch.autograd.grad(ce / static.n_tokens, tuner.prompt)
    assert static.n_tokens.item() == n
    assert rel_err(ce, ce_ref) < 1e-6 and rel_err(g, g_ref) < 1e-6


METHODS = [("soft", {}), ("relaxed", {"gumbel": False}), ("hard", {}), ("prefix", {})]


@pytest.mark.parametrize("method,options", METHODS)
@pytest.mark.parametrize("template", ["Here are two {prompt} {input} and {target}",
                                      "Word: {input}. Opposite {prompt}: {target}"])
def test_static_steps_follow_the_ordinary_steps(template, method, options):
    """Several Adam steps, a partial last batch included, for every method: same losses, same trained tensor,
    same schedule (the static step is the body of the captured graph)."""
    model, tok = tiny_gpt2(seed=12), tokenizer()
    tuners = []
    for static in (False, True):
        tuner = fp.PromptTuner(model, tok, template, prompt_len=2, engine="fused", seed=3, method=method,
                               method_options=options)
        tuner.optimizer = tuner.make_optimizer(1e-2)
        tuner.method.plan(4)
        tuner._batch_size = 3
        tuner._step = TrainStep(tuner.method, tuner.engine, tuner.prompt, tuner.optimizer, tuner.nonfinite,
                                batch_size=3, static=static, capture=False)
        tuners.append(tuner)
    ref, new = tuners
    encoded = ref.encode(WORDS)
    for batch in [encoded[0:3], encoded[3:6], encoded[6:7], encoded[1:4]]:
        ce_ref = ref.train_step(batch)
        ce = new.train_step(batch)
        assert rel_err(ce, ce_ref) < 1e-6
    assert rel_err(new.prompt, ref.prompt) < 1e-5  # Adam normalises: 1e-7 gradient noise, 1e-6 in the prompt
    assert new.method.step == ref.method.step == 4
    assert new._step.streak.item() == 0 and new._step.static and not ref._step.static


@pytest.mark.parametrize("static", [False, True])
def test_nonfinite_step_is_skipped_on_the_device(static):
    model, tok = tiny_gpt2(seed=13), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="fused", seed=4)
    tuner.optimizer = tuner.make_optimizer(1e-2)
    step = tuner._step = TrainStep(tuner.method, tuner.engine, tuner.prompt, tuner.optimizer, tuner.nonfinite,
                                   batch_size=4, static=static, capture=False)
    batch = tuner.encode(WORDS[:4])
    step(batch)
    before = tuner.prompt.detach().clone()
    exp_avg = tuner.optimizer.state[tuner.prompt]["exp_avg"].clone()
    original = tuner.engine.packed_loss
    tuner.engine.packed_loss = lambda *a, **k: original(*a, **k) * float("nan")
    assert step(batch).item() == 0 and step.streak.item() == 1
    step(batch)
    assert step.streak.item() == 2
    assert torch.equal(tuner.prompt.detach(), before)
    assert torch.equal(tuner.optimizer.state[tuner.prompt]["exp_avg"], exp_avg)
    tuner.engine.packed_loss = original
    step(batch)
    assert step.streak.item() == 0 and not torch.equal(tuner.prompt.detach(), before)
    step._sync()
    assert tuner.nonfinite.skipped == 2 and tuner.nonfinite.streak == 0


def test_static_step_reports_a_streak_ended_before_the_read():
    """Three bad steps then a good one, all between two reads of the device counters: the run still stops."""
    model, tok = tiny_gpt2(seed=13), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="fused", seed=4)
    tuner.optimizer = tuner.make_optimizer(1e-2)
    step = TrainStep(tuner.method, tuner.engine, tuner.prompt, tuner.optimizer, tuner.nonfinite, batch_size=4,
                     static=True, capture=False)
    batch = tuner.encode(WORDS[:4])
    original = tuner.engine.packed_loss
    tuner.engine.packed_loss = lambda *a, **k: original(*a, **k) * float("nan")
    for _ in range(3):
        step(batch)
    tuner.engine.packed_loss = original
    step(batch)
    assert step.streak.item() == 0 and tuner.nonfinite.streak == 0  # not read yet
    step._sync()
    with pytest.raises(fp.NonFiniteError, match="3 steps in a row"):
        tuner.nonfinite.raise_if_stuck(1, 4)


def test_cuda_graphs_option_checks():
    model, tok = tiny_gpt2(), tokenizer()
    with pytest.raises(fp.ConfigError, match="cuda_graphs"):
        fp.PromptTuner(model, tok, prompt_len=2, engine="fused", cuda_graphs="maybe")
    with pytest.raises(fp.ConfigError, match="CUDA device"):
        fp.PromptTuner(model, tok, prompt_len=2, engine="fused", cuda_graphs="on")
    tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="fused", cuda_graphs="auto")
    assert not tuner.uses_cuda_graphs() and "cuda-graphs=off" in tuner.engine.describe()


@pytest.mark.gpu
@pytest.mark.parametrize("method,options", METHODS)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replay_equals_uncaptured_step(precision, method, options):
    """Captured and replayed steps (two buckets, a partial batch) end where uncaptured steps do, every method."""
    model, tok = tiny_gpt2(seed=14), tokenizer()
    model = model.cuda()
    pairs = fp.load_pairs("antonyms")[:150]
    prompts, losses = [], []
    for graphs in ("off", "on"):
        tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="fused", precision=precision, seed=5,
                               cuda_graphs=graphs, method=method, method_options=options)
        history = tuner.fit(pairs, epochs=2, batch_size=64, lr=1e-2, progress=False)
        prompts.append(tuner.prompt.detach().float().cpu())
        losses.append([r["train_loss"] for r in history])
        if graphs == "on":
            assert tuner._step is not None and tuner._step.graphs and not tuner._step.failed
    tol = 1e-5 if precision == "fp32" else 2e-2
    assert rel_err(prompts[1], prompts[0]) < tol
    assert all(abs(a - b) <= tol * abs(b) for a, b in zip(losses[1], losses[0]))
