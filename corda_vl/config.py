"""Configuration dataclasses. Every field carries its help text in ``metadata["help"]``."""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from peft.utils.other import get_pattern_key

from corda_vl.errors import CordaError
from corda_vl.methods.registry import lookup, names

MethodName = Literal["corda", "corda++", "lora", "pissa", "milora"]
"""The built-in methods; ``corda_vl.methods.register_method`` adds more."""
Mode = Literal["kpm", "ipm"]
MODES = ("kpm", "ipm")
NORMALIZATIONS = ("mean_diag", "none")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
COMPACTNESS = ("bound", "paper", "heldout")  # corda++ metrics (corda_vl.decomposition.compactness)
# KPM's A = S^1/2 V^T C'^-1 has a gain of up to 1/lam along the input directions calibration barely
# excites, so a small lam makes KPM's update large and forgetful. lam >= 1e-2 kept more than 1e-4 on
# CLIP (5 seeds, clip_kpm_variants) and on SmolLM2 (llama_kpm): docs/maths.md#kpm-needs-damping.
DEFAULT_DAMPING = (1e-2, 1e-1, 1.0)


def help_field(text: str, default: Any = MISSING, **kwargs: Any) -> Any:
    """A dataclass field whose help text travels in ``metadata["help"]`` (argparse, docs, errors)."""
    return field(default=default, metadata={"help": text}, **kwargs)




