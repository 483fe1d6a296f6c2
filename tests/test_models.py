import os

import pytest
import torch

import fastprompt as fp


def test_tiny_is_seeded_and_frozen():
    a, tok = fp.load_model("tiny", seed=1)
    b, _ = fp.load_model("tiny", seed=1)
    c, _ = fp.load_model("tiny", seed=2)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert tok("Here are two antonyms")["input_ids"] == [4342, 389, 734, 281, 1122, 88, 907]


def test_from_pretrained_local_directory(tmp_path):
    model, tok = fp.load_model("tiny", seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = fp.load_model(str(tmp_path))
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)
    assert loaded_tok("hot")["input_ids"] == tok("hot")["input_ids"]
    assert not any(p.requires_grad for p in loaded.parameters())


def test_local_directory_without_tokenizer_falls_back_to_shipped_gpt2(tmp_path):
    model, tok = fp.load_model("tiny", seed=3)
    model.save_pretrained(tmp_path)
    _, loaded_tok = fp.load_model(str(tmp_path))
    assert loaded_tok("hot and cold")["input_ids"] == tok("hot and cold")["input_ids"]


def test_unloadable_model_is_one_clear_error(tmp_path):
    with pytest.raises(fp.ModelError, match="--model tiny"):
        fp.load_model(str(tmp_path / "missing-model"))
    with pytest.raises(fp.ModelError, match="--model tiny"):
        fp.load_model("no-such-org/no-such-model-xyz")


def test_cached_pretrained_builds_once_then_reads_the_copy(tmp_path):
    """The mechanism behind the Gemma GGUF cache: a slow build saved once as safetensors, remade when its source
    description changes or the copy is damaged; the copy gives the same logits."""
    from fastprompt.models import cached_pretrained, gpt2_tokenizer, random_gpt2

    builds = []

    def build():
        builds.append(1)
        return random_gpt2(dict(n_layer=1, n_embd=32, n_head=2, n_positions=32), seed=3).eval(), gpt2_tokenizer()

    where = str(tmp_path / "copy")
    source = {"file": "model.gguf", "bytes": 123}
    first, _ = cached_pretrained(where, source, build)
    second, tok = cached_pretrained(where, source, build)
    assert len(builds) == 1 and os.path.isfile(os.path.join(where, "model.safetensors"))
    ids = torch.tensor([tok("hot and cold")["input_ids"]])
    assert torch.equal(first(ids).logits, second(ids).logits)
    cached_pretrained(where, {**source, "bytes": 124}, build)  # another source: made again
    assert len(builds) == 2
    with open(os.path.join(where, "model.safetensors"), "wb") as f:
        f.write(b"damaged")
    again, _ = cached_pretrained(where, {**source, "bytes": 124}, build)
    assert len(builds) == 3 and torch.equal(again(ids).logits, first(ids).logits)
    assert sorted(os.listdir(tmp_path)) == ["copy"]  # no temporary directory left
