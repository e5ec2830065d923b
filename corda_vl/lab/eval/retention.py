"""Retention: what a fine-tuned model kept of what it could do before."""

from __future__ import annotations

from collections.abc import Mapping

from corda_vl.lab.eval.metrics import average_retention, relative_retention

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
    chosen = ((primary or {}).get(name) or next(iter(metrics), None) for name, metrics in result.items())
    return average_retention(metrics[m]["relative"] for metrics, m in zip(result.values(), chosen) if m is not None)
