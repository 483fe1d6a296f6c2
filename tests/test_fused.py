"""The fused engine against the naive reference (exactness is the contract), and its torch ops against
direct math. fp32: loss and prompt gradient to 1e-5 relative; bf16: within bf16 tolerance."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import fastprompt as fp
from fastprompt.engines import make_engine
from fastprompt.engines import ops as ops_mod
from fastprompt.engines.fused import FusedEngine, PackedBatch
from fastprompt.engines.naive import NaiveEngine
from fastprompt.errors import ConfigError, DataError
from fastprompt.template import TemplateEncoder

from helpers import rel_err, tiny_gpt2, tokenizer

FP32_TOL = 1e-5
BF16_TOL = 2e-2

TEMPLATES = {
    "start": "{prompt} {input} means {target}",  # empty prefix, prompt in the trunk
    "middle": "Here are two {prompt} {input} and {target}",  # the reference template
    "end": "Word: {input}. Opposite {prompt} {target}",  # a field before the prompt: empty trunk
    "json": '"word": "{input}", {prompt} "hint": "{hint}", "answer": "{target}',  # two fields around it
}
SHORT = ["a", "go", "up", "hot", "red", "on", "big", "dry", "low", "new"]
LONG = ["antidisestablishment", "floccinaucinihilipilification", "pneumonoultramicroscopic",
        "supercalifragilistic", "establishmentarianism", "sesquipedalian", "xylophonist", "quixotically"]


@functools.lru_cache(maxsize=None)
def model_for(seed=0, **overrides):
    """A cached tiny random GPT-2 (eval, frozen); tests must not modify it."""
    return tiny_gpt2(seed=seed, **overrides)


def examples(n, seed, long_share=None, fields=("input", "hint")):
    """Mappings with mixed suffix lengths: short words and long, rare, multi-token ones (fewer long ones
    in big batches: the naive reference materialises (B, T, 50257) logits)."""
    if long_share is None:
        long_share = 0.4 if n <= 16 else 0.1
    rng = random.Random(seed)
    pick = lambda: rng.choice(LONG) if rng.random() < long_share else rng.choice(SHORT)  # noqa: E731
    return [{**{f: pick() for f in fields}, "target": pick() + (" " + pick() if rng.random() < 0.2 else "")}
            for _ in range(n)]


def fresh_prompt(model, prompt_len, seed):
    """A random prompt at the scale of the embedding table."""
    wte = model.get_input_embeddings().weight.detach()
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(prompt_len, wte.shape[1], generator=g) * wte.std()).requires_grad_(True)


def loss_and_grad(engine, prompt, batch):
    ce_sum, n = engine.loss_terms(prompt, batch)
    (grad,) = torch.autograd.grad(ce_sum / n, prompt)
    return (ce_sum / n).detach(), grad, n


def compare(model, template, prompt_len, batch_size, seed, precision="fp32", **options):
    """(loss rel error, grad rel error, loss, grad) of the fused engine against naive fp32."""
    enc = TemplateEncoder(template, tokenizer(), prompt_len, max_len=model.config.n_positions)
    batch = enc.encode_all(examples(batch_size, seed))
    prompt = fresh_prompt(model, prompt_len, seed)
    ref_loss, ref_grad, ref_n = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    loss, grad, n = loss_and_grad(FusedEngine(model, enc, precision, **options), prompt, batch)
    assert n == ref_n
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    return rel_err(loss, ref_loss), rel_err(grad, ref_grad), loss, grad


# ------------------------------------------------------------------------------- fused == naive (fp32)
CASES = [  # (template, prompt_len, batch_size)
    *[(t, 1, 1) for t in TEMPLATES],
    *[(t, 5, 7) for t in TEMPLATES],
    *[(t, 64, 7) for t in TEMPLATES],
    ("middle", 5, 64), ("end", 1, 64), ("json", 5, 64),
]


@pytest.mark.parametrize("template,prompt_len,batch_size", CASES)
def test_fused_matches_naive_fp32(template, prompt_len, batch_size):
    model = model_for(seed=1)
    seed = CASES.index((template, prompt_len, batch_size))
    loss_err, grad_err, _, _ = compare(model, TEMPLATES[template], prompt_len, batch_size, seed)
    assert loss_err <= FP32_TOL and grad_err <= FP32_TOL, (loss_err, grad_err)


@pytest.mark.parametrize("template", ["middle", "end", "json"])
def test_fused_matches_naive_odd_width(template):
    """n_embd=80, n_head=5: head dim 16, hidden not a power of two; three layers."""
    model = model_for(seed=2, n_embd=80, n_head=5, n_layer=3)
    loss_err, grad_err, _, _ = compare(model, TEMPLATES[template], 5, 13, seed=7)
    assert loss_err <= FP32_TOL and grad_err <= FP32_TOL, (loss_err, grad_err)


@pytest.mark.parametrize("template,prompt_len,batch_size", [("start", 1, 1), ("json", 5, 7)])
def test_fused_fp32_as_accurate_as_naive(template, prompt_len, batch_size):
    """Against float64 truth, the fused fp32 gradient errs no more than ~2x the naive fp32 one (few target
    rows: the LM head's vocabulary reduction must not lose precision)."""
    model = model_for(seed=1)
    model64 = copy.deepcopy(model).double()
    enc = TemplateEncoder(TEMPLATES[template], tokenizer(), prompt_len, max_len=128)
    batch = enc.encode_all(examples(batch_size, 0))
    prompt = fresh_prompt(model, prompt_len, 0)
    prompt64 = prompt.detach().double().requires_grad_(True)
    _, truth, _ = loss_and_grad(NaiveEngine(model64, enc), prompt64, batch)
    _, naive, _ = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    _, fused, _ = loss_and_grad(FusedEngine(model, enc), prompt, batch)
    assert rel_err(fused, truth) <= 2 * rel_err(naive, truth) + 1e-7, (rel_err(fused, truth), rel_err(naive, truth))


def test_target_right_after_prompt():
    """No field before the target: the first target token is predicted by a shared trunk row."""
    model, tok = model_for(seed=1), tokenizer()
    enc = TemplateEncoder("Opposite of it: {prompt}{target}", tok, 3, max_len=128)
    batch = enc.encode_all([{"target": w} for w in ["cold", "antidisestablishment", "up", "sesquipedalian"]])
    prompt = fresh_prompt(model, 3, 0)
    ref = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    got = loss_and_grad(FusedEngine(model, enc), prompt, batch)
    assert rel_err(got[0], ref[0]) <= FP32_TOL and rel_err(got[1], ref[1]) <= FP32_TOL


def test_prefix_cache_is_constant_and_reused():
    model, tok = model_for(seed=1), tokenizer()
    enc = TemplateEncoder(TEMPLATES["middle"], tok, 4, max_len=128)
    engine = FusedEngine(model, enc)
    batch = enc.encode_all(examples(5, 1))
    prompt = fresh_prompt(model, 4, 1)
    first = loss_and_grad(engine, prompt, batch)
    cache = engine.context_kv()
    assert len(cache) == model.config.n_layer and cache[0][0].shape == (enc.n_context, 4, 16)
    assert not any(t.requires_grad for kv in cache for t in kv)
    second = loss_and_grad(engine, prompt, batch)
    assert engine.context_kv() is cache
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ------------------------------------------------------------------------------------ packed batch
def test_packed_batch_layout():
    tok = tokenizer()
    enc = TemplateEncoder(TEMPLATES["middle"], tok, 4)  # prefix "Here are two" (3), trunk = 4 prompt rows
    batch = enc.encode_all([("hot", "cold"), ("antidisestablishment", "up")])
    packed = PackedBatch.build(enc, batch, torch.device("cpu"))
    P0, S = enc.n_context, enc.n_shared
    suffix = [len(e.ids) - 1 - S for e in batch]
    assert (P0, S, packed.n_trunk_rows) == (3, 7, 4)
    assert packed.n_rows == 4 + sum(suffix)
    assert packed.cu_seqlens.tolist() == [S, S + suffix[0], S + suffix[0] + suffix[1]]
    assert packed.prompt_rows.tolist() == [0, 1, 2, 3] and packed.prompt_slots.tolist() == [0, 1, 2, 3]
    assert packed.n_targets == sum(e.target_len for e in batch)
    # every target row's token and position are those of the position before the target token
    ids, pos = packed.token_ids.tolist(), packed.positions.tolist()
    t = 0
    for e in batch:
        for j in range(e.target_start, len(e.ids)):
            row = packed.target_rows[t].item()
            assert pos[row] == j - 1 and ids[row] == e.ids[j - 1] and packed.target_ids[t].item() == e.ids[j]
            t += 1
    engine = FusedEngine(model_for(seed=1), enc)
    assert engine.rows_per_example(batch) == pytest.approx((4 + sum(suffix)) / 2)


def test_packed_batch_prompt_in_suffix():
    enc = TemplateEncoder(TEMPLATES["end"], tokenizer(), 2)
    batch = enc.encode_all([("hot", "cold"), ("antidisestablishment", "up")])
    packed = PackedBatch.build(enc, batch, torch.device("cpu"))
    assert packed.n_trunk_rows == 0 and packed.cu_seqlens[0].item() == enc.n_context == enc.n_shared
    assert packed.prompt_rows.numel() == 4 and packed.prompt_slots.tolist() == [0, 1, 0, 1]
    pos = packed.positions[packed.prompt_rows].tolist()
    assert pos == [batch[0].prompt_start, batch[0].prompt_start + 1, batch[1].prompt_start, batch[1].prompt_start + 1]


def test_rejects_batch_from_another_encoder():
    model, tok = model_for(seed=1), tokenizer()
    enc4 = TemplateEncoder(TEMPLATES["middle"], tok, 4)
    enc2 = TemplateEncoder(TEMPLATES["middle"], tok, 2)
    with pytest.raises(DataError):
        FusedEngine(model, enc4).loss_terms(fresh_prompt(model, 4, 0), enc2.encode_all([("a", "b")]))


# ------------------------------------------------------------------------------- the user's model
def test_fp32_engine_leaves_the_model_alone():
    """No dtype/device/requires_grad/training change, no .grad on any weight, no weight in the graph."""
    model = copy.deepcopy(model_for(seed=1))
    model.train().requires_grad_(True)  # a user's model as it comes: training flag set, weights requiring grad
    before = {n: (p.dtype, p.device, p.requires_grad, p.data_ptr(), p.detach().clone()) for n, p in model.named_parameters()}
    flags = [m.training for m in model.modules()]
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 4)
    engine = FusedEngine(model, enc)
    prompt = fresh_prompt(model, 4, 0)
    ce_sum, n = engine.loss_terms(prompt, enc.encode_all(examples(6, 2)))
    params = list(model.parameters())
    grads = torch.autograd.grad(ce_sum / n, [prompt, *params], allow_unused=True)
    assert grads[0] is not None and all(g is None for g in grads[1:])  # weights never enter the graph
    for name, p in model.named_parameters():
        dtype, device, req, ptr, value = before[name]
        assert (p.dtype, p.device, p.requires_grad, p.data_ptr()) == (dtype, device, req, ptr), name
        assert p.grad is None and torch.equal(p.detach(), value), name
    assert [m.training for m in model.modules()] == flags
    # train mode must not mean dropout: the loss equals the eval-mode naive loss
    ref = NaiveEngine(model, enc).loss_terms(prompt, enc.encode_all(examples(6, 2)))
    assert rel_err(ce_sum, ref[0]) <= FP32_TOL


