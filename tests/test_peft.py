"""PEFT adapters out and in, and prompts for ``model.generate`` (fastprompt/peft_io.py, issue 14).

fp32 on the CPU, tiny random GPT-2s built twice from the same seed where PEFT needs a base model of its own.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from helpers import rel_err, tiny_gpt2, tokenizer

import fastprompt as fp
from fastprompt.engines.naive import NaiveEngine
from fastprompt.errors import ConfigError
from fastprompt.peft_io import to_peft_rows
from fastprompt.engines.naive import gpt2_reference_forward

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft (the test extra)")

PREPENDED = "{prompt} {input} and {target}"  # the layout PEFT can express: the prompt before all text
PAIRS = [("hot", "cold"), ("up", "down"), ("beautiful", "ugly"), ("fast", "slow"), ("light", "dark"),
         ("open", "closed"), ("early", "late"), ("happy", "sad")]
L = 3


def peft_tensors(batch, L):
    """PEFT's inputs for encoded examples: the text after the prompt, right padded; labels on targets only."""
    T = max(len(e.ids) for e in batch) - L
    ids = torch.zeros((len(batch), T), dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, e in enumerate(batch):
        text = torch.tensor(e.ids[L:])
        ids[b, : len(text)] = text
        mask[b, : len(text)] = 1
        labels[b, e.target_start - L : len(text)] = text[e.target_start - L :]  # the model shifts labels itself
    return ids, mask, labels


def own_logits(tuner, batch):
    """fastprompt's forward over the whole padded sequences (the naive engine's layout): (B, T, V)."""
    ids, mask, _, slot = NaiveEngine(tuner.model, tuner.encoder).batch_tensors(batch)
    embeds = tuner.model.transformer.wte(ids)
    if tuner.method.name == "prefix":
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        return tuner.model.lm_head(gpt2_reference_forward(tuner.model, embeds, positions, mask.bool(), slot, tuner.prompt))
    embeds = torch.where((slot >= 0)[..., None], tuner.prompt[slot.clamp(min=0)], embeds)
    return tuner.model(inputs_embeds=embeds, attention_mask=mask).logits


def peft_model(kind: str, seed: int = 0):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config_cls = PromptTuningConfig if kind == "prompt" else PrefixTuningConfig
    torch.manual_seed(seed)
    return get_peft_model(tiny_gpt2(), config_cls(task_type="CAUSAL_LM", num_virtual_tokens=L)).eval()


# --------------------------------------------------------------------------------- adapters out
@needs_peft
@pytest.mark.parametrize("method", ["soft", "prefix"])
def test_saved_adapter_gives_fastprompts_logits_and_loss(tmp_path, method):
    from peft import PeftModel

    tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), PREPENDED, L, method=method, seed=5)
    tuner.save_peft(str(tmp_path / "adapter"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary directory left
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("PREFIX_TUNING" if method == "prefix" else "PROMPT_TUNING")
    assert config["num_virtual_tokens"] == L and config["task_type"] == "CAUSAL_LM"

    served = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "adapter")).eval()  # its own base copy
    batch = tuner.encode(PAIRS[:5])
    ids, mask, labels = peft_tensors(batch, L)
    with torch.no_grad():
        out = served(input_ids=ids, attention_mask=mask, labels=labels)
        ours = own_logits(tuner, batch)[:, L:]  # (B, T, V): the text positions
        loss = tuner.loss(batch)  # the fast engine
    theirs = out.logits[:, L:] if method == "soft" else out.logits  # prompt tuning returns the virtual rows too
    valid = mask.bool()
    assert torch.isfinite(theirs).all()
    assert rel_err(theirs[valid], ours[valid]) <= 1e-5
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * abs(loss.item())


@needs_peft
def test_relaxed_and_hard_prompts_save_their_effective_rows(tmp_path):
    from safetensors.torch import load_file

    for method in ("relaxed", "hard"):
        tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), PREPENDED, L, method=method, init="vocab")
        tuner.save_peft(str(tmp_path / method))
        rows = load_file(str(tmp_path / method / "adapter_model.safetensors"))["prompt_embeddings"]
        assert torch.equal(rows, tuner.method.embeddings(tuner.prompt.detach()))


