"""The dry run: what ``build_corda`` would adapt, with which rank and which covariance.

``plan`` is cheap (no forward pass, no decomposition). For ``corda++`` the ranks and covariances
are decided by the decomposition itself, so :func:`allocate_ranks` runs that analysis (the same
code ``build_corda`` runs) and returns the plan it leads to.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import nn

from corda_vl.adapters.build import check_untied
from corda_vl.config import CordaConfig
from corda_vl.deprecation import moved
from corda_vl.methods import get_method
from corda_vl.methods.corda import describe_covariance
from corda_vl.methods.cordapp import analyse_layers, ranks_under_budget
from corda_vl.calibration.store import CovarianceStore
from corda_vl.errors import CordaError
from corda_vl.families import detect_family
from corda_vl.families.base import Family
from corda_vl.targets import Target, config_targets


@dataclass(frozen=True)
class PlanRow:
    group: str
    module: str
    shape: tuple[int, int]
    """(d_out, d_in)"""
    rank: int
    alpha: float
    covariance: str
    """Which calibration data the module's covariance comes from (and, with a store, its key)."""
    trainable: int
    """Adapter parameters: rank * (d_in + d_out)."""
    source: str | None = None
    """The store source the covariance is taken from (corda++: the one selected)."""
    score: float | None = None
    """corda++: compactness of the layer at its allocated rank (see corda_vl.decomposition.compactness)."""


@dataclass
class Plan:
    method: str
    mode: str
    rows: list[PlanRow]
    budget: int | None = None
    """corda++: the trainable-parameter budget the ranks were allocated under."""
    notes: list[str] = field(default_factory=list)

    @property
    def modules(self) -> list[str]:
        return [row.module for row in self.rows]

    @property
    def trainable(self) -> int:
        return sum(row.trainable for row in self.rows)

    @property
    def ranks(self) -> dict[str, int]:
        return {row.module: row.rank for row in self.rows}

    @property
    def sources(self) -> dict[str, str | None]:
        return {row.module: row.source for row in self.rows}

    def group_totals(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "trainable": 0, "rank": 0})
        for row in self.rows:
            totals[row.group]["modules"] += 1
            totals[row.group]["trainable"] += row.trainable
            totals[row.group]["rank"] += row.rank
        return dict(totals)

    def to_dicts(self) -> list[dict]:
        return [asdict(row) for row in self.rows]

    def plot(self, path) -> None:
        """Deprecated (goes in 0.3): the rank plot is the lab's ``plot_ranks(plan, path)``."""
        moved("Plan.plot", "corda_vl.lab.plots.plot_ranks")(self, path)

    def __str__(self) -> str:
        mode = f" {self.mode.upper()}" if get_method(self.method).needs_store else ""
        lines = [f"{self.method}{mode}: {len(self.rows)} modules, {self.trainable:,} trainable parameters"]
        if self.budget is not None:
            lines[0] += f" (budget {self.budget:,}, realised {self.trainable / self.budget:.4f}x)"
        score = any(row.score is not None for row in self.rows)
        lines.append(f"{'group':<11}{'module':<52}{'shape':>11}{'rank':>6}{'params':>10}"
                     + (f"{'score':>9}" if score else "") + "  covariance")
        for row in self.rows:
            shape = f"{row.shape[0]}x{row.shape[1]}"
            cell = f"{row.score:>9.4f}" if score and row.score is not None else " " * (9 if score else 0)
            lines.append(f"{row.group:<11}{row.module:<52}{shape:>11}{row.rank:>6}{row.trainable:>10,}{cell}"
                         f"  {row.covariance}")
        for group, total in self.group_totals().items():
            label = f"{group} ({total['modules']} modules, mean rank {total['rank'] / total['modules']:.1f})"
            lines.append(f"{'total':<11}{label:<52}{'':>17}{total['trainable']:>10,}")
        return "\n".join(lines + self.notes)


def _row(t: Target, rank: int, alpha: float, covariance: str, source: str | None = None,
         score: float | None = None) -> PlanRow:
    return PlanRow(t.group, t.name, (t.d_out, t.d_in), rank, alpha, covariance, rank * (t.d_in + t.d_out),
                   source, score)


def plan(model: nn.Module, config: CordaConfig | None = None, store: CovarianceStore | None = None,
         *, family: Family | None = None) -> Plan:
    """List the modules ``build_corda(model, store, config)`` would adapt, with their ranks and
    covariance sources. Cheap: no forward pass, no decomposition; for ``corda++`` with a store it
    is :func:`allocate_ranks` (which decomposes)."""
    config = config or CordaConfig()
    family = family or detect_family(model)
    if config.method == "corda++" and store is not None:
        return allocate_ranks(model, store, config, family=family, progress=False)
    targets = config_targets(model, family, config)
    method = get_method(config.method)
    source = store.resolve_source(config.source) if store is not None and method.needs_store else None
    rows = [_row(t, config.rank_for(t.name, t.group), config.alpha_for(t.name, t.group),
                 method.covariance_label(family, t, store, source, config), source) for t in targets]
    return Plan(config.method, config.mode, rows)


def allocate_ranks(model: nn.Module, store: CovarianceStore, config: CordaConfig | None = None, *,
                   family: Family | None = None, progress: bool = True) -> Plan:
    """CorDA++ decisions without building anything: per layer, the covariance with the best
    compactness among the candidates and the rank the budget allocation gives it.

    Runs the same analysis as ``build_corda`` with ``method='corda++'`` (one CO-SVD per layer and
    candidate), so the plan equals what the build will do. ``model`` is not modified.
    """
    config = config or CordaConfig(method="corda++")
    if config.method != "corda++":
        raise CordaError(f"allocate_ranks is CorDA++'s allocation; got method={config.method!r}. "
                         f"Use CordaConfig(method='corda++', ...).")
    family = family or detect_family(model)
    targets = config_targets(model, family, config)
    store.check_model(model, modules=[t.name for t in targets])
    check_untied(model, targets)  # the build refuses tied weights; so does its dry run
    base = store.resolve_source(config.source)
    choices = analyse_layers(targets, store, config, base, keep_components=False, progress=progress)
    ranks, budget = ranks_under_budget(choices, config)
    rows = []
    for t in targets:
        c, r = choices[t.name], ranks[t.name]
        scores = ", ".join(f"{s} {v:.4f}" for s, v in c.scores.items()) if len(c.scores) > 1 else ""
        cov = f"{c.mode}: {describe_covariance(family, t, store, c.source)}" + (f" (of {scores})" if scores else "")
        rows.append(_row(t, r, config.scaling_for(t.name, t.group) * r, cov, c.source, c.rank_scores[r]))
    return Plan(config.method, config.mode, rows, budget["budget"])
