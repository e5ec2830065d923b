"""The dry run: what ``build_corda`` would adapt, before anything is computed."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

from torch import nn

from .config import CordaConfig
from .covariance import CovarianceStore
from .families import detect_family
from .families.base import Family
from .targets import resolve_targets


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


@dataclass
class Plan:
    method: str
    mode: str
    rows: list[PlanRow]

    @property
    def modules(self) -> list[str]:
        return [row.module for row in self.rows]

    @property
    def trainable(self) -> int:
        return sum(row.trainable for row in self.rows)

    def group_totals(self) -> dict[str, dict[str, int]]:
        totals: dict[str, dict[str, int]] = defaultdict(lambda: {"modules": 0, "trainable": 0})
        for row in self.rows:
            totals[row.group]["modules"] += 1
            totals[row.group]["trainable"] += row.trainable
        return dict(totals)

    def to_dicts(self) -> list[dict]:
        return [asdict(row) for row in self.rows]

    def __str__(self) -> str:
        mode = f" {self.mode.upper()}" if self.method == "corda" else ""
        lines = [f"{self.method}{mode}: {len(self.rows)} modules, {self.trainable:,} trainable parameters",
                 f"{'group':<11}{'module':<52}{'shape':>11}{'rank':>6}{'params':>10}  covariance"]
        for row in self.rows:
            shape = f"{row.shape[0]}x{row.shape[1]}"
            lines.append(f"{row.group:<11}{row.module:<52}{shape:>11}{row.rank:>6}{row.trainable:>10,}  {row.covariance}")
        for group, total in self.group_totals().items():
            lines.append(f"{'total':<11}{group + ' (' + str(total['modules']) + ' modules)':<52}{'':>17}"
                         f"{total['trainable']:>10,}")
        return "\n".join(lines)


def plan(model: nn.Module, config: CordaConfig | None = None, store: CovarianceStore | None = None,
         *, family: Family | None = None) -> Plan:
    """List the modules ``build_corda(model, store, config)`` would adapt, with their ranks and
    covariance sources. Cheap: no forward pass, no decomposition."""
    config = config or CordaConfig()
    family = family or detect_family(model)
    targets = resolve_targets(model, family, config.groups, config.target_modules, config.exclude_modules)
    source = store.resolve_source(config.source) if store is not None and config.method == "corda" else None
    rows = []
    for t in targets:
        rank = config.rank_for(t.name, t.group)
        if config.method in ("lora", "pissa"):
            cov = "none (data-free)"
        elif config.method == "milora":
            cov = "identity (data-free)"
        else:
            cov = family.describe(t.name, t.group)
            if source is not None and t.name in store.inputs:
                cov += f" [{source}, input {store.inputs[t.name]}, {store.count(t.name, source)} tokens]"
        if config.method == "corda" and config.group_modes:
            cov = f"{config.mode_for(t.group)}: {cov}"
        rows.append(PlanRow(t.group, t.name, (t.d_out, t.d_in), rank, config.alpha_for(t.name, t.group), cov,
                            rank * (t.d_in + t.d_out)))
    return Plan(config.method, config.mode, rows)
