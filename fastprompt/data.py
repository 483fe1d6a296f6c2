"""Datasets: the built-in WordNet antonyms, CSV and JSONL files, and a deterministic split.

CSV: a header row, then one example a row. The header ``word1,word2`` (the post's format) gives
``(input, target)`` pairs; any other header gives mappings from column name to value. Values are kept as
text: "null", "nan" and "NA" are words, not missing values. JSONL: one JSON object a line whose keys are
the template's fields.
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
from typing import Any, Sequence

from .errors import DataError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUILTIN = {"antonyms": "antonyms.csv"}


def load_pairs(source: str = "antonyms") -> list[Any]:
    """Examples from a built-in dataset name or a .csv / .jsonl path."""
    if source in BUILTIN:
        with open(os.path.join(ASSETS, BUILTIN[source]), encoding="utf-8") as f:
            text = f.read()
        return _parse_csv(text, source)
    if not os.path.exists(source):
        names = ", ".join(BUILTIN)
        raise DataError(f"no such dataset file: {source} (built-in datasets: {names})")
    if os.path.isdir(source):
        raise DataError(f"{source} is a directory; give a .csv or .jsonl file")
    with open(source, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not valid UTF-8 (byte {e.start})") from None
    if source.endswith(".jsonl") or source.endswith(".json"):
        return _parse_jsonl(text, source)
    if source.endswith(".csv") or source.endswith(".tsv"):
        return _parse_csv(text, source)
    raise DataError(f"unknown dataset format for {source}: use a .csv or .jsonl file")


def _content_lines(text: str, source: str) -> list[tuple[int, str]]:
    """(line number, line) pairs; blank lines inside the file are an error, trailing ones are not."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataError(f"{source} is empty")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            raise DataError(f"{source}, line {n}: blank line")
    return list(enumerate(lines, 1))


def _parse_csv(text: str, source: str) -> list[Any]:
    lines = _content_lines(text, source)
    delimiter = "\t" if source.endswith(".tsv") else ","
    rows = list(csv.reader(io.StringIO("\n".join(line for _, line in lines)), delimiter=delimiter, strict=True))
    header = [h.strip() for h in rows[0]]
    if len(header) < 2 or any(not h for h in header) or len(set(header)) != len(header):
        raise DataError(f"{source}, line 1: expected a header with at least two distinct column names, got {rows[0]}")
    if len(rows) == 1:
        raise DataError(f"{source} has a header but no examples")
    pairs = header == ["word1", "word2"]
    examples: list[Any] = []
    for (n, _), row in zip(lines[1:], rows[1:]):
        if len(row) != len(header):
            more_or_less = "too many" if len(row) > len(header) else "too few"
            raise DataError(f"{source}, line {n}: {more_or_less} fields ({len(row)}, the header has {len(header)})")
        for name, value in zip(header, row):
            if not value.strip():
                raise DataError(f"{source}, line {n}: empty value in column {name!r}")
        examples.append((row[0], row[1]) if pairs else dict(zip(header, row)))
    return examples


def _parse_jsonl(text: str, source: str) -> list[Any]:
    examples = []
    for n, line in _content_lines(text, source):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}, line {n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}, line {n}: expected a JSON object, got {type(obj).__name__}")
        for key, value in obj.items():
            if not isinstance(value, str):
                raise DataError(f"{source}, line {n}: field {key!r} must be a string")
            if not value.strip():
                raise DataError(f"{source}, line {n}: empty value in field {key!r}")
        examples.append(obj)
    return examples


def train_test_split(examples: Sequence[Any], test_size: float = 0.2, seed: int = 1337) -> tuple[list, list]:
    """Deterministic split: a seeded permutation, the first ``test_size`` share is the test set."""
    if not 0.0 <= test_size < 1.0:
        raise DataError(f"test_size must be in [0, 1), got {test_size}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_test = int(round(len(examples) * test_size))
    test = [examples[i] for i in order[:n_test]]
    train = [examples[i] for i in order[n_test:]]
    return train, test


def subsample(examples: Sequence[Any], n: int | None, seed: int = 1337) -> list:
    """``n`` examples drawn without replacement by seed (all of them when ``n`` is None or too large)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise DataError(f"--train-size must be at least 1, got {n}")
    return random.Random(seed + 1).sample(list(examples), n)
