"""A general-text sample for the forgetting metric PEFT's own benchmark uses: the rise in
cross-entropy on fixed text, after training against before.

It must ship offline and be unrelated to both the task and the calibration data (country facts),
so by default it is English prose from the Python language reference that every CPython carries
(``pydoc_data.topics``): the paragraphs of running text, without code, grammar rules or headings.
A user's own sample (one paragraph per blank-line-separated block of a text file) replaces it.
"""

from __future__ import annotations

import random
from pathlib import Path

from corda_vl.errors import CordaError

MIN_WORDS = 30
"""Shorter paragraphs are mostly captions and one-line notes, not running text."""


def _paragraphs(text: str) -> list[str]:
    out = []
    for block in text.split("\n\n"):
        lines = block.split("\n")
        if any(line.startswith(" ") for line in lines):  # code, grammar rules, indented lists
            continue
        if any(rule * 5 in block for rule in "*=-") or ">>>" in block:  # headings, interpreter sessions
            continue
        words = block.split()
        if len(words) >= MIN_WORDS:
            out.append(" ".join(words))
    return out


def general_texts(n: int, *, path: str | Path | None = None, seed: int = 0) -> list[str]:
    """``n`` paragraphs of general text in a fixed seeded order (the same for every run, so every
    method is scored on the same items). ``path``: a text file of your own instead of the
    default sample (paragraphs separated by blank lines, at least MIN_WORDS words each)."""
    if path is not None:
        paragraphs = _paragraphs(Path(path).read_text())
        source = str(path)
    else:
        try:
            from pydoc_data.topics import topics
        except ImportError:  # some distributions strip pydoc_data from the standard library
            raise CordaError("the default general-text sample needs the standard library's pydoc_data, which this "
                             "Python lacks; pass a text file of your own (general_text_file in the YAML).") from None
        # topics repeat some paragraphs (one statement documented under two keys): each once
        paragraphs = list(dict.fromkeys(p for key in sorted(topics) for p in _paragraphs(topics[key])))
        source = "pydoc_data.topics"
    if len(paragraphs) < n:
        raise CordaError(f"{source} has {len(paragraphs)} paragraphs of at least {MIN_WORDS} words; "
                         f"{n} were asked for. Ask for fewer or give a longer text.")
    random.Random(seed).shuffle(paragraphs)
    return paragraphs[:n]
