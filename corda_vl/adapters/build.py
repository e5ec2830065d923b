"""PEFT wiring: turn CorDA factors (or a baseline init) into a stock ``peft.PeftModel``.

LoRA layers are PEFT's own; this module only computes what goes into ``lora_A``, ``lora_B`` and
the base weight (the residual ``W - s B A``), so the model's outputs are unchanged at init.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from torch import nn

from corda_vl.adapters.pages import prefault_for_writing
from corda_vl.adapters.record import BuildRecord, adapter_digest, register_record
from corda_vl.calibration.store import CovarianceStore
from corda_vl.config import CordaConfig
from corda_vl.decomposition.cosvd import subtract_adapter_
from corda_vl.errors import CordaError, TargetError
from corda_vl.families import detect_family
from corda_vl.families.base import Family
from corda_vl.methods import get_method
from corda_vl.methods.base import Factors, module_record
from corda_vl.scaleout.distributed import broadcast_parameters, is_distributed
from corda_vl.layers import is_conv1d, linear_weight
from corda_vl.targets import Target, config_targets


def _check_ranks(targets: list[Target], config: CordaConfig) -> None:
    for t in targets:
        r = config.rank_for(t.name, t.group)
        if r >= min(t.d_in, t.d_out):
            raise TargetError(
                f"module {t.name!r} ({t.d_out}x{t.d_in}) cannot take rank {r}: it must be below "
                f"min(d_in, d_out) = {min(t.d_in, t.d_out)}. Lower r or set a smaller rank for it in rank_pattern."
            )


def check_untied(model: nn.Module, targets: list[Target]) -> None:
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


def exact_key(module_name: str) -> str:
    """A rank_pattern / alpha_pattern key that matches ``module_name`` and nothing else.

    PEFT matches a key against the *end* of a module name (``(.*\\.)?(key)$``), so an escaped
    name alone also matches every module whose name ends with it: open_clip's text tower
    ``transformer.resblocks.0.attn.out_proj`` would take the rank meant for the vision tower's
    ``visual.transformer.resblocks.0.attn.out_proj`` too, and the saved adapter would not load.
    The key below only matches the whole name, or the whole name behind the ``base_model.model.``
    prefix that some PEFT code (EVA's initialisation) matches against."""
    return r"(?:^|(?<=^base_model\.model\.))" + re.escape(module_name)


def lora_config_for(targets: list[Target], config: CordaConfig, task_type: str | None,
                    infos: dict[str, dict[str, Any]] | None = None) -> LoraConfig:
    """The stock PEFT LoraConfig matching the per-module ranks/alphas corda_vl decomposes with
    (``infos``: per-module records with "rank" and "alpha"; default: the config's own ranks)."""
    alpha = config.alpha if config.alpha is not None else config.r
    infos = infos or {t.name: module_record(t, config) for t in targets}
    rank_pattern = {exact_key(n): i["rank"] for n, i in infos.items() if i["rank"] != config.r}
    alpha_pattern = {exact_key(n): i["alpha"] for n, i in infos.items() if i["alpha"] != alpha}
    init = get_method(config.method).lora_init(config)
    conv1d = [t.name for t in targets if is_conv1d(t.module)]
    if conv1d and len(conv1d) < len(targets):
        raise TargetError(f"{conv1d[0]!r} is a Conv1D layer (weight stored transposed) and other targets are "
                          f"nn.Linear: one PEFT adapter config cannot hold both (fan_in_fan_out). Adapt them in "
                          f"separate adapters, or narrow groups / target_modules to one kind.")
    return LoraConfig(
        fan_in_fan_out=bool(conv1d),
        r=config.r,
        lora_alpha=alpha,
        target_modules=[t.name for t in targets],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        lora_dropout=config.lora_dropout,
        init_lora_weights=init,
        task_type=task_type,
    )


@torch.no_grad()
def _write_factors(peft_model: PeftModel, factors: Factors, adapter: str) -> None:
    """Phase 2: lora_A/lora_B <- factors, base weight <- W - s B A (computed from the cast factors)."""
    base = peft_model.get_base_model()
    layers = {name: base.get_submodule(name) for name in factors}
    prefault_for_writing(layer.get_base_layer().weight for layer in layers.values())  # see pages.py
    for name, (A, B) in factors.items():
        layer = layers[name]
        lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        lora_A.copy_(A.to(lora_A.device, lora_A.dtype))
        lora_B.copy_(B.to(lora_B.device, lora_B.dtype))
        subtract_adapter_(linear_weight(layer.get_base_layer()), lora_A, lora_B, layer.scaling[adapter])


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
    for the same decisions as a dry run); the ranks go into the PEFT ``rank_pattern``. For every
    method except ``lora`` the base weights become the residual, so the model's outputs are
    unchanged at init. The methods are listed in ``corda_vl.methods``. ``model`` is modified in place, as
    with ``peft.get_peft_model``; it is left untouched if the decomposition fails.
    """
    config = config or CordaConfig()
    family = family or detect_family(model)
    method = get_method(config.method)
    targets = config_targets(model, family, config)
    check_targets(model, targets, config)
    source = None
    if method.needs_store:
        if store is None:
            raise CordaError(f"method={config.method!r} needs a CovarianceStore: run "
                             f"corda_vl.collect_covariances first.")
        store.check_model(model, modules=[t.name for t in targets])
        source = store.resolve_source(config.source)
    analysed = method.analyse(targets, store, config, source, progress)
    result = method.finish(analysed, targets, config)
    record = BuildRecord(family.name, config.to_dict(), source, result.modules, result.budget)
    return wrap_with_factors(model, targets, config, family, result.factors, record, adapter_name)


def check_targets(model: nn.Module, targets: list[Target], config: CordaConfig) -> None:
    """Refuse, before anything is computed, ranks a module cannot take and tied weights a
    method would rewrite."""
    method = get_method(config.method)
    if not method.allocates_ranks:  # corda++ caps each layer's rank itself (CordaConfig.rank_bounds)
        _check_ranks(targets, config)
    if method.rewrites_base:
        check_untied(model, targets)


def wrap_with_factors(model: nn.Module, targets: list[Target], config: CordaConfig, family: Family,
                      factors: Factors | None, record: BuildRecord,
                      adapter_name: str = "default") -> PeftModel:
    """Phase 2: PEFT LoRA layers on ``targets``, filled with ``factors`` (None: PEFT's own init)."""
    method = get_method(config.method)
    lora_config = lora_config_for(targets, config, family.task_type, record.modules)
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    if factors is not None:
        _write_factors(peft_model, factors, adapter_name)
    elif method.rewrites_base and is_distributed():  # PEFT decomposed on every rank: keep rank 0's
        broadcast_parameters([t.module.weight for t in targets] + [p for n, p in peft_model.named_parameters()
                                                                    if "lora_" in n])
    # The init has been applied; a saved adapter must load as plain LoRA weights on the residual.
    peft_model.peft_config[adapter_name].init_lora_weights = True
    record.init_digest = adapter_digest(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    register_record(peft_model, record)
    return peft_model


def decompose_targets(targets: list[Target], store: CovarianceStore | None, config: CordaConfig, source: str | None,
                      progress: bool) -> tuple[Factors | None, dict]:
    """Deprecated (goes in 0.3): ``get_method(config.method)``'s ``analyse`` then ``finish``."""
    import warnings

    warnings.warn("corda_vl.adapters.build.decompose_targets is deprecated: use "
                  "corda_vl.methods.get_method(config.method).analyse(...) and .finish(...).", DeprecationWarning,
                  stacklevel=2)
    method = get_method(config.method)
    result = method.finish(method.analyse(targets, store, config, source, progress), targets, config)
    return result.factors, result.modules