def test_make_engine_builds_fused_and_rejects_unknown_kernels_and_options():
    model, enc = model_for(seed=1), TemplateEncoder(TEMPLATES["middle"], tokenizer(), 4)
    engine = make_engine("fused", model, enc, "fp32", kernels="torch", cuda_graphs="off", layout="auto")
    assert isinstance(engine, FusedEngine) and engine.cuda_graphs == "off" and engine.ops.name == "torch"
    assert isinstance(make_engine("auto", model, enc), FusedEngine)
    with pytest.raises(ConfigError):
        make_engine("fused", model, enc, kernels="cutlass")
    with pytest.raises(ConfigError, match="unknown engine option future_option"):
        make_engine("fused", model, enc, future_option=1)
    with pytest.raises(ConfigError, match="layout='packed' is an option of the generic engine"):
        make_engine("fused", model, enc, layout="packed")


def test_rejects_other_activation():
    model = copy.copy(model_for(seed=1))  # shares the modules, own config
    model.config = copy.deepcopy(model.config)
    model.config.activation_function = "relu"
    with pytest.raises(ConfigError):
        FusedEngine(model, TemplateEncoder(TEMPLATES["middle"], tokenizer(), 4))


def test_refuses_a_model_whose_forward_differs():
    """A GPT-2 whose own forward changes the logits: the once-per-engine check catches it."""
    model = copy.copy(model_for(seed=1))  # shares the modules
    plain_forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled_forward
    enc = TemplateEncoder(TEMPLATES["middle"], tokenizer(), 4)
    batch = enc.encode_all(examples(2, 0))
    with pytest.raises(ConfigError, match="generic"):
        FusedEngine(model, enc).loss_terms(fresh_prompt(model, 4, 0), batch)
    FusedEngine(model, enc, self_check=False).loss_terms(fresh_prompt(model, 4, 0), batch)  # opt-out


