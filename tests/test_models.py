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
