"""GCG (fastprompt/methods/gcg.py): deterministic with a seed, candidate losses exact, the vocabulary filter, the
re-tokenisation drop, budgets, the prompt's text round trip, prompt files and the CLI, on tiny models."""
import json

import pytest
import torch

import fastprompt as fp
from fastprompt.errors import ConfigError
from fastprompt.methods.gcg import allowed_tokens
from fastprompt.models import embedding_table

from helpers import rel_err, tiny_causal_lm, tiny_gpt2, tokenizer

PAIRS = [("hot", "cold"), ("up", "down"), ("good", "bad"), ("big", "small"), ("wet", "dry"), ("old", "new"),
         ("fast", "slow"), ("light", "dark"), ("high", "low")]


@pytest.fixture(scope="module")
def tiny():
    return fp.load_model("tiny", seed=1337)


def gcg_tuner(model, tok, seed=7, engine="auto", **options):
    return fp.PromptTuner(model, tok, prompt_len=3, method="gcg", seed=seed, engine=engine,
                          method_options={"top_k": 8, "candidates": 5, **options})


def test_a_fixed_seed_makes_it_deterministic(tiny):
    model, tok = tiny
    runs = []
    for _ in range(2):
        tuner = gcg_tuner(model, tok)
        tuner.fit(PAIRS, epochs=2, batch_size=4, progress=False)
        runs.append((tuner.method.token_ids(tuner.prompt), [r["train_loss"] for r in tuner.history]))
    assert runs[0] == runs[1]
    assert tuner.method.step == 6 and tuner.method.evaluated > 0


@pytest.mark.parametrize("kind, engine", [("gpt2", "generic"), ("gpt2", "fused"), ("llama", "generic"),
                                          ("llama", "fused")])
def test_candidate_losses_are_the_exact_losses_of_those_token_prompts(kind, engine):
    model = tiny_gpt2(seed=3) if kind == "gpt2" else tiny_causal_lm("llama", seed=3)
    tok = tokenizer()
    tuner = gcg_tuner(model, tok, engine=engine, candidates=7)
    batch = tuner.encode(PAIRS[:7])  # 7 examples of uneven lengths
    method = tuner.method
    ids = method.ids(tuner.prompt)
    _, grad = method.token_gradient(tuner.engine, ids, batch)
    candidates = method.sample_candidates(ids, grad, torch.Generator().manual_seed(0))
    assert len(candidates) >= 2
    assert all((c != ids).sum() == 1 for c in candidates)  # single-token swaps
    losses = method.candidate_losses(tuner.engine, candidates, batch)
    table = embedding_table(model).detach().float()
    for c, loss in zip(candidates, losses):
        naive = fp.PromptTuner(model, tok, prompt_len=3, engine="naive", prompt=table[c])
        with torch.no_grad():
            expected = naive.loss(PAIRS[:7])
        assert rel_err(loss, expected) <= 1e-5


def test_the_kept_prompt_is_the_best_on_the_batch_and_the_loss_never_rises(tiny):
    model, tok = tiny
    tuner = gcg_tuner(model, tok, candidates=6)
    batch = tuner.encode(PAIRS[:4])
    n = sum(e.target_len for e in batch)
    with torch.no_grad():
        before = tuner.loss(batch).item()
    ce_sum = tuner.method.discrete_step(tuner.engine, tuner.prompt, batch)
    with torch.no_grad():
        after = tuner.loss(batch).item()
    assert after <= before + 1e-6
    assert abs(ce_sum.item() / n - after) <= 1e-5 * after


def test_the_vocabulary_filter():
    tok = tokenizer()
    allowed = allowed_tokens(tok, len(tok))
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    assert not allowed[tok.eos_token_id] and not allowed[newline]
    partial = next(i for i in range(len(tok)) if "\ufffd" in tok.decode([i]))  # a lone UTF-8 byte
    assert not allowed[partial]
    word = tok(" antonyms", add_special_tokens=False)["input_ids"][0]
    comma = tok(",", add_special_tokens=False)["input_ids"][0]
    accented = tok(" café", add_special_tokens=False)["input_ids"]
    assert allowed[word] and allowed[comma]
    ascii_words = allowed_tokens(tok, len(tok), ascii_only=True)
    assert ascii_words[word] and not ascii_words[comma] and ascii_words.sum() < allowed.sum()
    for i in ascii_words.nonzero().flatten().tolist()[:: 997]:
        text = tok.decode([i])
        assert text.lstrip(" ").isascii() and text.lstrip(" ").isalpha() and text.count(" ") <= 1
    assert not all(ascii_words[i] for i in accented)


