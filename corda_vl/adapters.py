"""PEFT wiring: turn CorDA factors (or a baseline init) into a stock ``peft.PeftModel``.

LoRA layers are PEFT's own; this module only computes what goes into ``lora_A``, ``lora_B`` and
the base weight (the residual ``W - s B A``), so the model's outputs are unchanged at init.

Build records (method, source, damping per module...) are kept in a weak dictionary keyed by the
PeftModel, never as attributes on the user's modules; :func:`build_record` reads them and
``save_corda`` writes them next to the adapter.
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .allocation import allocate_layers, analyse_layers
from .config import DECOMPOSING, CordaConfig
from .covariance import CovarianceStore
from .decompose import (balance_factors, context_share, corda_factors, factors_from,
                        identity_covariance, subtract_adapter_)
from .distributed import broadcast_parameters, is_distributed, run_owned, share_results
from .errors import CordaError, DecompositionError, TargetError
from .families import detect_family
from .families.base import Family
from .pages import prefault_for_writing
from .targets import Target, resolve_targets

_RECORDS: "weakref.WeakKeyDictionary[nn.Module, BuildRecord]" = weakref.WeakKeyDictionary()


@dataclass
class BuildRecord:
    """What build_corda did, per module: written to ``corda_vl.json`` by save_corda."""

    family: str
    config: dict[str, Any]
    source: str | None = None
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: dict[str, int] | None = None
    """corda++: {"budget": asked, "realised": sum r_l (d_in + d_out)}."""
    calibration: dict[str, Any] | None = None
    """build_corda_sequential: blocks, peak covariance bytes, cache bytes."""

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "config": self.config, "source": self.source, "modules": self.modules,
                "budget": self.budget, "calibration": self.calibration}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildRecord":
        return cls(data["family"], data["config"], data.get("source"), data.get("modules", {}), data.get("budget"),
                   data.get("calibration"))


def build_record(peft_model: nn.Module) -> BuildRecord | None:
    """The record of how ``peft_model`` was built (None for models corda_vl did not build/load)."""
    return _RECORDS.get(peft_model)


def _register(peft_model: nn.Module, record: BuildRecord) -> None:
    _RECORDS[peft_model] = record


def _check_ranks(targets: list[Target], config: CordaConfig) -> None:
    for t in targets:
        r = config.rank_for(t.name, t.group)
        if r >= min(t.d_in, t.d_out):
            raise TargetError(
                f"module {t.name!r} ({t.d_out}x{t.d_in}) cannot take rank {r}: it must be below "
                f"min(d_in, d_out) = {min(t.d_in, t.d_out)}. Lower r or set a smaller rank for it in rank_pattern."
            )


def _check_untied(model: nn.Module, targets: list[Target]) -> None:
    owners: dict[int, list[str]] = defaultdict(list)
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr():  # meta / offloaded parameters have no storage to share
            owners[param.data_ptr()].append(name)
    for t in targets:
        names = owners.get(t.module.weight.data_ptr(), [])
        if len(names) > 1:
            raise TargetError(
                f"module {t.name!r} shares its weight with {[n for n in names if not n.startswith(t.name)]} "
                f"(tied weights). CorDA/PiSSA rewrite the base weight, which would change the tied "
                f"module too. Exclude it, or untie it first (clone the weight)."
            )


def _module_info(t: Target, config: CordaConfig) -> dict[str, Any]:
    """What every method records per module; decomposing methods add their own fields."""
    return {"group": t.group, "rank": config.rank_for(t.name, t.group),
            "alpha": config.alpha_for(t.name, t.group), "shape": [t.d_out, t.d_in]}


def lora_config_for(targets: list[Target], config: CordaConfig, task_type: str | None,
                    infos: dict[str, dict[str, Any]] | None = None) -> LoraConfig:
    """The stock PEFT LoraConfig matching the per-module ranks/alphas corda_vl decomposes with
    (``infos``: per-module records with "rank" and "alpha"; default: the config's own ranks)."""
    alpha = config.alpha if config.alpha is not None else config.r
    infos = infos or {t.name: _module_info(t, config) for t in targets}
    rank_pattern = {re.escape(n): i["rank"] for n, i in infos.items() if i["rank"] != config.r}
    alpha_pattern = {re.escape(n): i["alpha"] for n, i in infos.items() if i["alpha"] != alpha}
    init: Any = True
    if config.method == "pissa":
        init = "pissa" if config.pissa_niter is None else f"pissa_niter_{config.pissa_niter}"
    return LoraConfig(
        r=config.r,
        lora_alpha=alpha,
        target_modules=[t.name for t in targets],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=config.lora_dropout,
        init_lora_weights=init,
        task_type=task_type,
    )


def decompose_targets(
    targets: list[Target], store: CovarianceStore | None, config: CordaConfig, source: str | None, progress: bool
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Phase 1: factors for every target, before the model is touched (nothing half-written).
    Under torch.distributed each rank decomposes its share of the inputs and receives the rest."""
    by_input: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        by_input[store.input_key(t.name) if store is not None else t.name].append(t)
    factors, info = {}, {}
    run_owned(by_input, lambda key, members: _decompose_input(key, members, store, config, source, factors, info),
              desc=f"decomposing ({config.method})", progress=progress, kind=DecompositionError)
    return share_results(factors, info)


def _decompose_input(key: str, members: list[Target], store: CovarianceStore | None, config: CordaConfig,
                     source: str | None, factors: dict, info: dict) -> None:
    """CO-SVD factors of the modules reading one input (one damped covariance shared by them)."""
    dtype = getattr(torch, config.decompose_dtype)
    device = members[0].module.weight.device
    if store is None:  # milora: plain SVD of W
        cov, tokens = identity_covariance(members[0].d_in, dtype, device), 0
    else:
        cov = store.damped(key, source, config.damping, config.covariance_normalization == "mean_diag", dtype, device)
        tokens = store.count(key, source)
    for t in members:
        info[t.name] = _module_info(t, config)
        r, s = info[t.name]["rank"], config.scaling_for(t.name, t.group)
        mode = config.mode_for(t.group) if config.method == "corda" else "kpm"
        try:
            A, B, triplets = corda_factors(t.module.weight.detach(), cov, r, mode, s, config.svd, config.lowrank_niter,
                                           spectrum=False)  # only the context share is recorded
        except (DecompositionError, torch.linalg.LinAlgError) as exc:
            raise DecompositionError(f"module {t.name!r}: {exc}") from exc
        A, B = balance_factors(A, B, config.factor_balance)
        keep = torch.float64 if t.module.weight.dtype == torch.float64 else torch.float32
        factors[t.name] = (A.to(keep), B.to(keep))
        info[t.name].update(input=key, mode=mode, damping=cov.damping, tokens=tokens,
                            svd=triplets.path, context_share=triplets.context_share)


def _decompose_allocated(
    targets: list[Target], store: CovarianceStore, config: CordaConfig, source: str, progress: bool
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, Any]], dict[str, int]]:
    """corda++ phase 1: choose a covariance per layer, allocate ranks, slice the kept components."""
    choices = analyse_layers(targets, store, config, source, keep_components=True, progress=progress)
    ranks, budget = allocate_layers(choices, config)
    factors, info = {}, {}
    for name, choice in choices.items():
        if choice.parts is None:  # another rank analysed this layer and sends its factors
            continue
        t, r = choice.target, ranks[name]
        scaling = config.scaling_for(name, t.group)  # alpha / r kept constant: alpha_l = s * r_l
        parts = choice.components_for(r)
        A, B = balance_factors(*factors_from(parts, scaling), config.factor_balance)
        keep = torch.float64 if t.module.weight.dtype == torch.float64 else torch.float32
        factors[name] = (A.to(keep), B.to(keep))
        info[name] = {**_module_info(t, config), "rank": r, "alpha": scaling * r, "nominal_rank": choice.nominal,
                      "mode": choice.mode, "source": choice.source, "candidates": choice.scores,
                      "compactness": choice.rank_scores[r],
                      "context_share": context_share(parts.S, choice.singular_values), **choice.details}
    factors, info = share_results(factors, info)
    return factors, {name: info[name] for name in choices}, budget


@torch.no_grad()
def _write_factors(peft_model: PeftModel, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], adapter: str) -> None:
    """Phase 2: lora_A/lora_B <- factors, base weight <- W - s B A (computed from the cast factors)."""
    base = peft_model.get_base_model()
    layers = {name: base.get_submodule(name) for name in factors}
    prefault_for_writing(layer.get_base_layer().weight for layer in layers.values())  # see pages.py
    for name, (A, B) in factors.items():
        layer = layers[name]
        lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        lora_A.copy_(A.to(lora_A.device, lora_A.dtype))
        lora_B.copy_(B.to(lora_B.device, lora_B.dtype))
        subtract_adapter_(layer.get_base_layer().weight, lora_A, lora_B, layer.scaling[adapter])


def build_corda(
    model: nn.Module,
    store: CovarianceStore | None = None,
    config: CordaConfig | None = None,
    *,
    adapter_name: str = "default",
    family: Family | None = None,
    progress: bool = True,
) -> PeftModel:
    """Wrap ``model`` in a PEFT LoRA model initialised by ``config.method``.

    ``corda`` and ``corda++`` need ``store`` (from :func:`collect_covariances` on this model);
    ``lora``, ``pissa`` and ``milora`` ignore it. ``corda++`` also chooses each layer's covariance
    among ``config.candidates`` and its rank under ``config.budget`` (see :func:`allocate_ranks`
    for the same decisions as a dry run); the ranks go into the PEFT ``rank_pattern``. For every method except ``lora`` the base weights become the
    residual, so the model's outputs are unchanged at init. ``model`` is modified in place, as
    with ``peft.get_peft_model``; it is left untouched if the decomposition fails.
    """
    config = config or CordaConfig()
    family = family or detect_family(model)
    targets = resolve_targets(model, family, config.groups, config.target_modules, config.exclude_modules)
    if config.method != "corda++":  # corda++ caps each layer's rank itself (CordaConfig.rank_bounds)
        _check_ranks(targets, config)
    record = BuildRecord(family.name, config.to_dict())
    factors = None
    if config.method != "lora":
        _check_untied(model, targets)
    if config.method in DECOMPOSING:
        if store is None:
            raise CordaError(f"method={config.method!r} needs a CovarianceStore: run "
                             f"corda_vl.collect_covariances first.")
        store.check_model(model, modules=[t.name for t in targets])
        record.source = store.resolve_source(config.source)
    if config.method == "corda":
        factors, record.modules = decompose_targets(targets, store, config, record.source, progress)
    elif config.method == "corda++":
        factors, record.modules, record.budget = _decompose_allocated(targets, store, config, record.source, progress)
    elif config.method == "milora":
        factors, record.modules = decompose_targets(targets, None, config, None, progress)
    else:
        record.modules = {t.name: _module_info(t, config) for t in targets}
    return wrap_with_factors(model, targets, config, family, factors, record, adapter_name)


def wrap_with_factors(model: nn.Module, targets: list[Target], config: CordaConfig, family: Family,
                      factors: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, record: BuildRecord,
                      adapter_name: str = "default") -> PeftModel:
    """Phase 2: PEFT LoRA layers on ``targets``, filled with ``factors`` (None: PEFT's own init)."""
    lora_config = lora_config_for(targets, config, family.task_type, record.modules)
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    if factors is not None:
        _write_factors(peft_model, factors, adapter_name)
    elif config.method == "pissa" and is_distributed():  # PEFT decomposed on every rank: keep rank 0's
        broadcast_parameters([t.module.weight for t in targets] + [p for n, p in peft_model.named_parameters()
                                                                    if "lora_" in n])
    # The init has been applied; a saved adapter must load as plain LoRA weights on the residual.
    peft_model.peft_config[adapter_name].init_lora_weights = True
    _register(peft_model, record)
    return peft_model
