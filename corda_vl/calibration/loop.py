"""The calibration loop: :func:`run_hooked` is the one loop that runs forwards with a
:class:`~corda_vl.calibration.collector.Collector`'s hooks on (every hook is removed when it ends,
also on error). :func:`collect_covariances` feeds it whole-model forwards; the layer-sequential
path (``corda_vl.scaleout.sequential``) feeds it one block's forwards at a time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from corda_vl.calibration.collector import Collector, StopForward
from corda_vl.calibration.store import CovarianceStore, model_fingerprint
from corda_vl.scaleout.distributed import agreed, all_reduce_store, world
from corda_vl.deprecation import renamed_arguments
from corda_vl.errors import CalibrationError
from corda_vl.families import detect_family
from corda_vl.families.base import Family, Routes, batch_to_device
from corda_vl.targets import resolve_targets


def split_names(splits: int):
    """batch index -> split name (None without splits), dealt block by block in seeded order."""
    if splits == 1:
        return lambda index: None
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []

    def deal(index: int) -> str:
        if index % splits == 0:
            order[:] = torch.randperm(splits, generator=gen).tolist()
        return f"split{order[index % splits]}"

    return deal


def input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@renamed_arguments(targets="target_modules", exclude="exclude_modules")
def collect_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    groups: Sequence[str] | None = None,
    target_modules: Sequence[str] | str | None = None,
    exclude_modules: Sequence[str] | str | None = None,
    source: str = "calib",
    splits: int = 1,
    dtype: torch.dtype = torch.float32,
    offload: bool = False,
    stop_early: bool = True,
    sample_scale: str = "none",
    distributed: bool | str = "auto",
    progress: bool = True,
    family: Family | None = None,
) -> CovarianceStore:
    """Run ``batches`` through ``model`` and return the input covariances of the target modules.

    Args:
        model: a model of a registered family (see ``corda_vl.families``).
        batches: an iterable of dicts / BatchEncodings (``input_ids``, ``attention_mask``...) or
            of ``input_ids`` tensors; any batch size, padding excluded through the mask.
        groups, target_modules, exclude_modules: which modules, as in ``CordaConfig``. Calibrate
            a superset of what you will adapt, never less.
        source: name of this calibration data; several sources can live in one store.
        splits: N > 1 stores N random splits of the batches as ``source/split0`` ...
            ``source/split{N-1}`` (each block of N consecutive batches is dealt to the N splits in
            a seeded random order); ``source`` still answers with all of them. Modality parts
            stay whole above the splits (LLaVA: ``source/image/split0``, ``source/image``).
            CorDA++ can then choose, per layer, the most compact of the splits and the wholes.
        dtype: accumulation dtype (float32 default; float64 for very long calibrations).
        offload: keep the sums on CPU instead of each module's device.
        stop_early: stop each forward once every target has seen its input (skips the LM head).
        sample_scale: "none" sums x x^T over all tokens (the default); "max" first divides each
            sample (batch row) by the |max| of its activations, as PEFT's ``preprocess_corda``
            does (for comparisons: it weights samples by 1 / max^2, see docs/maths.md).
        distributed: under ``torchrun`` / ``accelerate launch`` (an initialised process group of
            several ranks), "auto" has each rank run every world_size-th batch of the same
            ``batches`` and then adds all ranks' sums and counts, so every rank returns the
            single-process store (up to float summation order). "reduce": your ``batches`` are
            already this rank's shard; only add. False: this rank's data only.
        progress: show a tqdm bar (on the main process).
    """
    family = family or detect_family(model)
    resolved = resolve_targets(model, family, groups, target_modules, exclude_modules)
    if not isinstance(splits, int) or splits < 1:
        raise CalibrationError(f"splits={splits!r} must be a positive integer.")
    if sample_scale not in ("none", "max"):
        raise CalibrationError(f"sample_scale={sample_scale!r} must be 'none' or 'max'.")
    if distributed not in (True, False, "auto", "reduce"):
        raise CalibrationError(f"distributed={distributed!r} must be 'auto', 'reduce', True or False.")
    rank, size = world() if distributed else (0, 1)
    shard = size if distributed in ("auto", True) else 1
    collector = Collector(resolved, source, dtype, offload, stop_early, sample_scale)
    # several ranks: a failure is agreed on, so no rank waits forever in the reduce below
    agreed(lambda: _run_batches(model, family, batches, collector, splits, (rank % shard, shard), progress and rank == 0),
           CalibrationError, collective=size > 1)
    store = CovarianceStore(collector.inputs, *collector.finish())
    if size > 1:  # every rank must hold the same model: the reduce compares these fingerprints
        store.fingerprint = model_fingerprint(model, [t.name for t in resolved])
        all_reduce_store(store)
    if not store.sums:
        raise CalibrationError("calibration saw no data: the batch iterable was empty or no target "
                               "module was reached. Pass at least one batch.")
    unreached = [t.name for t in resolved if t.name not in collector.inputs]
    if unreached:
        warnings.warn(f"{len(unreached)} target modules were never called during calibration (first: "
                      f"{unreached[0]!r}); they get no covariance. Calibrate them with data that "
                      f"reaches them, or leave them out of the targets.", stacklevel=3)  # past renamed_arguments
    store.fingerprint = model_fingerprint(model, list(store.inputs))
    warn_small(store, {t.name: t.d_in for t in resolved}, stacklevel=4)
    warn_missing_sources(store, family, resolved, source, stacklevel=4)
    return store


def warn_missing_sources(store: CovarianceStore, family: Family, resolved, source: str, stacklevel: int = 3) -> None:
    """One warning per group whose routing names a kind of token (image, text) that no batch
    carried: a VLM calibrated on text only is allowed, but its adapter then protects nothing the
    model does with images, and the user should know."""
    for group, suffixes in family.token_sources.items():
        reached = [t.name for t in resolved if t.group == group and t.name in store.inputs]
        if not reached:
            continue
        missing = [f"{source}/{s}" for s in suffixes if f"{source}/{s}" not in store.sources_for(reached[0])]
        if missing:
            warnings.warn(f"the {group} layers saw no {' or '.join(m.rsplit('/', 1)[1] for m in missing)} tokens, so "
                          f"{', '.join(missing)} is missing: their adapters are built from the other tokens alone "
                          f"and protect nothing the model does with these. Calibrate on batches that carry "
                          f"them (the processor's output, images included) to protect both.", stacklevel=stacklevel)


@dataclass
class Step:
    """One hooked forward: which batch it is, how its tokens route to sources, and the call."""

    index: int
    routes: Routes
    split: str | None
    forward: Callable[[], Any]


def run_hooked(collector: Collector, steps: Iterable[Step]) -> None:
    """Run every step's forward under no_grad with the collector's hooks on its targets; a hook
    may end a forward early once every target has seen its input."""
    handles = [t.module.register_forward_pre_hook(collector.hook(name)) for name, t in collector.targets.items()]
    try:
        for step in steps:
            collector.start_batch(step.routes, step.index, step.split)
            try:
                with torch.no_grad():
                    step.forward()
            except StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()


def _model_steps(model: nn.Module, family: Family, batches: Iterable[Any], splits: int, shard: tuple[int, int],
                 progress: bool) -> Iterator[Step]:
    """Whole-model forwards over this rank's batches (``shard`` = (rank, ranks)); batch indices
    stay global so the split dealing does not depend on the number of ranks."""
    deal = split_names(splits)
    device = input_device(model)
    total = len(batches) if hasattr(batches, "__len__") else None
    for index, raw in enumerate(tqdm(batches, total=total, desc="calibrating", disable=not progress)):
        split = deal(index)
        if index % shard[1] != shard[0]:
            continue
        batch = batch_to_device(family.prepare(model, raw), device)
        yield Step(index, family.route(model, batch), split, lambda batch=batch: family.forward(model, batch))


def _run_batches(model: nn.Module, family: Family, batches: Iterable[Any], collector: Collector, splits: int,
                 shard: tuple[int, int], progress: bool) -> None:
    was_training = model.training
    model.eval()
    try:
        run_hooked(collector, _model_steps(model, family, batches, splits, shard, progress))
    finally:
        model.train(was_training)


def warn_small(store: CovarianceStore, d_in: dict[str, int], stacklevel: int = 3) -> None:
    """One warning for every covariance that saw fewer tokens than its input width, attributed
    ``stacklevel`` frames up (3: the caller of the function that calls this)."""
    small = [(d_in[key] - n, key, source, n) for (key, source), n in store.counts.items() if n < d_in[key]]
    if not small:
        return
    _, key, source, n = max(small)
    warnings.warn(
        f"{len(small)} covariance(s) saw fewer tokens than their input width, e.g. module {key!r} "
        f"(and modules sharing its input): only {n} calibration tokens for d_in={d_in[key]} ({source}). "
        f"Those covariances are rank-deficient and damping will dominate them; calibrate on at least "
        f"{max(d_in[k] for _, k, _, _ in small)} tokens.",
        stacklevel=stacklevel,
    )
