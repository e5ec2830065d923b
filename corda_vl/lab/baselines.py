"""PEFT's own LoRA initialisations, run as baselines next to corda_vl's methods.

``peft-corda`` (PEFT's CorDA), ``eva`` (Explained Variance Adaptation) and ``mica`` (Minor
Component Adaptation) adapt exactly the modules, ranks and alphas of corda_vl's ``lora`` for the
same config, so a recipe that compares them measures the initialisation and nothing else. The
calibration batches reach the model through the model family's ``prepare``/``forward``, the way
corda_vl's own calibration feeds it, so LLaMA, CLIP and LLaVA batches all work.

On failure the model may already hold half-initialised LoRA layers (as with PEFT itself): load it
afresh before trying again.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from corda_vl.adapters.build import check_targets, check_untied, lora_config_for
from corda_vl.config import CordaConfig
from corda_vl.errors import CordaError
from corda_vl.families import detect_family
from corda_vl.families.base import Family, batch_to_device
from corda_vl.targets import Target, config_targets

BASELINES: tuple[str, ...] = ("peft-corda", "eva", "mica")
EVA_MAX_PASSES = 100
"""EVA cycles over the data until every layer's components settle; this bounds a run that never does."""


def _missing(method: str) -> str | None:
    """Why the installed PEFT cannot run ``method`` (None when it can), checked by feature, not version."""
    import peft
    from peft.tuners.lora.config import LoraConfig as Lora
    from peft.tuners.lora.layer import LoraLayer

    fields = Lora.__dataclass_fields__
    ok = {"peft-corda": importlib.util.find_spec("peft.tuners.lora.corda") is not None and "corda_config" in fields,
          "eva": hasattr(peft, "initialize_lora_eva_weights") and "eva_config" in fields,
          "mica": hasattr(LoraLayer, "mica_init")}[method]
    return None if ok else (f"the installed peft {peft.__version__} has no {method} LoRA initialisation; "
                            f"upgrade peft or leave {method!r} out of --methods.")


def available_baselines() -> tuple[str, ...]:
    """The baselines the installed PEFT supports (build_baseline says why for the others)."""
    return tuple(m for m in BASELINES if _missing(m) is None)


def is_baseline(method: str) -> bool:
    return method in BASELINES


