"""Generation metrics: is the greedily decoded word the target (exact match), or a copy of an input
(parrot rate, the failure the post observed)?

Words are compared after ``normalize_word``: surrounding whitespace and punctuation stripped (Unicode
punctuation categories P*, so ``"matte."``, ``"(matte)"`` and ``"«matte»"`` count as ``"matte"``; inner
punctuation such as ``"well-known"`` or ``"o'clock"`` stays), then case folded (``"Matte"`` counts as
``"matte"``: the data's case is not the model's to guess at the start of a phrase). The raw comparison is
reported too, as ``exact_match_strict`` / ``parrot_rate_strict``; the normalised one is the headline.
"""
from __future__ import annotations

import unicodedata
from typing import Sequence


def normalize_word(word: str) -> str:
    """``word`` without surrounding whitespace and punctuation, case folded."""
    chars = list(word.strip())
    while chars and (chars[0].isspace() or unicodedata.category(chars[0]).startswith("P")):
        chars.pop(0)
    while chars and (chars[-1].isspace() or unicodedata.category(chars[-1]).startswith("P")):
        chars.pop()
    return "".join(chars).casefold()


def word_metrics(words: Sequence[str], references: Sequence[tuple[str, Sequence[str]]]) -> dict[str, float]:
    """``references``: per word, ``(target, input values)``. Rates over the words given (0 when none)."""
    n = max(len(words), 1)
    exact = strict_exact = parrot = strict_parrot = 0
    for word, (target, inputs) in zip(words, references):
        norm = normalize_word(word)
        exact += norm == normalize_word(target)
        parrot += any(norm == normalize_word(v) for v in inputs)
        strict_exact += word == target.strip()
        strict_parrot += any(word == v.strip() for v in inputs)
    return {"exact_match": exact / n, "parrot_rate": parrot / n, "exact_match_strict": strict_exact / n,
            "parrot_rate_strict": strict_parrot / n}
