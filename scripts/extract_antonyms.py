"""Build fastprompt/assets/antonyms.csv from WordNet 3.0's data files.

WordNet stores antonymy as a *lexical* pointer ``!`` between two words of two synsets:
``! <target offset> <pos> <ssss tttt>`` where ``ss`` is the source word's number in this synset and
``tt`` the target word's number in the target synset (hex, 1-based). We keep pairs where both words
are single alphabetic words, lowercase them, add both directions and deduplicate.

Usage (the Debian package wordnet-base installs the files under /usr/share/wordnet):

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb /tmp/wn
    python scripts/extract_antonyms.py /tmp/wn/usr/share/wordnet fastprompt/assets/antonyms.csv

The output is covered by WordNet's license (fastprompt/assets/WORDNET_LICENSE).
"""
from __future__ import annotations

import csv
import os
import re
import sys

DATA_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "s": "data.adj", "r": "data.adv"}
_ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")  # syntactic markers on adjectives: "galore(ip)"


def _parse_synsets(path: str) -> dict[int, tuple[list[str], list[tuple[int, str, int, int]]]]:
    """offset -> (words, antonym pointers as (target offset, target pos, source no., target no.))."""
    synsets = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):  # license header lines start with two spaces
                continue
            fields = line.split(" | ", 1)[0].split()
            offset, n_words = int(fields[0]), int(fields[3], 16)
            words = [_ADJ_MARKER.sub("", fields[4 + 2 * i]) for i in range(n_words)]
            pos = 4 + 2 * n_words
            n_ptrs = int(fields[pos])
            pointers = []
            for i in range(n_ptrs):
                symbol, target, target_pos, src_tgt = fields[pos + 1 + 4 * i: pos + 5 + 4 * i]
                if symbol == "!":
                    pointers.append((int(target), target_pos, int(src_tgt[:2], 16), int(src_tgt[2:], 16)))
            synsets[offset] = (words, pointers)
    return synsets


def extract_antonyms(wordnet_dir: str) -> list[tuple[str, str]]:
    """Sorted, deduplicated (word, antonym) pairs of single lowercase words, both directions."""
    files = {name: _parse_synsets(os.path.join(wordnet_dir, name)) for name in sorted(set(DATA_FILES.values()))}
    pairs = set()
    for name, synsets in files.items():
        for words, pointers in synsets.values():
            for target, target_pos, source_no, target_no in pointers:
                target_words = files[DATA_FILES[target_pos]][target][0]
                a, b = words[source_no - 1].lower(), target_words[target_no - 1].lower()
                if a.isalpha() and b.isalpha() and a.isascii() and b.isascii() and a != b:
                    pairs.add((a, b))
                    pairs.add((b, a))
    return sorted(pairs)


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python scripts/extract_antonyms.py WORDNET_DIR OUT.csv")
    pairs = extract_antonyms(argv[0])
    with open(argv[1], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["word1", "word2"])
        writer.writerows(pairs)
    print(f"wrote {len(pairs)} pairs to {argv[1]}")


if __name__ == "__main__":
    main(sys.argv[1:])