# --------------------------------------------------------------------------------- low precision
@pytest.mark.parametrize("template", ["middle", "end"])
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_low_precision_close_to_fp32(template, precision):
    model = model_for(seed=1)
    before = {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()}
    loss_err, grad_err, loss, grad = compare(model, TEMPLATES[template], 5, 16, seed=3, precision=precision)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert loss_err < BF16_TOL and grad_err < BF16_TOL, (loss_err, grad_err)
    assert {n: (p.dtype, p.data_ptr()) for n, p in model.named_parameters()} == before


# ------------------------------------------------------------------------------------------ tuner
def test_tuner_fit_fused_equals_naive():
    model, tok = model_for(seed=1), tokenizer()
    train = [(e["input"], e["target"]) for e in examples(24, 11)]
    prompts, histories = [], []
    for engine in ("naive", "fused"):
        tuner = fp.PromptTuner(model, tok, TEMPLATES["middle"], prompt_len=4, engine=engine, seed=5)
        history = tuner.fit(train, epochs=2, batch_size=8, lr=1e-2, progress=False)
        prompts.append(tuner.prompt.detach().clone())
        histories.append([h["train_loss"] for h in history])
    start = fp.PromptTuner(model, tok, TEMPLATES["middle"], prompt_len=4, engine="naive", seed=5).prompt.detach()
    assert rel_err(prompts[0], start) > 1e-3  # the prompt moved
    assert rel_err(prompts[1], prompts[0]) <= FP32_TOL
    assert histories[1] == pytest.approx(histories[0], rel=FP32_TOL)


