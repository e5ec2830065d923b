"""PNG plots (matplotlib, headless). Imported lazily: nothing else in the package needs it."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .plan import Plan


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
