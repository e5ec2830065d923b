"""What a method is to the build: a name, what it needs, how it checks a config, what it
decomposes, and how the dry run labels each module's covariance.

A method decomposes in two steps so that layer-sequential building can feed it one block at a
time: :meth:`Method.analyse` takes some targets and the covariances that reach them (called once
for everything, or once per block), and :meth:`Method.finish` turns everything analysed into
factors. The PEFT wiring (``corda_vl.adapters``) knows nothing about any method beyond this.

Register a new method with :func:`register_method`; ``CordaConfig(method=...)`` then accepts it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from corda_vl.errors import DecompositionError
from corda_vl.methods import registry
from corda_vl.scaleout.distributed import run_owned

if TYPE_CHECKING:  # type hints only: CordaConfig validates through methods/registry.py, never this module
    from corda_vl.calibration.store import CovarianceStore
    from corda_vl.config import CordaConfig
    from corda_vl.families.base import Family
    from corda_vl.targets import Target

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
"""Module name -> (A, B) as they go into lora_A / lora_B."""


@dataclass
class Decomposition:
    """What a method hands to the PEFT wiring."""

    factors: Factors | None
    """None: PEFT initialises the adapter itself (lora, pissa)."""
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-module record (rank, alpha, shape, and what the method decided)."""
    budget: dict[str, int] | None = None
    """corda++: {"budget": asked, "realised": sum r_l (d_in + d_out)}."""


class Method:
    """Base class of an adapter initialisation. Subclasses set the class attributes and override
    what differs; the defaults describe a data-free method that lets PEFT initialise."""

    name: ClassVar[str]
    summary: ClassVar[str]
    """One line for error messages and docs."""
    needs_store: ClassVar[bool] = False
    """Decomposes with a calibration covariance (``build_corda`` then requires a store)."""
    rewrites_base: ClassVar[bool] = True
    """Writes the residual into the base weight (tied weights are then refused)."""
    allocates_ranks: ClassVar[bool] = False
    """Decides each layer's rank itself (the config's ranks are nominal, not checked as given)."""

    def validate(self, config: CordaConfig) -> None:
        """Raise CordaError for settings this method cannot honour."""

    def lora_init(self, config: CordaConfig) -> bool | str:
        """PEFT's ``init_lora_weights`` for the LoraConfig (True: PEFT's default LoRA init)."""
        return True

    def covariance_label(self, family: Family, target: Target, store: CovarianceStore | None,
                         source: str | None, config: CordaConfig) -> str:
        """What the dry run prints in its covariance column for one module."""
        return "none (data-free)"

    def analyse(self, targets: list[Target], store: CovarianceStore | None, config: CordaConfig,
                source: str | None, progress: bool) -> dict[str, Any]:
        """Per-module results for ``targets`` (all of them, or one block's), keyed by module name."""
        return {}

    def finish(self, analysed: dict[str, Any], targets: list[Target], config: CordaConfig) -> Decomposition:
        """Factors for every target from everything :meth:`analyse` returned."""
        return Decomposition(None, {t.name: module_record(t, config) for t in targets})


def register_method(method: Method) -> Method:
    """Make ``method`` available as ``CordaConfig(method=method.name)``."""
    registry.add(method)
    return method


def method_names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return registry.names()


def get_method(name: str) -> Method:
    """The registered method called ``name`` (a CordaError listing the names otherwise)."""
    return registry.lookup(name)


def module_record(t: Target, config: CordaConfig) -> dict[str, Any]:
    """What every method records per module; decomposing methods add their own fields."""
    return {"group": t.group, "rank": config.rank_for(t.name, t.group),
            "alpha": config.alpha_for(t.name, t.group), "shape": [t.d_out, t.d_in]}


def by_input(targets: list[Target], store: CovarianceStore | None) -> dict[str, list[Target]]:
    """Targets grouped by the input they read (one damped covariance serves each group);
    without a store every module is its own group."""
    groups: dict[str, list[Target]] = defaultdict(list)
    for t in targets:
        groups[store.input_key(t.name) if store is not None else t.name].append(t)
    return groups


def factor_dtype(weight: torch.Tensor) -> torch.dtype:
    """Factors are kept in float32 (float64 for float64 weights) until PEFT's layers cast them."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def for_each_input(targets: list[Target], store: CovarianceStore | None, work, *, desc: str, progress: bool) -> None:
    """Collective: ``work(input_key, members)`` for every input this process owns (all of them
    in a single process); a failure on any process raises on every process."""
    run_owned(by_input(targets, store), work, desc=desc, progress=progress, kind=DecompositionError)


def damped_input(store: CovarianceStore, key: str, source: str | None, config: CordaConfig, device: torch.device,
                 name: str | None = None, without_split: str | None = None):
    """The damped covariance of one input as the config asks for it (damping, normalisation, dtype),
    leaving out the calibration split ``without_split`` if given."""
    return store.damped(key, source, config.damping, config.covariance_normalization == "mean_diag",
                        getattr(torch, config.decompose_dtype), device, name=name, without_split=without_split)