@needs_peft
@pytest.mark.parametrize("template, message", [
    ("Here are two {prompt} {input} and {target}", "must come first"),
    ("{input} {prompt} and {target}", "must come first"),
])
def test_a_template_peft_cannot_express_is_refused_and_nothing_written(tmp_path, template, message):
    tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), template, L)
    with pytest.raises(ConfigError, match=message):
        tuner.save_peft(str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


@needs_peft
def test_adapter_directory_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    path = tmp_path / "adapter"
    tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), PREPENDED, L, seed=1)
    tuner.save_peft(str(path))
    first = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"]
    with torch.no_grad():
        tuner.prompt.add_(1.0)
    tuner.save_peft(str(path))  # an adapter directory is replaced
    second = load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(second, tuner.prompt.detach()) and not torch.equal(first, second)

    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        tuner.prompt.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        tuner.save_peft(str(path))
    assert torch.equal(load_file(str(path / "adapter_model.safetensors"))["prompt_embeddings"], second)
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # the half-written temporary directory is gone

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="other files"):
        tuner.save_peft(str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


# ---------------------------------------------------------------------------------- adapters in
@needs_peft
@pytest.mark.parametrize("kind, engine", [("prompt", "naive"), ("prompt", "generic"), ("prompt", "fused"),
                                          ("prefix", "auto")])
def test_from_peft_takes_the_same_adam_steps_as_peft(kind, engine):
    """fastprompt's fit on a PEFT model == the same Adam steps through PEFT's own forward, step by step."""
    lr, batch_size = 1e-2, 3
    reference, linked = peft_model(kind), peft_model(kind)
    ref_weight = next(p for p in reference.parameters() if p.requires_grad)  # the prompt encoder's rows
    peft_weight = linked.prompt_encoder["default"].embedding.weight
    assert torch.equal(ref_weight, peft_weight)
    base = linked.get_base_model()
    base_before = {k: v.clone() for k, v in base.state_dict().items()}

    tuner = fp.PromptTuner.from_peft(linked, tokenizer(), PREPENDED, engine=engine)
    assert isinstance(tuner, fp.PromptTuner) and tuner.prompt_len == L
    assert tuner.method.name == ("prefix" if kind == "prefix" else "soft")
    assert torch.equal(to_peft_rows(tuner.method, tuner.prompt), peft_weight.detach())

    optimizer = torch.optim.Adam([ref_weight], lr=lr)
    expected = []
    start = ref_weight.detach().clone()
    for batch in tuner.batches(tuner.encode(PAIRS), batch_size, epoch=0):  # fit's first epoch, same batches
        ids, mask, labels = peft_tensors(batch, L)
        reference(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        expected.append(ref_weight.detach().clone())

    got = []
    tuner.fit(PAIRS, epochs=1, batch_size=batch_size, lr=lr, progress=False,
              step_callback=lambda info: got.append(to_peft_rows(tuner.method, tuner.prompt)))
    assert len(got) == len(expected) == 3
    for step, (ours, theirs) in enumerate(zip(got, expected)):
        assert rel_err(ours - start, theirs - start) <= 1e-5, f"step {step + 1}: the update differs"
        assert rel_err(ours, theirs) <= 1e-5, f"step {step + 1}"
    assert torch.equal(peft_weight.detach(), got[-1])  # written back into the PEFT model
    assert all(torch.equal(v, base_before[k]) for k, v in base.state_dict().items())  # base untouched
    assert not any(p.requires_grad for p in base.parameters())


@needs_peft
def test_from_peft_refuses_what_it_cannot_train():
    from peft import PrefixTuningConfig, PromptEncoderConfig, get_peft_model

    tok = tokenizer()
    with pytest.raises(ConfigError, match="must come first"):
        fp.PromptTuner.from_peft(peft_model("prompt"), tok, "Here are two {prompt} {input} and {target}")
    with pytest.raises(ConfigError, match="do not pass prompt_len"):
        fp.PromptTuner.from_peft(peft_model("prompt"), tok, PREPENDED, prompt_len=4)
    with pytest.raises(ConfigError, match="peft.PeftModel"):
        fp.PromptTuner.from_peft(tiny_gpt2(), tok, PREPENDED)
    p_tuning = get_peft_model(tiny_gpt2(), PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=L))
    with pytest.raises(ConfigError, match="not P_TUNING"):
        fp.PromptTuner.from_peft(p_tuning, tok, PREPENDED)
    projected = get_peft_model(tiny_gpt2(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L,
                                                               prefix_projection=True))
    with pytest.raises(ConfigError, match="prefix_projection"):
        fp.PromptTuner.from_peft(projected, tok, PREPENDED)
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    llama_prefix = get_peft_model(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=L))
    with pytest.raises(ConfigError, match="GPT-2 family only"):
        fp.PromptTuner.from_peft(llama_prefix, tok, PREPENDED)


