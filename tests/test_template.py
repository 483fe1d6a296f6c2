import pytest

from fastprompt import DataError, Template, TemplateError
from fastprompt.template import TemplateEncoder

from helpers import tokenizer


def test_reference_template_matches_whole_sentence_tokenisation():
    """The notebook tokenised "Here are two antonyms W1 and W2" whole and replaced positions 3..6."""
    tok = tokenizer()
    enc = TemplateEncoder("Here are two {prompt} {input} and {target}", tok, prompt_len=4)
    assert len(tok(" antonyms")["input_ids"]) == 4
    for w1, w2 in [("hot", "cold"), ("scatter", "crowd"), ("null", "nan"), ("unequivocalness", "equivocalness")]:
        whole = tok(f"Here are two antonyms {w1} and {w2}")["input_ids"]
        e = enc.encode((w1, w2))
        assert e.prompt_start == 3
        assert list(e.ids[:3]) == whole[:3] and list(e.ids[7:]) == whole[7:]
        assert len(e.ids) == len(whole)
        assert tok.decode(e.ids[e.target_start:]) == " " + w2
    assert enc.n_context == 3 and enc.n_shared == 7


def test_builtin_data_tokenises_like_the_notebook():
    from fastprompt import load_pairs

    tok = tokenizer()
    enc = TemplateEncoder("Here are two {prompt} {input} and {target}", tok, prompt_len=4)
    for w1, w2 in load_pairs("antonyms")[::50]:
        whole = tok(f"Here are two antonyms {w1} and {w2}")["input_ids"]
        e = enc.encode((w1, w2))
        assert list(e.ids[:3]) + list(whole[3:7]) + list(e.ids[7:]) == whole


def test_fields_before_the_prompt_shorten_the_shared_head():
    enc = TemplateEncoder("Word: {input}. Opposite {prompt} {target}", tokenizer(), prompt_len=3)
    a, b = enc.encode(("hot", "cold")), enc.encode(("antidisestablishment", "tiny"))
    assert enc.n_shared == enc.n_context == len(tokenizer()("Word:")["input_ids"])
    assert a.prompt_start != b.prompt_start  # the prompt moves with the input's length
    assert a.ids[: enc.n_shared] == b.ids[: enc.n_shared]


@pytest.mark.parametrize("text, message", [
    ("Here are two {input} and {target}", "{prompt}"),
    ("Here are {prompt} two {prompt} {input} and {target}", "{prompt}"),
    ("Here are two {prompt} {input}", "{target}"),
    ("{prompt} {target} and {input}", "last"),
    ("{prompt} {input} {target} more", "last"),
    ("{prompt} {in put} {target}", "field name"),
    ("{prompt} {input {target}", "brace"),
])
def test_template_errors(text, message):
    with pytest.raises(TemplateError, match=message):
        Template(text)


def test_data_errors_are_clear():
    t = Template("Q: {question} {prompt} A: {target}")
    with pytest.raises(DataError, match="no field 'question'"):
        t.as_fields({"q": "x", "target": "y"})
    with pytest.raises(DataError, match="empty"):
        t.as_fields({"question": " ", "target": "y"})
    with pytest.raises(DataError, match="pairs"):
        Template("{a} {prompt} {b} {target}").as_fields(("x", "y"))


def test_sequence_longer_than_context_is_an_error():
    enc = TemplateEncoder("Here are two {prompt} {input} and {target}", tokenizer(), prompt_len=4, max_len=12)
    enc.encode(("hot", "cold"))
    with pytest.raises(DataError, match="context"):
        enc.encode(("hot", "antidisestablishmentarianism " * 3))
