"""Readout: nearest vocabulary tokens (cosine and euclidean), the CLI on saved prompts of every method."""
import torch

import fastprompt as fp
from fastprompt.interpret import main
from fastprompt.nearest import nearest_tokens
from fastprompt.models import embedding_table

from helpers import tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small")]


def test_vocabulary_rows_read_back_exactly():
    model, tok = tiny_gpt2(seed=5), tokenizer()
    ids = [11, 50256, 1337, 42893, 7]  # includes the last row of the 50,257-row table
    prompt = embedding_table(model).detach()[torch.tensor(ids)]
    for metric, best in (("cosine", 1.0), ("euclidean", 0.0)):
        rows = nearest_tokens(prompt, model, tok, k=3, metric=metric)
        assert [row[0][0] for row in rows] == ids
        for row in rows:
            assert abs(row[0][2] - best) < 1e-5
            assert row[0][1] == tok.decode([row[0][0]])
        scores = [[s for _, _, s in row] for row in rows]  # sorted: best first
        assert all(r == sorted(r, reverse=(metric == "cosine")) for r in scores)


def test_cli_on_a_saved_tiny_prompt(tmp_path, capsys):
    model, tok = fp.load_model("tiny", seed=1337)
    ids = tok(" antonyms", add_special_tokens=False)["input_ids"]
    tuner = fp.PromptTuner(model, tok, prompt_len=len(ids), engine="naive", init="text:antonyms")
    path = str(tmp_path / "p.safetensors")
    tuner.save(path)
    assert main([path, "--model", "tiny", "--k", "2"]) == 0
    out = capsys.readouterr().out
    assert "# nearest tokens by cosine" in out and "# nearest tokens by euclidean" in out
    for i in ids:
        assert f"token_id: {i}, token: {tok.decode([i])!r}, cosine similarity: 1.0000" in out
        assert f"token_id: {i}, token: {tok.decode([i])!r}, euclidean distance: 0.0000" in out


def test_cli_reads_each_method(tmp_path, capsys):
    model, tok = fp.load_model("tiny", seed=1337)
    for method in ("hard", "relaxed", "prefix"):
        tuner = fp.PromptTuner(model, tok, prompt_len=4, engine="naive", method=method, init="text:antonyms")
        path = str(tmp_path / f"{method}.safetensors")
        tuner.save(path)
        assert main([path, "--model", "tiny", "--k", "1"]) == 0, method
        out = capsys.readouterr().out
        assert f"# method: {method}" in out
        if method == "hard":  # text init: the projection is " antonyms" itself
            assert "tokens: ' antonyms'" in out and "cosine similarity: 1.0000" in out
        if method == "relaxed":
            assert "probability" in out and "tokens: ' antonyms'" in out
        if method == "prefix":
            assert "no vocabulary readout" in out


def test_cli_bad_file_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a file")
    assert main([str(bad), "--model", "tiny"]) == 2
    assert capsys.readouterr().err.startswith("error:")
