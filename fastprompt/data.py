"""Datasets: the built-in WordNet antonyms, CSV and JSONL files, and a deterministic split.

CSV: a header row, then one example a row, as the ``csv`` module reads it (quoted fields may hold commas,
line breaks and any other character). The header ``word1,word2`` (the post's format) gives
``(input, target)`` pairs; any other header gives mappings from column name to value. Values are kept as
text: "null", "nan" and "NA" are words, not missing values. JSONL: one JSON object a line (lines end at
``\\n`` alone, as JSON Lines defines them) holding the template's fields; other keys (ids, metadata, numbers)
are kept but never used, as CSV columns beyond the template's fields are. Only the template's fields must be
non-empty strings (``Template.as_fields`` checks them, and the error names the file and line).

``load_pairs`` returns an ``Examples`` list that remembers each example's file and line, so that a data
error found later (by the template, after the split) names the line (``locate``).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import stat
from typing import Any, Callable, Sequence

from .errors import DataError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
BUILTIN = {"antonyms": "antonyms.csv"}


class Examples(list):
    """A list of examples that knows the file and line each one came from (``where``)."""

    def __init__(self, examples: Sequence[Any], source: str, lines: Sequence[int]):
        super().__init__(examples)
        self.source = source
        self._lines = {id(example): line for example, line in zip(self, lines)}  # the list keeps them alive

    def where(self, example: Any) -> str | None:
        line = self._lines.get(id(example))
        return None if line is None else f"{self.source}, line {line}"


def data_path(source: str) -> str:
    """The file a ``--data`` value reads: a built-in dataset's asset, or ``source`` itself."""
    return os.path.join(ASSETS, BUILTIN[source]) if source in BUILTIN else source


def content_hash(source: str) -> str | None:
    """sha256 of the data file's bytes (what ``--resume`` compares), None where it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open_regular(data_path(source)) as f:
            if f is None:
                return None
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, ValueError):
        return None
    return digest.hexdigest()


def open_regular(path: str):
    """``path`` opened for reading in binary where it is a regular file, else None, without ever blocking:
    the type is checked first (``os.stat``) and the file opened with ``O_NONBLOCK``, so a FIFO, a device or a
    socket put in a file's place is never waited on (opening a FIFO blocks until a writer comes)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        return _Nothing()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else in between
            os.close(fd)
            return _Nothing()
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def load_pairs(source: str = "antonyms") -> list[Any]:
    """Examples from a built-in dataset name or a .csv / .jsonl path (an ``Examples`` list)."""
    if source in BUILTIN:
        with open(data_path(source), encoding="utf-8") as f:
            text = f.read()
        return _parse_csv(text, source)
    try:
        mode = os.stat(source).st_mode
    except (OSError, ValueError):
        names = ", ".join(BUILTIN)
        raise DataError(f"no such dataset file: {source} (built-in datasets: {names})") from None
    if stat.S_ISDIR(mode):
        raise DataError(f"{source} is a directory; give a .csv or .jsonl file")
    if not stat.S_ISREG(mode):
        raise DataError(f"{source} is not a regular file; give a .csv or .jsonl file")
    if not source.endswith((".jsonl", ".json", ".csv", ".tsv")):
        raise DataError(f"unknown dataset format for {source}: use a .csv or .jsonl file")
    try:
        with open_regular(source) as f:
            if f is None:
                raise DataError(f"{source} is not a regular file; give a .csv or .jsonl file")
            raw = f.read()
    except OSError as e:
        raise DataError(f"cannot read {source}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not valid UTF-8 (byte {e.start})") from None
    if source.endswith((".jsonl", ".json")):
        return _parse_jsonl(text, source)
    return _parse_csv(text, source)


def _blank_row(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


def _csv_records(text: str, source: str, delimiter: str) -> list[tuple[int, list[str]]]:
    """(first line, fields) of each record as the csv module reads them; trailing blank lines dropped,
    blank lines inside the file refused."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    records: list[tuple[int, list[str]]] = []
    while True:
        first = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{source}, line {reader.line_num}: malformed CSV ({e})") from None
        records.append((first, row))
    while records and _blank_row(records[-1][1]):
        records.pop()
    if not records:
        raise DataError(f"{source} is empty")
    for line, row in records:
        if _blank_row(row):
            raise DataError(f"{source}, line {line}: blank line")
    return records


def _parse_csv(text: str, source: str) -> Examples:
    delimiter = "\t" if source.endswith(".tsv") else ","
    records = _csv_records(text, source, delimiter)
    first = records[0][1]
    header = [h.strip() for h in first]
    if len(header) < 2 or any(not h for h in header) or len(set(header)) != len(header):
        raise DataError(f"{source}, line 1: expected a header with at least two distinct column names, got {first}")
    if len(records) == 1:
        raise DataError(f"{source} has a header but no examples")
    pairs = header == ["word1", "word2"]
    examples: list[Any] = []
    for n, row in records[1:]:
        if len(row) != len(header):
            more_or_less = "too many" if len(row) > len(header) else "too few"
            raise DataError(f"{source}, line {n}: {more_or_less} fields ({len(row)}, the header has {len(header)})")
        for name, value in zip(header, row):
            if not value.strip():
                raise DataError(f"{source}, line {n}: empty value in column {name!r}")
        examples.append((row[0], row[1]) if pairs else dict(zip(header, row)))
    return Examples(examples, source, [n for n, _ in records[1:]])


def _json_lines(text: str, source: str) -> list[tuple[int, str]]:
    """(line number, line): JSON Lines ends lines at ``\\n`` (a ``\\r`` before it goes too); other Unicode
    separators (U+2028, U+0085, ...) are characters like any other. Blank lines as for CSV."""
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    blank = [not line.strip(" \t") for line in lines]  # JSON's own whitespace (\r and \n are gone)
    while lines and blank[-1]:
        lines.pop()
        blank.pop()
    if not lines:
        raise DataError(f"{source} is empty")
    for n, is_blank in enumerate(blank, 1):
        if is_blank:
            raise DataError(f"{source}, line {n}: blank line")
    return list(enumerate(lines, 1))


def _parse_jsonl(text: str, source: str) -> Examples:
    examples, where = [], []
    for n, line in _json_lines(text, source):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}, line {n}: invalid JSON ({e.msg}, column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{source}, line {n}: JSON nested too deeply") from None
        except ValueError:  # e.g. an integer longer than Python converts (sys.get_int_max_str_digits)
            raise DataError(f"{source}, line {n}: a JSON number too long to convert") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}, line {n}: expected a JSON object, got {type(obj).__name__}")
        examples.append(obj)  # the template's fields are checked where they are used (Template.as_fields)
        where.append(n)
    return Examples(examples, source, where)


def locate(examples: Sequence[Any], check: Callable[[Any], Any], error: DataError) -> DataError:
    """The first example of ``examples`` (file order) that ``check`` refuses, as a ``DataError`` naming its
    file and line; ``error`` itself where no line is known or every example passes on its own."""
    where = getattr(examples, "where", None)
    if where is None:
        return error
    for example in examples:
        try:
            check(example)
        except DataError as e:
            line = where(example)
            return DataError(f"{line}: {e}") if line else error
    return error


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
