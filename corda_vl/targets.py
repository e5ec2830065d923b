"""Which modules get adapters: family groups, narrowed by PEFT-syntax target/exclude patterns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
import torch
from torch import nn

from corda_vl.errors import TargetError
from corda_vl.families.base import Family
from corda_vl.layers import is_adaptable, linear_weight

if TYPE_CHECKING:
    from corda_vl.config import CordaConfig


@dataclass(frozen=True)
class Target:
    name: str
    module: nn.Module
    """An ``nn.Linear`` or a transformers ``Conv1D``."""
    group: str

    @property
    def weight(self) -> torch.Tensor:
        """(d_out, d_in), whichever way the layer stores it."""
        return linear_weight(self.module)

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]


def _matches_peft(names: list[str], target_modules, exclude_modules) -> list[str]:
    if target_modules is None and exclude_modules is None:
        return names
    config = LoraConfig(target_modules=target_modules or r".*", exclude_modules=exclude_modules)
    kept = []
    for name in names:
        hit = check_target_module_exists(config, name)
        if hit and type(hit).__name__ != "_ExcludedModule":
            kept.append(name)
    return kept


def resolve_targets(
    model: nn.Module,
    family: Family,
    groups: Sequence[str] | None = None,
    target_modules: Sequence[str] | str | None = None,
    exclude_modules: Sequence[str] | str | None = None,
) -> list[Target]:
    """The nn.Linear (and transformers Conv1D) modules of ``groups`` that match the PEFT-style
    patterns, in model order."""
    if family.validate is not None:
        family.validate(model)
    groups = list(groups) if groups else list(family.default_groups)
    unknown = [g for g in groups if g not in family.groups]
    if unknown:
        raise TargetError(
            f"group(s) {unknown} do not exist in the {family.name} family; its groups are "
            f"{list(family.groups)}."
        )
    every = {name: (module, family.group_of(name)) for name, module in model.named_modules() if is_adaptable(module)}
    in_groups = {name: (module, group) for name, (module, group) in every.items() if group in groups}
    present = [g for g in family.groups if any(group == g for _, group in every.values())]
    for group in groups:
        if group not in present:
            raise TargetError(f"group {group!r} matches no nn.Linear module in this {type(model).__name__}; "
                              f"check the model or drop the group: the groups with layers here are {present}, "
                              f"e.g. groups={[g for g in groups if g in present] or present[:1]}.")
    kept = _matches_peft(list(in_groups), target_modules, exclude_modules)
    if not kept:
        examples = ", ".join(list(in_groups)[:3])
        raise TargetError(
            f"target_modules={target_modules!r} (exclude_modules={exclude_modules!r}) matches no "
            f"nn.Linear in groups {groups}; module names there look like: {examples}."
        )
    targets = [Target(name, *in_groups[name]) for name in kept]
    for t in targets:
        if not t.module.weight.is_floating_point():
            raise TargetError(
                f"module {t.name!r} has a {t.module.weight.dtype} weight; CorDA rewrites the base "
                f"weight and needs floating point. Load the model unquantised (fp32/bf16/fp16) or "
                f"exclude this module."
            )
    return targets


def config_targets(model: nn.Module, family: Family, config: CordaConfig) -> list[Target]:
    """The targets of ``config``, after checking that every per-group and per-module setting
    names something that is adapted: a misspelt key would otherwise be ignored and silently
    change what is built (``group_modes={'langauge': 'ipm'}`` would build KPM)."""
    targets = resolve_targets(model, family, config.groups, config.target_modules, config.exclude_modules)
    groups = sorted({t.group for t in targets})
    for field in ("group_ranks", "group_modes"):  # rank_min / rank_max: corda++ warns (a floor, a cap)
        value = getattr(config, field)
        unknown = sorted(set(value) - set(groups)) if isinstance(value, dict) else []
        if unknown:
            raise TargetError(f"{field} names group(s) {unknown} that have no adapted module; the adapted groups "
                              f"are {groups}.")
    names = [t.name for t in targets]
    for field in ("rank_pattern", "alpha_pattern"):
        unknown = [key for key in getattr(config, field) if not any(get_pattern_key([key], n) == key for n in names)]
        if unknown:
            raise TargetError(f"{field} key(s) {unknown} match no adapted module (PEFT matches a key against the end "
                              f"of the module name, e.g. 'q_proj' or 'layers.0.self_attn.q_proj'); adapted modules "
                              f"look like {names[:3]}.")
    return targets