@dataclass
class CordaConfig:
    """How to build adapters: which method, which modules, which ranks, which covariance.

    ``method`` switches between CorDA and the baselines users compare against, so a recipe can
    change method with one flag and keep everything else (targets, ranks, scaling) identical.
    """

    method: MethodName = help_field(
        "Adapter initialisation: 'corda' (covariance-oriented SVD, needs a CovarianceStore), "
        "'corda++' (CorDA with a covariance chosen per layer and ranks allocated per layer under "
        "one parameter budget, both by the compactness metric), 'lora' (PEFT's default init), 'pissa' (PEFT's principal-SVD init) or 'milora' "
        "(data-free: adapter from the smallest plain-SVD components of W).",
        default="corda",
    )
    mode: Mode = help_field(
        "'kpm' (knowledge-preserved: adapter from the smallest CO-SVD components, calibrate on the "
        "knowledge to keep) or 'ipm' (instruction-previewed: adapter from the largest components, "
        "calibrate on the task). Used by method='corda' and 'corda++' only.",
        default="kpm",
    )
    r: int = help_field("Default adapter rank of every targeted module.", default=16)
    alpha: float | None = help_field(
        "LoRA alpha; the adapter output is scaled by alpha / r. None means alpha = r (scale 1).",
        default=None,
    )
    groups: list[str] | None = help_field(
        "Module groups to adapt, as the model family names them (LLaMA: 'language'; CLIP: "
        "'vision', 'text', 'projection'; LLaVA: 'vision', 'projector', 'language'). None = the "
        "family's default groups.",
        default=None,
    )
    target_modules: list[str] | str | None = help_field(
        "PEFT syntax: a list of module-name suffixes (e.g. ['q_proj', 'v_proj']) or one regex "
        "that must match the full module name. Applied inside the selected groups. None = every "
        "nn.Linear of the groups.",
        default=None,
    )
    exclude_modules: list[str] | str | None = help_field(
        "PEFT syntax, like target_modules: modules to leave alone.", default=None
    )
    rank_pattern: dict[str, int] = help_field(
        "PEFT syntax: {name-or-regex: rank} overriding r for matching modules.",
        default_factory=dict,
    )
    alpha_pattern: dict[str, float] = help_field(
        "PEFT syntax: {name-or-regex: alpha} overriding alpha for matching modules.",
        default_factory=dict,
    )
    group_ranks: dict[str, int] = help_field(
        "{group: rank} for whole groups (e.g. {'vision': 8, 'language': 32}); rank_pattern entries "
        "that match a module still win.",
        default_factory=dict,
    )
    group_modes: dict[str, str] = help_field(
        "{group: 'kpm' | 'ipm'} overriding mode per group (e.g. KPM on language, IPM on the "
        "projector). To freeze a group, leave it out of groups.",
        default_factory=dict,
    )
    source: str | None = help_field(
        "Which covariance of the store to use when it holds several (e.g. 'calib', 'nq'). None "
        "= the store's only source.",
        default=None,
    )
    candidates: list[str] | None = help_field(
        "corda++: covariance sources each layer may choose from by compactness (store source "
        "names; a parent such as 'calib' stands for the sum of its parts). None = `source` and "
        "every part of it the store holds for the layer (LLaVA language layers: all tokens, image "
        "tokens, text tokens; collect_covariances(splits=N): N random splits).",
        default=None,
    )
    budget: int | None = help_field(
        "corda++: trainable-parameter budget shared by all targeted layers of all groups, "
        "sum_l r_l * (d_in + d_out). None = the budget of the ranks the other fields give "
        "(uniform r, group_ranks, rank_pattern).",
        default=None,
    )
    rank_min: int | dict[str, int] | None = help_field(
        "corda++: smallest rank a layer can get (an int, or {group: int}). None = a quarter of "
        "the layer's nominal rank (at least 1).",
        default=None,
    )
    rank_max: int | dict[str, int] | None = help_field(
        "corda++: largest rank a layer can get (an int, or {group: int}); capped at "
        "min(d_in, d_out) - 1. None = twice the layer's nominal rank. The build keeps this "
        "many components per layer until the allocation is done, so it bounds the extra memory.",
        default=None,
    )
    rank_step: int = help_field("corda++: rank granted per step of the greedy allocation.", default=1)
    compactness: str = help_field(
        "corda++: the metric that chooses each layer's covariance and allocates the ranks "
        "(docs/cordapp.md). 'bound': a worst-case bound on the context share, with sqrt(kappa); "
        "'paper': the CorDA++ paper's condition factor log(pi) times singular-value ratios (KPM "
        "only); 'heldout': the share of the layer's output on a calibration split no candidate saw "
        "(needs collect_covariances(splits>=2)).",
        default="bound",
    )
    compactness_spectrum: str = help_field(
        "corda++ with compactness='paper': where pi = sqrt(d_out sig_max) / sig_min takes its "
        "singular values: 'covariance' (the damped covariance) or 'weighted' (W C'). The paper, as "
        "transcribed, is ambiguous here.",
        default="covariance",
    )
    heldout_split: str | None = help_field(
        "corda++ with compactness='heldout': the calibration split every candidate is scored on and "
        "built without (e.g. 'split1'). None = the last split the store holds.",
        default=None,
    )
    damping: tuple[float, ...] = help_field(
        "Damping schedule: C' = C + lam * mean(diag C) * I with the smallest lam for which a "
        "float64 Cholesky factorisation succeeds.",
        default=DEFAULT_DAMPING,
    )
    covariance_normalization: str = help_field(
        "'mean_diag' divides the damped covariance by its mean diagonal before the SVD, which "
        "makes A and B independent of the scale of the calibration activations; 'none' uses C "
        "as collected (original CorDA; the A/B balance then depends on that scale).",
        default="mean_diag",
    )
    factor_balance: str = help_field(
        "How each component's singular value is split between A and B: 'sigma' (sqrt(sigma) on "
        "both sides, the paper's split) or 'norm' (rescaled so that ||A_i|| = ||B_i||; B A and "
        "the model at init are unchanged, but Adam's step size on B A is LoRA-like instead of "
        "scaled by the large norm C'^{-1} gives A; see docs/maths.md, 'KPM and the factor balance').",
        default="sigma",
    )
    decompose_dtype: str = help_field(
        "dtype of the exact decomposition path and of the Rayleigh-Ritz check ('float64' or "
        "'float32'); results are cast to the weight dtype at the end.",
        default="float64",
    )
    svd: str = help_field(
        "'auto': M = W C' in float32, a basis from the eigendecomposition of its smaller Gram "
        "matrix (float64 for KPM, float32 for IPM), refined by a float64 Rayleigh-Ritz step and kept "
        "only if float64 confirms what it claims (KPM: the tail carries at most 1.01x its claimed "
        "context, or less than ~3e-6 of it; IPM: the head at least 0.99x); otherwise the exact SVD. "
        "method='corda', mode='ipm' first tries a randomised float32 head, used as it is where its "
        "Ritz pairs have converged. 'full': always LAPACK's SVD in decompose_dtype. 'lowrank': "
        "randomised top-r SVD (IPM only).",
        default="auto",
    )
    lowrank_niter: int = help_field(
        "Power iterations of the randomised SVD: svd='lowrank', and the float32 basis that "
        "svd='auto' uses for method='corda', mode='ipm'.",
        default=4,
    )
    pissa_niter: int | None = help_field(
        "method='pissa': None = PEFT's exact SVD; an int = PEFT's fast 'pissa_niter_N' init.",
        default=None,
    )
    lora_dropout: float = help_field("Dropout on the adapter input during training.", default=0.0)

    def __post_init__(self) -> None:
        method = lookup(self.method)  # an unknown name raises, listing the registered methods
        if self.mode not in MODES:
            raise CordaError(f"mode={self.mode!r} is not one of {MODES}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise CordaError(f"r={self.r!r} must be a positive integer.")
        if self.alpha is not None and not (_finite(self.alpha) and self.alpha > 0):
            raise CordaError(f"alpha={self.alpha!r} must be a finite positive number (or None for alpha = r).")
        bad = {k: v for k, v in self.rank_pattern.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad:
            raise CordaError(f"rank_pattern {bad}: ranks must be positive integers.")
        bad = {k: v for k, v in self.alpha_pattern.items() if not (_finite(v) and v > 0)}
        if bad:
            raise CordaError(f"alpha_pattern {bad}: alphas must be finite positive numbers.")
        if not (_finite(self.lora_dropout) and 0 <= self.lora_dropout < 1):
            raise CordaError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.factor_balance not in ("sigma", "norm"):
            raise CordaError(f"factor_balance={self.factor_balance!r} must be 'sigma' or 'norm'.")
        if self.covariance_normalization not in NORMALIZATIONS:
            raise CordaError(
                f"covariance_normalization={self.covariance_normalization!r} is not one of "
                f"{NORMALIZATIONS}."
            )
        if self.decompose_dtype not in ("float64", "float32"):
            raise CordaError(f"decompose_dtype={self.decompose_dtype!r}: use 'float64' or 'float32'.")
        if self.svd not in ("auto", "full", "lowrank"):
            raise CordaError(f"svd={self.svd!r}: use 'auto', 'full' or 'lowrank'.")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise CordaError(f"budget={self.budget!r} must be a positive number of trainable parameters.")
        if not isinstance(self.rank_step, int) or self.rank_step < 1:
            raise CordaError(f"rank_step={self.rank_step!r} must be a positive integer.")
        for name in ("rank_min", "rank_max"):
            value = getattr(self, name)
            values = value.values() if isinstance(value, dict) else [] if value is None else [value]
            if any(not isinstance(v, int) or v < 1 for v in values):
                raise CordaError(f"{name}={value!r} must be a positive int, a {{group: int}} dict, or None.")
        low, high = self.rank_min, self.rank_max
        for group in set(low if isinstance(low, dict) else {}) | set(high if isinstance(high, dict) else {}) | {None}:
            lo = low.get(group) if isinstance(low, dict) else low
            hi = high.get(group) if isinstance(high, dict) else high
            if lo is not None and hi is not None and lo > hi:
                where = f" for group {group!r}" if group else ""
                raise CordaError(f"rank_min {lo} is above rank_max {hi}{where}.")
        if self.compactness not in COMPACTNESS:
            raise CordaError(f"compactness={self.compactness!r} is not one of {COMPACTNESS}.")
        if self.compactness_spectrum not in ("covariance", "weighted"):
            raise CordaError(f"compactness_spectrum={self.compactness_spectrum!r}: use 'covariance' or 'weighted'.")
        if self.compactness == "paper" and "ipm" in (self.mode, *self.group_modes.values()):
            raise CordaError("compactness='paper' is the paper's KPM formulation; for IPM layers use "
                             "compactness='bound' or 'heldout'.")
        if self.candidates is not None and not self.candidates:
            raise CordaError("candidates=[] leaves nothing to choose from; use None for every available source.")
        self.damping = tuple(float(x) for x in self.damping)
        if (not self.damping or any(not (_finite(x) and x >= 0) for x in self.damping)
                or list(self.damping) != sorted(self.damping)):
            raise CordaError(f"damping={self.damping!r} must be a non-empty ascending list of finite lam >= 0.")
        if isinstance(self.groups, str):
            self.groups = [self.groups]
        bad = {g: m for g, m in self.group_modes.items() if m not in MODES}
        if bad:
            raise CordaError(f"group_modes {bad}: modes must be one of {MODES}.")
        if any(not isinstance(r, int) or r < 1 for r in self.group_ranks.values()):
            raise CordaError(f"group_ranks={self.group_ranks!r} must map groups to positive integers.")
        method.validate(self)

    def rank_for(self, module_name: str, group: str | None = None) -> int:
        """Rank of one module: rank_pattern (resolved exactly as PEFT does), then group_ranks, then r."""
        key = get_pattern_key(list(self.rank_pattern), module_name)
        if key in self.rank_pattern:
            return int(self.rank_pattern[key])
        return int(self.group_ranks.get(group, self.r))

    def alpha_for(self, module_name: str, group: str | None = None) -> float:
        """LoRA alpha of one module (alpha_pattern, then alpha, then the module's rank)."""
        key = get_pattern_key(list(self.alpha_pattern), module_name)
        if key in self.alpha_pattern:
            return float(self.alpha_pattern[key])
        return float(self.alpha) if self.alpha is not None else float(self.rank_for(module_name, group))

    def scaling_for(self, module_name: str, group: str | None = None) -> float:
        """LoRA scaling s = alpha / r of one module."""
        return self.alpha_for(module_name, group) / self.rank_for(module_name, group)

    def rank_bounds(self, module_name: str, group: str | None, limit: int) -> tuple[int, int]:
        """corda++: (floor, cap) of one module's rank; ``limit`` = min(d_in, d_out)."""
        nominal = self.rank_for(module_name, group)

        def pick(value: int | dict[str, int] | None, default: int) -> int:
            if isinstance(value, dict):
                return value.get(group, default)
            return default if value is None else value

        high = min(pick(self.rank_max, 2 * nominal), limit - 1)
        return min(pick(self.rank_min, max(1, nominal // 4)), high), high

    def mode_for(self, group: str | None = None) -> str:
        return self.group_modes.get(group, self.mode)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["damping"] = list(self.damping)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CordaConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise CordaError(f"unknown CordaConfig fields {sorted(unknown)}; known: {sorted(known)}.")
        return cls(**data)


def __getattr__(name: str) -> Any:
    """METHODS / DECOMPOSING (0.1) now come from the method registry; deprecated, go in 0.3."""
    import warnings

    if name == "METHODS":
        value = names()
    elif name == "DECOMPOSING":
        value = tuple(m for m in names() if lookup(m).needs_store)
    else:
        raise AttributeError(f"module 'corda_vl.config' has no attribute {name!r}")
    warnings.warn(f"corda_vl.config.{name} is deprecated: use corda_vl.methods.method_names() / "
                  f"get_method(name).needs_store.", DeprecationWarning, stacklevel=2)
    return value
