import os

import pytest
import torch

import fastprompt as fp

from helpers import tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small"), ("wet", "dry"), ("fast", "slow"),
         ("light", "dark"), ("open", "closed"), ("early", "late")]


def test_fit_lowers_the_loss_and_records_history():
    model, tok = tiny_gpt2(seed=1, initializer_range=0.2), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", seed=0)
    before = tuner.loss(PAIRS).item()
    history = tuner.fit(PAIRS, epochs=4, batch_size=4, lr=1e-2, eval_data=PAIRS[:3], progress=False, eval_every=2)
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert [r["step"] for r in history] == [3, 6, 9, 12]
    assert {"train_loss", "test_loss", "seconds", "eval_seconds"} <= set(history[0])
    # the test loss every epoch; the generation metrics every eval_every epochs
    assert ["test_exact_match" in r for r in history] == [False, True, False, True]
    assert {"test_parrot_rate", "test_exact_match_strict", "test_parrot_rate_strict"} <= set(history[1])
    assert tuner.loss(PAIRS).item() < before


def test_same_seed_same_prompt():
    model, tok = tiny_gpt2(seed=2), tokenizer()
    prompts = []
    for _ in range(2):
        tuner = fp.PromptTuner(model, tok, prompt_len=2, engine="naive", seed=7)
        tuner.fit(PAIRS, epochs=2, batch_size=4, progress=False)
        prompts.append(tuner.prompt.detach().clone())
    assert torch.equal(prompts[0], prompts[1])


def test_evaluate_and_generate():
    model, tok = tiny_gpt2(seed=3), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive")
    metrics = tuner.evaluate(PAIRS)
    assert set(metrics) == {"loss", "exact_match", "parrot_rate", "exact_match_strict", "parrot_rate_strict"}
    assert metrics["loss"] > 0 and 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["parrot_rate"] <= 1
    words = tuner.generate(["hot", "up"])
    assert len(words) == 2 and all(isinstance(w, str) for w in words)
    # greedy decoding agrees with the argmax of the engine's own forward
    first = tok(" " + words[0])["input_ids"][0] if words[0] else None
    if first is not None:
        enc = tuner.encoder.encode(("hot", words[0]))
        ids = torch.tensor([enc.ids])
        embeds = model.get_input_embeddings()(ids)
        embeds[0, enc.prompt_start : enc.prompt_start + 4] = tuner.prompt.detach()
        logits = model(inputs_embeds=embeds).logits[0, enc.target_start - 1]
        assert logits.argmax().item() == first


def test_parrot_rate_counts_copies_of_the_input(monkeypatch):
    model, tok = tiny_gpt2(seed=3), tokenizer()
    tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive")
    monkeypatch.setattr(tuner, "_greedy", lambda encoded, max_new_tokens=6, progress=None: ["hot", "down", "x"])
    metrics = tuner.evaluate(PAIRS[:3])
    assert metrics["parrot_rate"] == pytest.approx(1 / 3) and metrics["exact_match"] == pytest.approx(1 / 3)


def test_save_load_roundtrip_and_refusals(tmp_path):
    model, tok = tiny_gpt2(seed=4), tokenizer()
    tuner = fp.PromptTuner(model, tok, "Q {prompt} {input} -> {target}", prompt_len=3, engine="naive")
    path = str(tmp_path / "p.safetensors")
    tuner.save(path)
    loaded = fp.PromptTuner.load(path, model, tok, engine="naive")
    assert torch.equal(loaded.prompt, tuner.prompt) and loaded.template.text == tuner.template.text
    with open(path, "rb") as f:
        assert b"hidden_size" in f.read(2000)
    other = tiny_gpt2(seed=4, n_embd=80, n_head=5)
    with pytest.raises(fp.PromptFileError, match="hidden size 64"):
        fp.PromptTuner.load(path, other, tok)
    other64 = tiny_gpt2(seed=4)
    other64.config._name_or_path = "gpt2-medium"
    with pytest.raises(fp.PromptFileError, match="made for model"):
        fp.PromptTuner.load(path, other64, tok)
    fp.PromptTuner.load(path, other64, tok, strict=False, engine="naive")


def test_legacy_pt_prompt_loads_without_unpickling(tmp_path):
    model, tok = tiny_gpt2(seed=4), tokenizer()
    path = str(tmp_path / "prompt.pt")
    torch.save(torch.randn(4, 64), path)
    loaded = fp.PromptTuner.load(path, model, tok, engine="naive")
    assert loaded.prompt.shape == (4, 64)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"prompt": Evil()}, str(tmp_path / "evil.pt"), _use_new_zipfile_serialization=True)
    with pytest.raises(fp.PromptFileError):
        fp.PromptTuner.load(str(tmp_path / "evil.pt"), model, tok, engine="naive")


def test_corrupt_prompt_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(fp.PromptFileError, match="not a valid"):
        fp.PromptTuner.load(str(path), tiny_gpt2(), tokenizer())