def test_candidates_whose_text_tokenises_otherwise_are_dropped(tiny):
    model, tok = tiny
    tuner = gcg_tuner(model, tok, top_k=1, candidates=4)
    a, x, b, the = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" a", " x", "b", " the"))
    assert tok(" ab", add_special_tokens=False)["input_ids"] != [a, b]  # " a" + "b" reads back as other ids
    method = tuner.method
    assert method.round_trips([a, x, x]) and not method.round_trips([a, b, x])
    no_space = tok("a", add_special_tokens=False)["input_ids"][0]
    assert not method.round_trips([no_space, x, x])  # the slot's space belongs to the prompt's text
    ids = torch.tensor([a, x, x])
    grad = torch.zeros(3, len(tok))
    grad[0, the] = grad[1, b] = grad[2, the] = -1.0  # top-1 swaps: " the" at 0 and 2, "b" after " a" at 1
    candidates = method.sample_candidates(ids, grad, torch.Generator().manual_seed(0))
    kept = {tuple(c.tolist()) for c in candidates}
    assert kept == {(the, x, x), (a, x, the)}
    assert method.dropped >= 1


def test_budgets_hold(tiny):
    model, tok = tiny
    tuner = gcg_tuner(model, tok)
    tuner.fit(PAIRS, epochs=5, batch_size=2, progress=False, max_steps=3)
    assert tuner.method.step == 3 and tuner.stopped == "max_steps"
    tuner = gcg_tuner(model, tok)
    start = tuner.prompt.detach().clone()
    tuner.fit(PAIRS, epochs=5, batch_size=2, progress=False, max_seconds=0)
    assert tuner.method.step == 0 and tuner.stopped == "max_seconds" and torch.equal(tuner.prompt, start)


def test_prompt_text_reproduces_the_prompt_and_its_loss(tiny, tmp_path):
    model, tok = tiny
    tuner = gcg_tuner(model, tok)
    tuner.fit(PAIRS, epochs=2, batch_size=3, progress=False)
    text = tuner.prompt_text()
    assert text == tok.decode(tuner.method.token_ids(tuner.prompt)) and text.startswith(" ")
    again = fp.PromptTuner(model, tok, prompt_len=3, method="gcg", init=f"text:{text}")
    assert again.method.token_ids(again.prompt) == tuner.method.token_ids(tuner.prompt)
    soft = fp.PromptTuner(model, tok, prompt_len=3, init=f"text:{text}")  # the text as a hand-written prompt
    assert soft.evaluate(PAIRS, generation=False)["loss"] == tuner.evaluate(PAIRS, generation=False)["loss"]
    path = str(tmp_path / "gcg.safetensors")
    tuner.save(path)
    loaded = fp.PromptTuner.load(path, model, tok)
    assert loaded.method.name == "gcg" and loaded.prompt_text() == text
    assert loaded.method.options() == tuner.method.options()
    from_file = fp.PromptTuner(model, tok, prompt_len=3, method="gcg", init=f"file:{path}")
    assert from_file.prompt_text() == text
    with pytest.raises(ConfigError, match="no text"):
        fp.PromptTuner(model, tok, prompt_len=3).prompt_text()


def test_bad_options_are_config_errors(tiny):
    model, tok = tiny
    for options, message in (({"top_k": 0}, "top_k"), ({"candidates": 1.5}, "candidates"),
                             ({"ascii_only": "yes"}, "ascii_only"), ({"beam": 2}, "beam")):
        with pytest.raises(ConfigError, match=message):
            gcg_tuner(model, tok, **options)


def test_cli_end_to_end(tmp_path, capsys):
    from fastprompt.interpret import main as interpret
    from fastprompt.train import main

    out = tmp_path / "run"
    code = main(["--model", "tiny", "--method", "gcg", "--epochs", "1", "--train-size", "24", "--batch-size", "8",
                 "--test-size", "0.01", "--prompt-len", "3", "--gcg-top-k", "8", "--gcg-candidates", "4",
                 "--gcg-ascii-only", "--max-steps", "2", "--out", str(out), "--no-progress", "--samples", "2",
                 "--baseline", "antonyms"])
    assert code == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["config"]["gcg_candidates"] == 4
    final = next(r for r in lines if r.get("event") == "final")
    assert final["method"] == "gcg" and len(final["token_ids"]) == 3
    text = final["token_text"]
    assert all(w.isascii() and w.isalpha() for w in text.split())  # --gcg-ascii-only
    assert (out / "hard_prompt.txt").read_text().startswith(text)
    model, tok = fp.load_model("tiny", seed=1337)
    tuner = fp.PromptTuner.load(str(out / "prompt.safetensors"), model, tok)
    assert tuner.prompt_text() == text and tuner.method.options()["ascii_only"] is True
    capsys.readouterr()
    assert interpret([str(out / "prompt.safetensors"), "--model", "tiny", "--k", "2"]) == 0
    shown = capsys.readouterr().out
    assert "# method: gcg" in shown and repr(text) in shown
