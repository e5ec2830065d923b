"""Retention: what a fine-tuned model kept of what it could do before."""

from __future__ import annotations

from collections.abc import Mapping

from .metrics import relative_retention

Scores = Mapping[str, Mapping[str, float]]
"""benchmark -> metric -> value, e.g. {"capitals": {"exact_match": 0.41}, "wiki": {"perplexity": 9.3}}."""


def evaluate_retention(before: Scores, after: Scores) -> dict[str, dict[str, dict[str, float]]]:
    """Per benchmark and metric: before, after, delta (after - before) and relative retention
    (after / before; before / after for lower-is-better metrics such as perplexity).

    Only benchmarks and metrics present on both sides are compared; a benchmark missing from
    ``after`` is an error, since silently dropping it would hide forgetting.
    """
    missing = [name for name in before if name not in after]
    if missing:
        raise KeyError(f"benchmarks {missing} were evaluated before but not after; evaluate them again.")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, metrics in before.items():
        out[name] = {}
        for metric, b in metrics.items():
            if metric not in after[name]:
                continue
            a = float(after[name][metric])
            out[name][metric] = {"before": float(b), "after": a, "delta": a - float(b),
                                 "relative": relative_retention(metric, float(b), a)}
    return out


def mean_relative_retention(result: Mapping[str, Mapping[str, Mapping[str, float]]],
                            primary: Mapping[str, str] | None = None) -> float:
    """Mean relative retention over benchmarks, one metric each (``primary[benchmark]``, default
    the first metric listed)."""
    values = []
    for name, metrics in result.items():
        metric = (primary or {}).get(name) or next(iter(metrics), None)
        if metric is not None:
            values.append(metrics[metric]["relative"])
    return sum(values) / len(values) if values else float("nan")
