"""PNG plots (matplotlib, headless; imported inside the functions that draw, so importing this
module costs nothing)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corda_vl.plan import Plan


@dataclass(frozen=True)
class Point:
    """One run in the task-gain / retention plane (what the retention plot draws)."""

    label: str
    gain: float
    retention: float
    scale: float | None = None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    return plt


def plot_ranks(plan: "Plan", path: str | os.PathLike) -> None:
    """Rank per adapted layer in model order, one colour per group."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, len(plan.rows) * 0.04 + 3), 3.2))
    groups = list(dict.fromkeys(row.group for row in plan.rows))
    colours = plt.get_cmap("tab10")
    for g, group in enumerate(groups):
        xs = [i for i, row in enumerate(plan.rows) if row.group == group]
        ax.bar(xs, [plan.rows[i].rank for i in xs], width=1.0, color=colours(g % 10), label=group)
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel("rank")
    title = f"{plan.method} {plan.mode.upper()}: {plan.trainable:,} trainable parameters"
    if plan.budget is not None:
        title += f" (budget {plan.budget:,})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass
class RetentionPlot:
    """What :func:`plot_retention` drew, read back from the figure (so callers and tests can check it)."""

    points: list[tuple[str, float, float]] = field(default_factory=list)
    """(label, gain, retention) of every run drawn as a single point."""
    curves: dict[str, list[tuple[float, float, float]]] = field(default_factory=dict)
    """{label: [(scale, gain, retention), ...]} of every adapter-scale sweep drawn as a line."""
    skipped: list[str] = field(default_factory=list)
    """Labels of runs left out because their gain or retention is undefined (NaN)."""


def plot_retention(points: list[Point], path: str | os.PathLike, title: str = "",
                   xlabel: str = "task gain", ylabel: str = "mean relative retention") -> RetentionPlot:
    """Task gain (x) against retention (y): one labelled point per run, one line per scale sweep.

    Up and right is better: the plot shows at a glance which method learns the task while
    forgetting least, and (sweeps) how much task gain each bit of forgetting buys.
    """
    plt = _pyplot()
    drawn = RetentionPlot()
    def defined(p: Point) -> bool:
        return math.isfinite(p.gain) and math.isfinite(p.retention)

    finite = [p for p in points if defined(p)]
    drawn.skipped = [p.label if p.scale is None else f"{p.label} @ {p.scale:g}" for p in points if not defined(p)]
    labels = list(dict.fromkeys(p.label for p in finite))
    colours = plt.get_cmap("tab10")
    colour = {label: colours(i % 10) for i, label in enumerate(labels)}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.axhline(1.0, color="0.7", lw=0.8, ls="--")
    ax.axvline(0.0, color="0.7", lw=0.8, ls="--")
    sweeps: dict[str, list[Point]] = {}
    stacked: dict[tuple[float, float], int] = {}  # runs at the same spot get their labels stacked
    for p in finite:
        if p.scale is None:
            k = stacked[(p.gain, p.retention)] = stacked.get((p.gain, p.retention), -1) + 1
            ax.scatter([p.gain], [p.retention], color=colour[p.label], s=36, zorder=3)
            ax.annotate(p.label, (p.gain, p.retention), xytext=(4, 4 + 10 * k), textcoords="offset points",
                        fontsize=8, color=colour[p.label])
        else:
            sweeps.setdefault(p.label, []).append(p)
    for label, sweep in sweeps.items():
        sweep.sort(key=lambda p: p.scale)
        (line,) = ax.plot([p.gain for p in sweep], [p.retention for p in sweep], "-o", ms=3,
                          color=colour[label], label=f"{label} (scale sweep)")
        for p in sweep:
            ax.annotate(f"{p.scale:g}", (p.gain, p.retention), xytext=(3, -9), textcoords="offset points",
                        fontsize=7, color=colour[label])
        xs, ys = line.get_data()
        drawn.curves[label] = [(p.scale, float(x), float(y)) for p, x, y in zip(sweep, xs, ys)]
    singles = [p for p in finite if p.scale is None]
    for p, collection in zip(singles, ax.collections):  # one scatter collection per single point, in order
        x, y = collection.get_offsets()[0]
        drawn.points.append((p.label, float(x), float(y)))
    if sweeps:
        ax.legend(fontsize=8)
    if drawn.skipped:
        ax.text(0.01, 0.01, "not plotted (undefined): " + ", ".join(drawn.skipped), transform=ax.transAxes,
                fontsize=7, color="0.4")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # explicit: atomic writers hand us a *.tmp path
    plt.close(fig)
    return drawn