# ------------------------------------------------------------------------------- ops vs direct math
def test_tree_mask_against_definition():
    n_context, n_trunk_rows, lens = 3, 4, [2, 0, 5, 1]
    n_trunk = n_context + n_trunk_rows
    cu = torch.tensor([n_trunk + sum(lens[:i]) for i in range(len(lens) + 1)])
    nk = cu[-1].item()
    nq = nk - n_context
    mask = ops_mod.tree_mask(nq, nk, n_trunk, cu)
    segment_of = {}
    for s in range(len(lens)):
        for j in range(cu[s].item(), cu[s + 1].item()):
            segment_of[j] = s
    for r in range(nq):
        i = r + n_context
        for j in range(nk):
            if i < n_trunk:
                allowed = j <= i
            else:
                allowed = j < n_trunk or (segment_of[j] == segment_of[i] and j <= i)
            assert mask[r, j].item() == allowed, (r, j)


def tree_attention_by_loops(q, k, v, n_trunk, cu, scale):
    """Each query row on its own: the keys it may see gathered explicitly, softmax, weighted sum."""
    nq, nk = q.shape[0], k.shape[0]
    out = []
    for r in range(nq):
        i = r + nk - nq
        if i < n_trunk:
            keys = list(range(i + 1))
        else:
            s = int(torch.searchsorted(cu, torch.tensor(i), right=True)) - 1
            keys = list(range(n_trunk)) + list(range(int(cu[s]), i + 1))
        idx = torch.tensor(keys)
        scores = torch.einsum("hd,khd->hk", q[r], k[idx]) * scale  # (H, n_keys)
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v[idx]))
    return torch.stack(out)


