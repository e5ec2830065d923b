"""One benchmark's result kept item by item, so that any comparison can be recomputed later.

A score over N evaluation items is a weighted mean of per-item values, then an optional
transform: accuracy and exact match are the mean of 0/1 hits; perplexity is exp of the
token-weighted mean of each text's mean negative log-likelihood per token; cross-entropy is the
same without the exp. Keeping the values (and weights) instead of the single number is what lets
the report bootstrap over items and pair two methods on the same items
(``corda_vl.lab.stats``).

On disk a run's items are JSON lines, one per benchmark with its values in item order (item i is
the same question / image / text in every run of a recipe)::

    {"benchmark": "capitals", "metric": "em", "values": [1, 0, 0, 1]}
    {"benchmark": "facts", "metric": "perplexity", "values": [2.61, 2.9], "weights": [212, 180], "transform": "exp"}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from corda_vl.atomic import atomic_file
from corda_vl.errors import CordaError

TRANSFORMS = (None, "exp")


@dataclass
class ItemScores:
    """Per-item values of one benchmark; :attr:`value` is the benchmark's score."""

    metric: str
    values: list[float]
    weights: list[float] | None = None
    transform: str | None = None

    def __post_init__(self) -> None:
        self.values = [float(v) for v in self.values]
        if self.weights is not None:
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.values):
                raise CordaError(f"{self.metric}: {len(self.weights)} weights for {len(self.values)} items.")
        if self.transform not in TRANSFORMS:
            raise CordaError(f"{self.metric}: transform must be one of {TRANSFORMS}, got {self.transform!r}.")

    @property
    def value(self) -> float:
        """Weighted mean of the values, transformed; NaN without items."""
        weights = self.weights or [1.0] * len(self.values)
        total = sum(weights)
        if not self.values or total <= 0:
            return math.nan
        mean = sum(w * v for w, v in zip(weights, self.values)) / total
        return math.exp(mean) if self.transform == "exp" else mean


def hits(metric: str, correct: Iterable[bool]) -> ItemScores:
    """Accuracy-like scores: 1 for a right answer, 0 for a wrong one."""
    return ItemScores(metric, [float(bool(c)) for c in correct])


def token_nll(metric: str, nll_per_token: Sequence[float], tokens: Sequence[int]) -> ItemScores:
    """Per-text mean NLL per token, weighted by the text's tokens: "perplexity" (exp of the
    mean) or a cross-entropy ("ce", the mean itself)."""
    return ItemScores(metric, list(nll_per_token), list(tokens), "exp" if metric in ("perplexity", "ppl") else None)


def _compact(v: float) -> float | int:
    return int(v) if float(v).is_integer() else v


def write_items(path: Path, scores: dict[str, ItemScores]) -> None:
    """Every benchmark's items as JSON lines (atomic: a half-written file never exists)."""
    lines = []
    for name, s in scores.items():
        line: dict = {"benchmark": name, "metric": s.metric, "values": [_compact(v) for v in s.values]}
        if s.weights is not None:
            line["weights"] = [_compact(w) for w in s.weights]
        if s.transform is not None:
            line["transform"] = s.transform
        lines.append(json.dumps(line, separators=(",", ":")))
    with atomic_file(Path(path)) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_items(path: Path) -> dict[str, ItemScores]:
    """What :func:`write_items` wrote, benchmark order and item order kept."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out[d["benchmark"]] = ItemScores(d["metric"], d["values"], d.get("weights"), d.get("transform"))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CordaError(f"{path}:{n} is not an items line ({exc}); rerun the run to write it again.") from None
    return out
