import importlib.util
import os

import pytest

from fastprompt import DataError, load_pairs, subsample, train_test_split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_builtin_antonyms():
    pairs = load_pairs("antonyms")
    assert 6000 <= len(pairs) <= 7000
    assert len(set(pairs)) == len(pairs)
    assert ("hot", "cold") in pairs and ("cold", "hot") in pairs
    assert all(a.isalpha() and a == a.lower() and b.isalpha() and b == b.lower() for a, b in pairs)
    assert all((b, a) in set(pairs) for a, b in pairs[::37])


def test_split_is_deterministic_and_complete():
    pairs = load_pairs("antonyms")
    train, test = train_test_split(pairs, seed=1337)
    assert (train, test) == train_test_split(pairs, seed=1337)
    assert train != train_test_split(pairs, seed=1)[0]
    assert len(test) == round(0.2 * len(pairs)) and sorted(train + test) == sorted(pairs)
    small = subsample(train, 100, seed=1337)
    assert len(small) == 100 and set(small) <= set(train) and small == subsample(train, 100, seed=1337)


def test_csv_keeps_null_and_nan_as_words(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("word1,word2\nnull,nan\nNA,none\n\n")
    assert load_pairs(str(path)) == [("null", "nan"), ("NA", "none")]


def test_csv_with_other_header_gives_mappings(tmp_path):
    path = tmp_path / "q.csv"
    path.write_text('question,target\n"a, b",c\n')
    assert load_pairs(str(path)) == [{"question": "a, b", "target": "c"}]


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"input": "hot", "target": "cold"}\n{"input": "up", "target": "down"}\n')
    assert load_pairs(str(path))[1] == {"input": "up", "target": "down"}


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", "empty"),
    ("header.csv", b"word1,word2\n", "no examples"),
    ("blank.csv", b"word1,word2\na,b\n\nc,d\n", "line 3: blank"),
    ("wide.csv", b"word1,word2\na,b,c\n", "too many fields"),
    ("narrow.csv", b"word1,word2\na\n", "too few fields"),
    ("emptyword.csv", b"word1,word2\na,\n", "empty value"),
    ("bad.csv", b"word1,word2\n\xff\xfe,b\n", "UTF-8"),
    ("bad.jsonl", b'{"input": "a"\n', "invalid JSON"),
    ("list.jsonl", b'["a", "b"]\n', "JSON object"),
    ("data.txt", b"a,b\n", "format"),
])
def test_malformed_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_pairs(str(path))


def test_a_jsonl_field_the_template_uses_must_be_a_string(tmp_path):
    """Issue 23: JSONL keys may hold anything; the template's fields are checked where they are used."""
    from fastprompt import Template

    path = tmp_path / "num.jsonl"
    path.write_bytes(b'{"input": 1, "target": "b", "id": 7}\n')
    examples = load_pairs(str(path))
    assert examples == [{"input": 1, "target": "b", "id": 7}]
    with pytest.raises(DataError, match="field 'input' must be a string, got int"):
        Template().as_fields(examples[0])


def test_missing_file():
    with pytest.raises(DataError, match="no such dataset"):
        load_pairs("/nonexistent/file.csv")


def test_wordnet_extraction_on_a_fixture(tmp_path):
    spec = importlib.util.spec_from_file_location("extract", os.path.join(ROOT, "scripts", "extract_antonyms.py"))
    extract = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extract)
    header = "  1 This software and database is being provided to you, the LICENSEE\n"
    (tmp_path / "data.adj").write_text(header +
        "00000001 00 a 02 hot 0 Red-hot 0 001 ! 00000002 a 0101 | gloss\n"
        "00000002 00 a 01 cold 0 002 ! 00000001 a 0101 ! 00000003 s 0101 | gloss\n"
        "00000003 00 s 01 ice_cold 0 000 | multiword: skipped\n"
        "00000004 00 a 01 big(a) 0 001 ! 00000005 a 0101 | adjective marker stripped\n"
        "00000005 00 a 01 small 0 000 | gloss\n")
    (tmp_path / "data.noun").write_text(header + "00000010 00 n 02 day 0 Daytime 0 001 ! 00000011 n 0201 | g\n"
                                        "00000011 00 n 01 night 0 000 | g\n")
    (tmp_path / "data.verb").write_text(header)
    (tmp_path / "data.adv").write_text(header)
    assert extract.extract_antonyms(str(tmp_path)) == sorted([
        ("hot", "cold"), ("cold", "hot"), ("big", "small"), ("small", "big"), ("daytime", "night"), ("night", "daytime"),
    ])