# --------------------------------------------------------------------------------- generate
def _first_word(tok, ids):
    """``tuner.generate``'s rule: tokens up to EOS, a newline or the start of a second word."""
    words = []
    for t in ids:
        piece = tok.decode([t])
        if t == tok.eos_token_id or "\n" in piece or (words and piece[:1].isspace()):
            break
        words.append(t)
    return tok.decode(words).strip()


def test_inputs_embeds_generate_what_tuner_generate_does():
    model, tok = tiny_gpt2(), tokenizer()
    tuner = fp.PromptTuner(model, tok, "Here are two {prompt} {input} and {target}", L, seed=7)
    inputs = ["hot", "beautiful", "up", "extraordinarily quick"]  # different lengths: left padding
    embeds, mask = tuner.inputs_embeds(inputs)
    lengths = [e.target_start for e in tuner.encoder.encode_all([(x, "x") for x in inputs])]
    assert embeds.shape[:2] == mask.shape == (4, max(lengths)) and mask.sum(1).tolist() == lengths
    start = mask.shape[1] - lengths[0] + 3  # "Here are two" is 3 tokens, then the prompt
    assert torch.equal(embeds[0, start : start + L], tuner.prompt.detach())
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         pad_token_id=tok.eos_token_id)
    words = [_first_word(tok, row.tolist()) for row in out]
    assert words == tuner.generate(inputs, max_new_tokens=6)


def test_inputs_embeds_refuses_a_prefix_prompt():
    tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), PREPENDED, L, method="prefix")
    with pytest.raises(ConfigError, match="keys and values"):
        tuner.inputs_embeds(["hot"])


# ------------------------------------------------------------------------------ without peft
def test_without_peft_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    tuner = fp.PromptTuner(tiny_gpt2(), tokenizer(), PREPENDED, L)
    for call in (lambda: tuner.save_peft(str(tmp_path / "adapter")),
                 lambda: fp.PromptTuner.from_peft(object(), tokenizer(), PREPENDED)):
        with pytest.raises(ConfigError) as info:
            call()
        assert "fastprompt[peft]" in str(info.value) and "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ CLI
@needs_peft
def test_cli_peft_out(tmp_path, capsys):
    from safetensors.torch import load_file

    from fastprompt.train import main

    common = ["--model", "tiny", "--epochs", "1", "--train-size", "16", "--test-size", "0.01", "--no-progress",
              "--samples", "0"]
    code = main([*common, "--template", PREPENDED, "--out", str(tmp_path / "run"),
                 "--peft-out", str(tmp_path / "adapter")])
    assert code == 0
    rows = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(rows, load_file(str(tmp_path / "run" / "prompt.safetensors"))["prompt"])

    code = main([*common, "--out", str(tmp_path / "run2"), "--peft-out", str(tmp_path / "adapter2")])
    err = capsys.readouterr().err
    assert code == 2 and "must come first" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run2").exists() and not (tmp_path / "adapter2").exists()  # refused before training