@pytest.mark.parametrize("n_context,n_trunk_rows,lens", [(3, 4, [2, 0, 5, 1]), (0, 0, [3, 1, 4]), (2, 1, [7])])
def test_tree_attention_against_loops(n_context, n_trunk_rows, lens):
    torch.manual_seed(0)
    H, D = 3, 12
    n_trunk = n_context + n_trunk_rows
    cu = torch.tensor([n_trunk + sum(lens[:i]) for i in range(len(lens) + 1)])
    nk = int(cu[-1])
    nq = nk - n_context
    q = torch.randn(nq, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(nk, H, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(nk, H, D, dtype=torch.float64, requires_grad=True)
    scale = 0.3
    got = ops_mod.tree_attention(q.float(), k.float(), v.float(), n_trunk, cu, scale)
    ref = tree_attention_by_loops(q, k, v, n_trunk, cu, scale)
    assert got.dtype == torch.float32 and rel_err(got, ref) < 1e-6
    dout = torch.randn_like(ref)
    g_got = torch.autograd.grad(got, (q, k, v), dout.float())
    g_ref = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(g_got, g_ref):
        assert rel_err(a, b) < 1e-6
    default = ops_mod.tree_attention(q.float(), k.float(), v.float(), n_trunk, cu)  # scale 1/sqrt(D)
    assert rel_err(default, tree_attention_by_loops(q, k, v, n_trunk, cu, 1 / math.sqrt(D))) < 1e-6


@pytest.mark.parametrize("rows,vocab", [(1, 50257), (7, 97)])
def test_lm_head_ce_against_cross_entropy(rows, vocab):
    torch.manual_seed(1)
    d = 40
    h = torch.randn(rows, d, requires_grad=True)
    weight = torch.randn(vocab, d, requires_grad=True)  # requires_grad: must still get no gradient
    targets = torch.randint(0, vocab, (rows,))
    loss = ops_mod.lm_head_ce(h, weight, targets)
    ref = F.cross_entropy((h.double() @ weight.double().t()), targets, reduction="none")
    assert loss.dtype == torch.float32 and loss.shape == (rows,) and rel_err(loss, ref) < 1e-5
    upstream = torch.rand(rows)
    dh, dw = torch.autograd.grad(loss, (h, weight), upstream, allow_unused=True)
    (dh_ref,) = torch.autograd.grad(ref, h, upstream.double())
    assert dw is None and rel_err(dh, dh_ref) < 2e-6  # a plain fp32 vocab-long dot product errs ~6e-6


def test_dense_ops_against_hf_modules():
    from transformers.activations import NewGELUActivation
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    x = torch.randn(7, 3, 48, requires_grad=True)  # (..., d) with d not a power of two
    conv = Conv1D(80, 48)
    torch.nn.init.normal_(conv.bias)
    y = ops_mod.linear(x, conv.weight, conv.bias)
    assert rel_err(y, conv(x)) < 1e-6 and y.shape == (7, 3, 80)
    assert rel_err(ops_mod.linear(x, conv.weight), x @ conv.weight) < 1e-6
    bias = torch.randn(48)
    assert rel_err(ops_mod.bias_gelu(x, bias), NewGELUActivation()(x + bias)) < 1e-6
    ln = torch.nn.LayerNorm(48, eps=1e-5)
    torch.nn.init.normal_(ln.weight), torch.nn.init.normal_(ln.bias)
    residual = torch.randn(7, 3, 48, requires_grad=True)
    y, h = ops_mod.add_layer_norm(x, residual, ln.weight, ln.bias, 1e-5)
    assert torch.equal(h, x + residual) and rel_err(y, ln(x + residual)) < 1e-6
    y0, h0 = ops_mod.add_layer_norm(x, None, ln.weight, ln.bias, 1e-5)
    assert h0 is x and rel_err(y0, ln(x)) < 1e-6
    # frozen weights: with requires_grad=True parameters, autograd still computes input gradients only
    out = ops_mod.linear(y, conv.weight, conv.bias).sum() + ops_mod.bias_gelu(h, bias).sum()
    grads = torch.autograd.grad(out, [x, residual, conv.weight, conv.bias, ln.weight, ln.bias], allow_unused=True)
    assert grads[0] is not None and grads[1] is not None and all(g is None for g in grads[2:])


# ------------------------------------------------------------------------------------- registry
def test_get_ops_selection(monkeypatch):
    cpu = torch.device("cpu")
    assert ops_mod.get_ops("torch", cpu) is ops_mod.TORCH_OPS
    assert ops_mod.get_ops("auto", cpu) is ops_mod.TORCH_OPS  # torch on CPU
    ops = ops_mod.TORCH_OPS
    assert all(callable(getattr(ops, n)) for n in ops_mod.OP_NAMES)
    with pytest.raises(ConfigError, match="unknown kernels"):
        ops_mod.get_ops("cutlass", cpu)
    monkeypatch.setitem(sys.modules, "fastprompt.kernels.cuda_ext", None)  # the extension is not built
    with pytest.raises(ConfigError, match="kernels unavailable"):
        ops_mod.get_ops("cuda", cpu)
    monkeypatch.setitem(sys.modules, "fastprompt.kernels", None)
    with pytest.raises(ConfigError, match="kernels unavailable"):
        ops_mod.get_ops("triton", cpu)


def _triton_runs():
    try:
        import triton  # noqa: F401

        from fastprompt.kernels import TRITON_AVAILABLE
    except Exception:
        return False
    from fastprompt.kernels._common import interpreting

    return TRITON_AVAILABLE and (interpreting() or torch.cuda.is_available())


@pytest.mark.skipif(not _triton_runs(), reason="needs Triton (a CUDA GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("all_triton", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_fused_with_triton_kernels_matches_naive(all_triton):
    """The same engine with its ops from fastprompt.kernels (interpreted on CPU): the seams fit. By default
    the LM head stays torch (its vocab-wide loop costs ~10 s in the interpreter); -m slow runs all five."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model_for(seed=1) if device == "cpu" else tiny_gpt2(seed=10).to(device)
    enc = TemplateEncoder(TEMPLATES["end"], tokenizer(), 2, max_len=128)
    batch = enc.encode_all(examples(3, 4))
    prompt = fresh_prompt(model, 2, 4).detach().to(device).requires_grad_(True)
    engine = FusedEngine(model, enc, kernels="triton")
    assert {engine.ops.sources[n] for n in ops_mod.OP_NAMES} == {"triton"}  # GPT-2's five ops as kernels
    if not all_triton:
        engine.ops = dataclasses.replace(engine.ops, lm_head_ce=ops_mod.lm_head_ce)
    ref = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    got = loss_and_grad(engine, prompt, batch)
    tol = FP32_TOL if device == "cpu" else 1e-4  # GPU: other reduction orders (cuBLAS, SDPA) in the reference
    assert rel_err(got[0], ref[0]) <= tol and rel_err(got[1], ref[1]) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["torch", "auto"])
@pytest.mark.parametrize("template", ["middle", "end"])
def test_fused_matches_naive_on_gpu(kernels, template, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 means fp32 here
    model = tiny_gpt2(seed=12).cuda()
    enc = TemplateEncoder(TEMPLATES[template], tokenizer(), 5, max_len=128)
    batch = enc.encode_all(examples(64, 5))
    prompt = fresh_prompt(model, 5, 5).detach().cuda().requires_grad_(True)
    ref = loss_and_grad(NaiveEngine(model, enc), prompt, batch)
    got = loss_and_grad(FusedEngine(model, enc, kernels=kernels), prompt, batch)
    assert rel_err(got[0], ref[0]) <= 1e-4 and rel_err(got[1], ref[1]) <= 1e-4
    bf16 = loss_and_grad(FusedEngine(model, enc, "bf16", kernels=kernels), prompt, batch)
    assert rel_err(bf16[0], ref[0]) < BF16_TOL and rel_err(bf16[1], ref[1]) < BF16_TOL