def _method_arms(result: dict) -> dict[str, list[dict]]:
    """The arms of a study result grouped by method, in the order their frontier indices use."""
    out: dict[str, list[dict]] = {}
    for arm in result["arms"].values():
        out.setdefault(arm["method"], []).append(arm)
    return out


def _errorbar(ax, xs: list[dict], ys: list[dict], x_scale: float, **kwargs):
    x = [d["estimate"] * x_scale for d in xs]
    y = [d["estimate"] for d in ys]
    xerr = [[max(0.0, (d["estimate"] - d["low"]) * x_scale) for d in xs],
            [max(0.0, (d["high"] - d["estimate"]) * x_scale) for d in xs]]
    yerr = [[max(0.0, d["estimate"] - d["low"]) for d in ys], [max(0.0, d["high"] - d["estimate"]) for d in ys]]
    return ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", capsize=2, markersize=4, elinewidth=0.8, **kwargs)


def plot_frontiers(result: dict, path: str | os.PathLike, *, title: str) -> None:
    """Task score (x) against mean relative retention (y) for every arm of a study, with 95 %
    interval bars on both axes, and each method's Pareto frontier as a line: up and to the
    right is better, and a method whose line lies above another's keeps more at the same task
    score."""
    plt = _pyplot()
    task = result["task"]
    x_scale = 1.0 if result["metrics"][task] in ("perplexity", "ce") else 100.0
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    colours = plt.get_cmap("tab10")
    for i, (method, arms) in enumerate(_method_arms(result).items()):
        colour = colours(i % 10)
        _errorbar(ax, [a["scores"][task] for a in arms], [a["scores"]["retention"] for a in arms], x_scale,
                  color=colour, label=method, alpha=0.85)
        front = result["frontiers"][method]["frontier"]
        pts = result["frontiers"][method]["points"]
        ax.plot([pts[j][0] * x_scale for j in front], [pts[j][1] for j in front], "-", color=colour, linewidth=1.2)
    ax.axhline(1.0, color="grey", linewidth=0.6, linestyle=":")
    seeds = len(result["seeds"])
    ax.set_xlabel(f"task: {task} ({result['metrics'][task]}{', %' if x_scale == 100 else ''}), mean of {seeds} seeds")
    ax.set_ylabel("retention: mean of after / before\nover " + ", ".join(result["retention"]))
    ax.set_title(f"{title}\ntask against retention, one point per learning rate or adapter scale\n"
                 "(bars: 95 % intervals over seeds and items; lines: Pareto frontiers)", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def plot_update_size(result: dict, path: str | os.PathLike, *, title: str) -> None:
    """Retention (y, with its interval) against the relative update size ||ΔW||_F / ||W||_F (x) of
    every trained arm: how much of the forgetting the size of the update alone explains."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.get_cmap("tab10")
    for i, (method, arms) in enumerate(_method_arms(result).items()):
        arms = [a for a in arms if a["update_relative"] is not None and a["scale"] is None]
        if arms:
            ys = [a["scores"]["retention"] for a in arms]
            xs = [{"estimate": a["update_relative"], "low": a["update_relative"], "high": a["update_relative"]}
                  for a in arms]
            _errorbar(ax, xs, ys, 1.0, color=colours(i % 10), label=method)
    ax.set_xlabel("relative update size ‖ΔW‖_F / ‖W‖_F over the adapted layers (mean over seeds)")
    ax.set_ylabel("retention: mean of after / before")
    r = result.get("update_correlation")
    ax.set_title(f"{title}\nretention against update size (one point per arm, mean over seeds"
                 + (f"; r = {r:.2f})" if r is not None else ")"), fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
