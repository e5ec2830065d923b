"""Statistics of the retention study: means over seeds with bootstrap intervals, paired
differences, Pareto frontiers of task score against retention.

Every score is a matrix ``values[seed, item]`` (optionally ``weights[seed, item]``, e.g. tokens
per text for a perplexity): the same evaluation items for every seed and method, so two methods
can be compared item by item. A bootstrap replicate (:class:`Resample`) draws seeds with
replacement and items with replacement; using **the same** replicate for two methods gives the
interval of their difference directly, which is much narrower than two separate intervals
because most of the item-to-item variation cancels.

Pure functions of numpy arrays; nothing here reads files or models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from corda_vl.errors import CordaError

Point = tuple[float, float]
"""(task score, retention) of one configuration."""


@dataclass
class Interval:
    """A point estimate with a 95 % interval; low/high are NaN when no interval exists (one seed
    and one item, or too few finite replicates)."""

    estimate: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    @property
    def excludes_zero(self) -> bool:
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)


@dataclass
class Resample:
    """One bootstrap replicate: row indices (seeds) and column indices (items), with repeats."""

    seeds: np.ndarray
    items: np.ndarray


def _as_matrix(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise CordaError(f"{name} must be a [seeds, items] matrix with at least one item, got shape {a.shape}.")
    return a


def aggregate(values, weights=None, transform: str | None = None, resample: Resample | None = None) -> float:
    """Mean over seeds of each seed's score; a seed's score is the (weighted) mean over items,
    then ``transform`` ("exp": perplexity from per-token NLL). With ``resample``, seeds and items
    are those of the replicate."""
    v = _as_matrix(values, "values")
    w = None if weights is None else _as_matrix(weights, "weights")
    if w is not None and w.shape != v.shape:
        raise CordaError(f"weights shape {w.shape} does not match values shape {v.shape}.")
    if resample is not None:
        v = v[np.ix_(resample.seeds, resample.items)]
        w = None if w is None else w[np.ix_(resample.seeds, resample.items)]
    if w is None:
        per_seed = v.mean(axis=1)
    else:
        total = w.sum(axis=1)
        per_seed = np.divide((v * w).sum(axis=1), total, out=np.full(len(v), np.nan), where=total > 0)
    if transform == "exp":
        per_seed = np.exp(per_seed)
    elif transform is not None:
        raise CordaError(f"unknown transform {transform!r}: use None or 'exp'.")
    return float(per_seed.mean())


def replicates(n_seeds: int, n_items: int, n_boot: int = 1000, seed: int = 0) -> list[Resample]:
    """``n_boot`` replicates over seeds and items. With one seed only items are drawn: the
    interval then covers item sampling alone, and the report says it is one seed."""
    if n_seeds < 1 or n_items < 1:
        raise CordaError(f"need at least one seed and one item, got {n_seeds} seeds and {n_items} items.")
    rng = np.random.default_rng(seed)
    return [Resample(rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int),
                     rng.integers(0, n_items, n_items)) for _ in range(n_boot)]


def percentile_interval(estimate: float, samples: Sequence[float], level: float = 0.95) -> Interval:
    """Percentile interval of the finite bootstrap ``samples``; NaN bounds when fewer than half
    of them are finite (the statistic is undefined too often to trust its spread)."""
    s = np.asarray(samples, dtype=float)
    finite = s[np.isfinite(s)]
    if len(finite) == 0 or len(finite) < len(s) / 2:
        return Interval(float(estimate), math.nan, math.nan)
    tail = 100 * (1 - level) / 2
    return Interval(float(estimate), float(np.percentile(finite, tail)), float(np.percentile(finite, 100 - tail)))


def bootstrap(statistic: Callable[[Resample | None], float], reps: Sequence[Resample]) -> Interval:
    """``statistic(None)`` on the data as it is, with the percentile interval over ``reps``."""
    return percentile_interval(statistic(None), [statistic(r) for r in reps])


def mean_interval(values, weights=None, transform: str | None = None, *, n_boot: int = 1000,
                  seed: int = 0) -> Interval:
    """Mean over seeds with its 95 % interval from a bootstrap over seeds and items."""
    v = _as_matrix(values, "values")
    reps = replicates(*v.shape, n_boot=n_boot, seed=seed)
    return bootstrap(lambda r: aggregate(v, weights, transform, r), reps)


def paired_difference(a, b, weights_a=None, weights_b=None, transform: str | None = None, *,
                      n_boot: int = 1000, seed: int = 0) -> Interval:
    """Score of ``a`` minus score of ``b`` with a 95 % interval, both scored on the same replicate
    (same seeds, same items) each time. ``a`` and ``b`` must hold the same seeds and items."""
    va, vb = _as_matrix(a, "a"), _as_matrix(b, "b")
    if va.shape != vb.shape:
        raise CordaError(f"a paired difference needs the same seeds and items: shapes {va.shape} and {vb.shape}.")
    reps = replicates(*va.shape, n_boot=n_boot, seed=seed)
    return bootstrap(lambda r: aggregate(va, weights_a, transform, r) - aggregate(vb, weights_b, transform, r), reps)


def format_interval(iv: Interval, scale: float = 100.0, digits: int = 1) -> str:
    """"52.3 [49.1, 55.4]" (values times ``scale``); "52.3 [no interval]" where none exists."""
    est = f"{iv.estimate * scale:.{digits}f}"
    if not (math.isfinite(iv.low) and math.isfinite(iv.high)):
        return f"{est} [no interval]"
    return f"{est} [{iv.low * scale:.{digits}f}, {iv.high * scale:.{digits}f}]"


def pareto_frontier(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point beats on both task score and retention (higher is
    better for both), sorted by task score. Points with a NaN coordinate are never on it."""
    points = [(float(x), float(y)) for x, y in points]
    ok = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    front = [i for i in ok if not any(
        points[j][0] >= points[i][0] and points[j][1] >= points[i][1] and points[j] != points[i] for j in ok)]
    unique = {tuple(points[i]): i for i in sorted(front, reverse=True)}  # ties: keep the first index
    return sorted(unique.values(), key=lambda i: points[i][0])


def interpolate_frontier(points: Sequence[Point], x: float) -> float:
    """Retention on the Pareto frontier at task score ``x``, linear between frontier points;
    NaN outside the task scores the frontier spans (nothing was measured there)."""
    front = [(float(points[i][0]), float(points[i][1])) for i in pareto_frontier(points)]
    if not front or not math.isfinite(x) or not front[0][0] <= x <= front[-1][0]:
        return math.nan
    xs, ys = zip(*front)
    return float(np.interp(x, xs, ys))


def matched_task_score(a: Sequence[Point], b: Sequence[Point]) -> float:
    """The highest task score both frontiers span (where retention is compared "at matched task
    score"); NaN when they do not overlap: one method's every point learns more than the other's
    best, and no measured point compares them at equal task score."""
    spans = []
    for pts in (a, b):
        front = pareto_frontier(pts)
        if not front:
            return math.nan
        spans.append((float(pts[front[0]][0]), float(pts[front[-1]][0])))
    low, high = max(s[0] for s in spans), min(s[1] for s in spans)
    return high if high >= low else math.nan
