"""Metric functions (pure): answer normalisation and exact match as in lm-eval's nq_open /
triviaqa, top-k accuracy and mean per-class recall as in CLIP_benchmark, perplexity, relative
retention, and ZSCL's transfer / avg / last over a sequence of tasks."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Iterable, Sequence

import torch

LOWER_IS_BETTER = frozenset({"perplexity", "ppl", "loss", "nll", "ce"})
"""Metric names (case-insensitive) where smaller is better; every other metric is higher-is-better."""


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better: its name, or its last word, is in LOWER_IS_BETTER
    (so "eval_loss" and "text/perplexity" count)."""
    name = metric.lower()
    last = name.replace("-", "_").replace("/", "_").rsplit("_", 1)[-1]
    return name in LOWER_IS_BETTER or last in LOWER_IS_BETTER


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and English articles, collapse whitespace (SQuAD / lm-eval)."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: str | Iterable[str]) -> bool:
    """True when the normalised prediction equals one of the normalised acceptable answers."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(a) for a in answers)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Share of rows whose label is among the k highest logits (ties broken by torch.topk)."""
    if logits.shape[0] == 0:
        return float("nan")
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean())


def mean_per_class_recall(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` of the share of their rows predicted right."""
    recalls = [float((predictions[labels == c] == c).float().mean()) for c in labels.unique()]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(total_nll / tokens) if tokens else float("nan")


def relative_retention(metric: str, before: float, after: float) -> float:
    """How much of ``before`` is kept: after / before, or before / after for lower-is-better
    metrics (1.0 = nothing lost, < 1 = forgetting, > 1 = improved). Ratios assume non-negative
    metrics: NaN when a value is not finite or the denominator is not positive (equal values: 1)."""
    num, den = (before, after) if lower_is_better(metric) else (after, before)
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    if num == den:
        return 1.0
    if den <= 0 or num < 0:
        return math.nan
    return num / den


def average_retention(ratios: Iterable[float]) -> float:
    """The one retention average of the lab: the mean of the defined (finite) relative
    retentions, NaN when none is defined (an undefined ratio says nothing about forgetting)."""
    values = [float(v) for v in ratios if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def zscl_metrics(matrix: Sequence[Sequence[float]]) -> dict[str, float]:
    """ZSCL's summary of continual learning over T tasks (Zheng et al., 2023).

    ``matrix[i][j]``: the score on task j after learning tasks 0..i (T x T).
    * transfer: for each task j >= 1, the mean of its scores *before* it was learned
      (rows i < j: zero-shot transfer from earlier tasks), averaged over those tasks;
    * avg: the mean of every entry (every task, after every step);
    * last: the mean over tasks after the final step.
    """
    a = [list(map(float, row)) for row in matrix]
    t = len(a)
    if t == 0 or any(len(row) != t for row in a):
        raise ValueError(f"zscl_metrics needs a square T x T matrix; got {[len(r) for r in a]} rows.")
    transfer = [sum(a[i][j] for i in range(j)) / j for j in range(1, t)]
    return {
        "transfer": sum(transfer) / len(transfer) if transfer else float("nan"),
        "avg": sum(map(sum, a)) / (t * t),
        "last": sum(a[-1]) / t,
    }