def _rows(batch: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The batch one example at a time, padding cut off: PEFT's CorDA hook squeezes the batch
    dimension and counts every position it sees. The i-th entry of each tensor goes with row i
    (a CLIP batch may hold more images than texts: its rows then carry only an image)."""
    mask = batch.get("attention_mask")
    n = max((v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), default=0)
    for i in range(n):
        keep = mask[i].bool() if mask is not None and i < mask.shape[0] else None
        if keep is not None and not keep.any():
            continue
        row = {}
        for key, v in batch.items():
            if isinstance(v, torch.Tensor) and v.dim():
                if i >= v.shape[0]:
                    continue
                # token-aligned tensors (ids, mask, labels) share the mask's shape; images do not
                v = v[i:i + 1, keep] if keep is not None and v.shape == mask.shape else v[i:i + 1]
            row[key] = v
        yield row


def _probe_rows(model: nn.Module, family: Family, targets: list[Target], batches: list[dict[str, Any]]) -> None:
    """Run each batch's first example with our own hooks before PEFT hooks anything: a module that
    no batch reaches would make PEFT divide by a zero sample count, and one that reads a single
    vector per example (CLIP's projections) would give it a scalar instead of a covariance."""
    seen: dict[str, int] = {}

    def record(name: str, module: nn.Module, args: tuple) -> None:  # returning None leaves the input as is
        seen.setdefault(name, args[0].dim())

    hooks = [t.module.register_forward_pre_hook(functools.partial(record, t.name)) for t in targets]
    try:
        with torch.no_grad():
            for batch in batches:
                for row in _rows(batch):
                    family.forward(model, row)
                    break
    finally:
        for h in hooks:
            h.remove()
    unreached = [t.name for t in targets if t.name not in seen]
    if unreached:
        raise CordaError(f"no calibration batch reaches {unreached[:4]}{'...' if len(unreached) > 4 else ''}; "
                         f"peft-corda needs data for every adapted module (e.g. images for a vision tower).")
    pooled = [name for name, dim in seen.items() if dim < 3]
    if pooled:
        raise CordaError(f"{pooled} read one vector per example, not a token sequence: PEFT's CorDA cannot build "
                         f"their covariance. Leave their group out, or use corda_vl's corda.")


def _peft_corda(model: nn.Module, family: Family, targets: list[Target], lora_config: LoraConfig,
                batches: list[dict[str, Any]], mode: str, progress: bool) -> PeftModel:
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    if mode not in ("kpm", "ipm"):
        raise CordaError(f"peft-corda mode={mode!r}: PEFT's CorDA has the modes 'kpm' and 'ipm'.")
    check_untied(model, targets)  # PEFT's CorDA rewrites the base weights
    _probe_rows(model, family, targets, batches)

    def run_model() -> None:
        for batch in batches:
            for row in _rows(batch):
                family.forward(model, row)

    lora_config.init_lora_weights = "corda"
    lora_config.corda_config = PeftCordaConfig(corda_method=mode, verbose=progress)
    preprocess_corda(model, lora_config, run_model=run_model)
    return get_peft_model(model, lora_config)


def _eva_steps(batches: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """EVA's data items: the first holds batches of every kind (key set) seen, because EVA finds the
    layers that share an input from the first item alone and fails on a layer it did not reach
    (CLIP calibration may alternate image and text batches); then one batch per item."""
    kinds = {frozenset(b) for b in batches}
    first = next(i for i in range(1, len(batches) + 1) if {frozenset(b) for b in batches[:i]} == kinds)
    return [batches[:first]] + [[b] for b in batches[first:]]


def _eva(model: nn.Module, family: Family, targets: list[Target], config: CordaConfig, lora_config: LoraConfig,
         batches: list[dict[str, Any]], progress: bool) -> PeftModel:
    from peft import EvaConfig, get_eva_state_dict, initialize_lora_eva_weights

    lora_config.init_lora_weights = "eva"
    # rho=1: EVA must not move rank between layers (lora's ranks are the point of the comparison)
    lora_config.eva_config = EvaConfig(rho=1.0)
    peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=True)
    # EVA still shifts rank between layers that share an input (q/k/v) when their ranks differ:
    # let it find max-rank components everywhere, then keep each layer's top ones.
    ranks = {f"base_model.model.{t.name}": config.rank_for(t.name, t.group) for t in targets}
    uniform = copy.copy(lora_config)
    uniform.r, uniform.rank_pattern = max(ranks.values()), {}
    steps = _eva_steps(batches)
    routes: dict[str, dict[str, torch.Tensor | None]] = {}
    calls = 0

    def forward(m: nn.Module, step: list[dict[str, Any]]) -> None:
        nonlocal calls
        calls += 1
        if calls > EVA_MAX_PASSES * len(steps) + 1:
            raise CordaError(f"EVA's components did not settle in {EVA_MAX_PASSES} passes over the calibration "
                             f"data; give more (or more varied) batches, each with at least r tokens per module.")
        for batch in step:
            routes.clear()
            routes.update(family.route(model, batch))
            family.forward(m, batch)

    def layer_rows(layer_input: Any, _: Any, name: str) -> torch.Tensor:
        """The tokens the family routes to this module's group: padding out, as in corda_vl's calibration."""
        x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
        masks = list(routes.get(family.group_of(name.removeprefix("base_model.model.")) or "", {}).values())
        if not masks or any(mask is None for mask in masks):
            return x.reshape(-1, x.shape[-1])
        keep = torch.stack(masks).any(0)
        if keep.shape != x.shape[:-1]:
            raise CordaError(f"{name} reads {tuple(x.shape[:-1])} tokens but the batch's mask is {tuple(keep.shape)}; "
                             f"EVA cannot tell its padding apart.")
        return x[keep]

    components = get_eva_state_dict(peft_model, dataloader=steps, peft_config=uniform, forward_fn=forward,
                                    prepare_model_inputs_fn=lambda inputs, config: None,
                                    prepare_layer_inputs_fn=layer_rows, show_progress_bar=progress)
    initialize_lora_eva_weights(peft_model, eva_state_dict={k: v[:ranks[k]] for k, v in components.items()})
    return peft_model


def _check_same_adapters(peft_model: PeftModel, targets: list[Target], config: CordaConfig) -> None:
    """The promise of a baseline: lora's modules, ranks and scalings. EVA may drop or re-rank layers."""
    wrong = []
    for t in targets:
        layer, want = peft_model.get_base_model().get_submodule(t.name), config.rank_for(t.name, t.group)
        r, scaling = getattr(layer, "r", {}).get("default"), getattr(layer, "scaling", {}).get("default")
        if r != want or abs(scaling - config.scaling_for(t.name, t.group)) > 1e-9:
            wrong.append(f"{t.name} (rank {r}, want {want})")
    if wrong:
        raise CordaError(f"the baseline's adapters differ from lora's: {wrong[:4]}; this PEFT redistributed them.")


def build_baseline(model: nn.Module, method: str, config: CordaConfig, batches: Iterable[Any] | None = None, *,
                   mode: str = "kpm", progress: bool = True) -> PeftModel:
    """``model`` wrapped in PEFT LoRA initialised by PEFT's ``method`` (see ``BASELINES``).

    ``config`` is the recipe's lora config: its targets, ranks and alphas are used unchanged.
    ``batches`` (dicts of tensors, as for ``collect_covariances``) calibrate ``peft-corda`` (in
    ``mode`` "kpm" or "ipm") and ``eva``; ``mica`` is data-free. PEFT's CorDA and MiCA keep the
    model's outputs unchanged at init (residual base weight / A = 0), EVA too (B = 0).
    """
    if not is_baseline(method):
        raise CordaError(f"unknown baseline {method!r}; the PEFT baselines are {list(BASELINES)}.")
    reason = _missing(method)
    if reason:
        raise CordaError(reason)
    family = detect_family(model)
    targets = config_targets(model, family, config)
    check_targets(model, targets, config)
    lora_config = lora_config_for(targets, config, family.task_type)
    if method == "mica":
        lora_config.init_lora_weights = "mica"
        peft_model = get_peft_model(model, lora_config)
    else:
        device = next(model.parameters()).device
        prepared = [batch_to_device(family.prepare(model, b), device) for b in batches or ()]
        if not prepared:
            raise CordaError(f"{method} calibrates on data but got no batches: pass the recipe's calibration "
                             f"batches (dicts of tensors), or use the data-free 'mica'.")
        if method == "peft-corda":
            peft_model = _peft_corda(model, family, targets, lora_config, prepared, mode, progress)
        else:
            peft_model = _eva(model, family, targets, config, lora_config, prepared, progress)
        # The init has run: a saved adapter must reload as plain LoRA on the (residual) base
        # weight, not re-run a data-driven init that has no data at load time. MiCA keeps its
        # name: reloading re-runs only a cheap SVD, and its variant keeps lora_B frozen.
        saved = peft_model.peft_config["default"]
        saved.init_lora_weights, saved.corda_config, saved.eva_config = True, None, None
    _check_same_adapters(peft_model, targets, config)
    return peft_model
