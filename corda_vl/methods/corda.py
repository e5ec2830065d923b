"""CorDA: the adapter from the covariance-oriented SVD ``W C' = U S V^T`` of each layer.

KPM (knowledge-preserved) takes the r smallest components, calibrated on what to keep; IPM
(instruction-previewed) takes the r largest, calibrated on the task. The maths is in
``corda_vl.decomposition.cosvd``; this file walks the targets and the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from corda_vl.decomposition.cosvd import balance_factors, corda_factors, identity_covariance
from corda_vl.errors import CordaError, DecompositionError
from corda_vl.methods.base import (Decomposition, Method, damped_input, factor_dtype, for_each_input,
                                   module_record, register_method)
from corda_vl.scaleout.distributed import share_results

if TYPE_CHECKING:
    from corda_vl.calibration.store import CovarianceStore
    from corda_vl.config import CordaConfig
    from corda_vl.families.base import Family
    from corda_vl.targets import Target


class Corda(Method):
    name = "corda"
    summary = "covariance-oriented SVD of W C' (needs a CovarianceStore); KPM keeps, IPM previews"
    needs_store = True

    def validate(self, config: CordaConfig) -> None:
        if config.svd == "lowrank" and "kpm" in {config.mode, *config.group_modes.values()}:
            raise CordaError("svd='lowrank' finds the largest components only; KPM needs the smallest. "
                             "Use svd='auto' or 'full' with mode='kpm'.")

    def covariance_label(self, family: Family, target: Target, store: CovarianceStore | None,
                         source: str | None, config: CordaConfig) -> str:
        if not self.needs_store:
            return "identity (data-free)"
        label = describe_covariance(family, target, store, source)
        return f"{config.mode_for(target.group)}: {label}" if config.group_modes else label

    def mode(self, config: CordaConfig, group: str) -> str:
        return config.mode_for(group)

    def analyse(self, targets: list[Target], store: CovarianceStore | None, config: CordaConfig,
                source: str | None, progress: bool) -> dict[str, Any]:
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        info: dict[str, dict[str, Any]] = {}

        def work(key: str, members: list[Target]) -> None:
            self._decompose_input(key, members, store, config, source, factors, info)

        if not self.needs_store:  # data-free variants decompose W against the identity
            store, source = None, None
        for_each_input(targets, store, work, desc=f"decomposing ({self.name})", progress=progress)
        factors, info = share_results(factors, info)
        return {name: (factors[name], info[name]) for name in info}

    def finish(self, analysed: dict[str, Any], targets: list[Target], config: CordaConfig) -> Decomposition:
        return Decomposition({t.name: analysed[t.name][0] for t in targets},
                             {t.name: analysed[t.name][1] for t in targets})

    def _decompose_input(self, key: str, members: list[Target], store: CovarianceStore | None, config: CordaConfig,
                         source: str | None, factors: dict, info: dict) -> None:
        """Factors of the modules reading one input (one damped covariance shared by them)."""
        device = members[0].module.weight.device
        if store is None:  # data-free: the plain SVD of W
            cov, tokens = identity_covariance(members[0].d_in, getattr(torch, config.decompose_dtype), device), 0
        else:
            cov, tokens = damped_input(store, key, source, config, device), store.count(key, source)
        for t in members:
            info[t.name] = module_record(t, config)
            r, s = info[t.name]["rank"], config.scaling_for(t.name, t.group)
            mode = self.mode(config, t.group)
            try:
                A, B, triplets = corda_factors(t.weight.detach(), cov, r, mode, s, config.svd,
                                               config.lowrank_niter, spectrum=False)  # only the share is recorded
            except (DecompositionError, torch.linalg.LinAlgError) as exc:
                raise DecompositionError(f"module {t.name!r}: {exc}") from exc
            A, B = balance_factors(A, B, config.factor_balance)
            keep = factor_dtype(t.module.weight)
            factors[t.name] = (A.to(keep), B.to(keep))
            info[t.name].update(input=key, mode=mode, damping=cov.damping, tokens=tokens,
                                svd=triplets.path, context_share=triplets.context_share)


def describe_covariance(family: Family, t: Target, store: CovarianceStore | None, source: str | None) -> str:
    """Which calibration data reaches a module (and, with a store, its input key and tokens)."""
    label = family.describe(t.name, t.group)
    if source is not None and store is not None and t.name in store.inputs:
        label += f" [{source}, input {store.inputs[t.name]}, {store.count(t.name, source)} tokens]"
    return label


CORDA = register_method(Corda())
