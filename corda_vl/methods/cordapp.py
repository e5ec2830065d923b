"""CorDA++: score each layer's candidate covariances, keep the most compact one, and allocate
ranks under one parameter budget. The maths is in ``corda_vl.decomposition.compactness``; this
file walks the targets and the store, and keeps what the build needs in dicts keyed by module name.

Cost: one CO-SVD per (layer, candidate), each computing every singular value (the metric needs
them) and keeping the ``rank_max`` components the allocation may hand out; the chosen ones become
the factors, so nothing is decomposed twice. The condition number of each damped covariance comes
from :func:`eigen_range` (Lanczos), not an eigendecomposition.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from corda_vl.decomposition.compactness import (RankRequest, component_energies, greedy_ranks, heldout_rank_scores,
                                                 log_condition, output_energy, paper_rank_scores, paper_selection,
                                                 rank_scores, select_best)
from corda_vl.decomposition.cosvd import (Components, balance_factors, co_svd, components, context_share,
                                          eigen_range, factors_from)
from corda_vl.deprecation import module_getattr
from corda_vl.errors import CordaError, DecompositionError
from corda_vl.methods.base import (Decomposition, Method, damped_input, factor_dtype, for_each_input,
                                   module_record, register_method)
from corda_vl.methods.corda import describe_covariance
from corda_vl.scaleout.distributed import gather_objects, is_distributed, share_results

if TYPE_CHECKING:
    from corda_vl.calibration.store import CovarianceStore
    from corda_vl.config import CordaConfig
    from corda_vl.families.base import Family
    from corda_vl.targets import Target


@dataclass
class LayerChoice:
    """What the analysis decided for one layer (before its rank is allocated)."""

    target: Target
    mode: str
    nominal: int
    low: int
    high: int
    source: str
    scores: dict[str, float] = field(default_factory=dict)
    """Compactness at the nominal rank, per candidate source (the chosen one is the highest)."""
    rank_scores: tuple[float, ...] = ()
    singular_values: torch.Tensor | None = None
    parts: Components | None = None
    """The ``high`` components the rank is sliced from (KPM: smallest, IPM: largest)."""
    details: dict[str, Any] = field(default_factory=dict)
    """damping, tokens, input key, svd path of the chosen covariance."""

    def request(self) -> RankRequest:
        t = self.target
        return RankRequest(t.name, self.mode, t.d_in + t.d_out, self.nominal, self.low, self.high, self.rank_scores)

    def components_for(self, r: int) -> Components:
        """The r components of the adapter: the last r kept (KPM tail) or the first r (IPM head)."""
        keep = slice(self.high - r, self.high) if self.mode == "kpm" else slice(0, r)
        return self.parts.take(keep)


def candidate_sources(store: CovarianceStore, module: str, base: str, wanted: list[str] | None) -> list[str]:
    """Sources ``module`` may choose from: ``base`` first, then its parts (or the ``wanted`` list)."""
    have = store.sources_for(module)
    if wanted is None:
        options = [base] + [s for s in have if s.startswith(base + "/")]
    else:
        options = list(wanted)
    options = [s for s in options if s in have]
    if not options:
        raise CordaError(f"module {module!r} has none of the candidate covariances {wanted or [base]}; "
                         f"the store has {have} for it.")
    return options


def analyse_layers(
    targets: list[Target], store: CovarianceStore, config: CordaConfig, base: str,
    keep_components: bool = True, progress: bool = True,
) -> dict[str, LayerChoice]:
    """Score every candidate covariance of every target and keep the best per layer (collective)."""
    choices: dict[str, LayerChoice] = {}
    for_each_input(targets, store, lambda key, members: _analyse_input(key, members, store, config, base,
                                                                       keep_components, choices),
                   desc="decomposing (corda++)", progress=progress)
    return _gather_choices(choices, targets)


def _gather_choices(local: dict[str, LayerChoice], targets: list[Target]) -> dict[str, LayerChoice]:
    """Collective: every rank's layer choices, in target order. Components stay with the rank that
    computed them (None elsewhere): only it slices the factors, which are then broadcast."""
    if not is_distributed():
        return local
    shipped = {name: replace(c, target=None, parts=None, singular_values=c.singular_values.cpu())
               for name, c in local.items()}
    merged: dict[str, LayerChoice] = {}
    for rank_choices in gather_objects(shipped):
        merged.update(rank_choices)
    return {t.name: local.get(t.name) or replace(merged[t.name], target=t) for t in targets if t.name in merged}


def heldout_split(store: CovarianceStore, key: str, config: CordaConfig) -> str | None:
    """The split every candidate is scored on and built without (compactness='heldout'), else None."""
    if config.compactness != "heldout":
        return None
    splits = store.splits_for(key)
    if config.heldout_split is not None:
        if config.heldout_split not in splits:
            raise CordaError(f"heldout_split={config.heldout_split!r} is not a split of {key!r}'s covariances "
                             f"(splits: {splits}).")
        return config.heldout_split
    if len(splits) < 2:
        raise CordaError(f"compactness='heldout' scores each candidate on a calibration split it did not see, and "
                         f"the store has {len(splits)} split(s) for {key!r}. Collect with "
                         f"collect_covariances(..., splits=2) or more (recipes: calib_splits: 2).")
    return splits[-1]


def _score(weight: torch.Tensor, triplets, cov, spectrum: tuple[float, float], choice: LayerChoice,
           config: CordaConfig, heldout: torch.Tensor | None) -> tuple[torch.Tensor, float, Components | None]:
    """(score at every rank, the candidate's selection score, its components if they were needed)."""
    s = triplets.singular_values
    nominal = min(choice.nominal, choice.high)
    if config.compactness == "bound":
        scores = rank_scores(s, spectrum, choice.mode)
        return scores, float(scores[nominal]), None
    if config.compactness == "paper":
        if config.compactness_spectrum == "weighted":
            low, mean, top = float(s.min()), float(s.mean()), float(s.max())
        else:
            low, mean, top = spectrum[0], float(cov.matrix.diagonal().mean()), spectrum[1]
        log_pi = log_condition(low, mean, top, weight.shape[0])
        return paper_rank_scores(s, log_pi, sum(weight.shape)), paper_selection(s, log_pi, nominal), None
    parts = components(triplets, cov)
    energies = component_energies(parts.S, parts.VhCinv, heldout)
    scores = heldout_rank_scores(energies, output_energy(weight, heldout), choice.mode, s.shape[0])
    return scores, float(scores[nominal]), parts


def _analyse_input(key: str, members: list[Target], store: CovarianceStore, config: CordaConfig, base: str,
                   keep_components: bool, choices: dict[str, LayerChoice]) -> None:
    """Score every candidate covariance of one input for the modules reading it."""
    device = members[0].module.weight.device
    held = heldout_split(store, key, config)
    heldout = None if held is None else store.covariance(key, base, split=held, held_out=True).to(device)
    seen: set[tuple[str, ...]] = set()
    for source in candidate_sources(store, key, base, config.candidates):
        if held is not None:
            try:  # the held-out split is left out of every candidate; one made of it alone drops out
                leaves = tuple(store.leaves(key, source, split=held))
            except CordaError:
                continue
            if leaves in seen:  # e.g. 'calib' without split1 is 'calib/split0': decompose it once
                continue
            seen.add(leaves)
        cov = damped_input(store, key, source, config, device, name=f"{key} [{source}]", without_split=held)
        spectrum = eigen_range(cov)
        for t in members:
            choice = choices.get(t.name) or _new_choice(t, config, source)
            choices[t.name] = choice
            weight = t.weight.detach()
            try:
                triplets = co_svd(weight, cov, choice.high, choice.mode, config.svd, config.lowrank_niter)
            except (DecompositionError, torch.linalg.LinAlgError) as exc:
                raise DecompositionError(f"module {t.name!r} [{source}]: {exc}") from exc
            scores, selection, parts = _score(weight, triplets, cov, spectrum, choice, config, heldout)
            choice.scores[source] = selection
            if select_best(choice.scores) == source:
                choice.source = source
                choice.rank_scores = tuple(scores.tolist())
                choice.singular_values = triplets.singular_values
                choice.parts = (parts or components(triplets, cov)) if keep_components else None
                choice.details = {"input": key, "damping": cov.damping, "tokens": store.count(key, source, held),
                                  "svd": triplets.path, "condition": spectrum[1] / spectrum[0],
                                  **({"heldout_split": held} if held else {})}
        del cov


def _check_bounds(choices: dict[str, LayerChoice], config: CordaConfig) -> None:
    """Warn about settings that would be silently ignored; keep dead layers at their floor."""
    groups = {c.target.group for c in choices.values()}
    for name in ("rank_min", "rank_max"):
        value = getattr(config, name)
        unknown = sorted(set(value) - groups) if isinstance(value, dict) else []
        if unknown:
            warnings.warn(f"{name} names groups {unknown} that have no adapted layer (groups: {sorted(groups)}).",
                          stacklevel=3)
    for name, c in choices.items():
        if float(c.singular_values.abs().max()) == 0 and c.high > c.low:
            warnings.warn(f"{name}: W C' = 0 (a zero weight or zero inputs), so its adapter factors are zero and "
                          f"cannot train; it keeps its floor rank {c.low}. Exclude it from the targets.", stacklevel=3)
            c.high = c.low


def _new_choice(t: Target, config: CordaConfig, source: str) -> LayerChoice:
    low, high = config.rank_bounds(t.name, t.group, min(t.d_in, t.d_out))
    return LayerChoice(t, config.mode_for(t.group), config.rank_for(t.name, t.group), low, high, source)


def nominal_budget(choices: dict[str, LayerChoice]) -> int:
    """Trainable parameters of the nominal ranks (uniform r, group_ranks, rank_pattern)."""
    return sum(c.nominal * (c.target.d_in + c.target.d_out) for c in choices.values())


def ranks_under_budget(choices: dict[str, LayerChoice], config: CordaConfig) -> tuple[dict[str, int], dict[str, int]]:
    """(rank per layer, {"budget": asked, "realised": sum r_l (d_in + d_out)}) by the greedy
    compactness allocation. Warns about settings that would be silently ignored first."""
    _check_bounds(choices, config)
    budget = config.budget if config.budget is not None else nominal_budget(choices)
    ranks = greedy_ranks([c.request() for c in choices.values()], budget, config.rank_step)
    realised = sum(r * (choices[n].target.d_in + choices[n].target.d_out) for n, r in ranks.items())
    if realised < budget:
        warnings.warn(f"the rank caps allow only {realised:,} of the {budget:,} trainable parameters asked for; "
                      f"raise rank_max to use the whole budget.", stacklevel=3)
    return ranks, {"budget": budget, "realised": realised}


class CordaPlusPlus(Method):
    name = "corda++"
    summary = ("CorDA with a covariance chosen per layer and ranks allocated per layer under one parameter "
               "budget, both by the compactness metric (needs a CovarianceStore)")
    needs_store = True
    allocates_ranks = True

    def validate(self, config: CordaConfig) -> None:
        if config.svd == "lowrank":
            raise CordaError("method='corda++' scores layers with every singular value, which svd='lowrank' "
                             "does not compute. Use svd='auto' or 'full'.")

    def covariance_label(self, family: Family, target: Target, store: CovarianceStore | None,
                         source: str | None, config: CordaConfig) -> str:
        label = f"chosen per layer at build (nominal rank): {describe_covariance(family, target, store, source)}"
        return f"{config.mode_for(target.group)}: {label}" if config.group_modes else label

    def analyse(self, targets: list[Target], store: CovarianceStore | None, config: CordaConfig,
                source: str | None, progress: bool) -> dict[str, Any]:
        return analyse_layers(targets, store, config, source, keep_components=True, progress=progress)

    def finish(self, analysed: dict[str, Any], targets: list[Target], config: CordaConfig) -> Decomposition:
        """Allocate ranks over every analysed layer, then slice each layer's kept components."""
        choices: dict[str, LayerChoice] = {t.name: analysed[t.name] for t in targets}
        ranks, budget = ranks_under_budget(choices, config)
        factors, info = {}, {}
        for name, choice in choices.items():
            if choice.parts is None:  # another process analysed this layer and sends its factors
                continue
            t, r = choice.target, ranks[name]
            scaling = config.scaling_for(name, t.group)  # alpha / r kept constant: alpha_l = s * r_l
            parts = choice.components_for(r)
            A, B = balance_factors(*factors_from(parts, scaling), config.factor_balance)
            keep = factor_dtype(t.module.weight)
            factors[name] = (A.to(keep), B.to(keep))
            info[name] = {**module_record(t, config), "rank": r, "alpha": scaling * r, "nominal_rank": choice.nominal,
                          "mode": choice.mode, "source": choice.source, "candidates": choice.scores,
                          "compactness": choice.rank_scores[r],
                          "context_share": context_share(parts.S, choice.singular_values), **choice.details}
        factors, info = share_results(factors, info)
        return Decomposition(factors, {name: info[name] for name in choices}, budget)


CORDA_PLUS_PLUS = register_method(CordaPlusPlus())


__getattr__ = module_getattr(__name__, {"allocate_layers": f"{__name__}.ranks_under_budget"})  # the 0.1 name
