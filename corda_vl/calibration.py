"""The calibration loop: forward pre-hooks that accumulate x x^T per unique input tensor.

State lives in a :class:`_Collector` keyed by module name; nothing is stored on the user's
modules and every hook is removed when the loop ends, also on error.

Shared inputs are *detected*: when a module receives the very tensor object another module
received earlier in the same forward pass (q/k/v, gate/up), its statistics are not computed again
and it is mapped to the first reader's input key.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .covariance import CovarianceStore, model_fingerprint
from .distributed import agreed, all_reduce_store, world
from .errors import CalibrationError
from .families import detect_family
from .families.base import Family, Routes, batch_to_device
from .gram import GramSum
from .targets import Target, resolve_targets


class _StopForward(Exception):
    """Raised from a hook once every target has been seen: the rest of the model is not needed."""


class _Collector:
    def __init__(self, targets: list[Target], source: str, dtype: torch.dtype, offload: bool, stop_early: bool,
                 sample_scale: str = "none"):
        self.targets = {t.name: t for t in targets}
        self.sample_scale = sample_scale
        self.source = source
        self.split: str | None = None
        self.dtype = dtype
        self.offload = offload
        self.inputs: dict[str, str] = {}
        self.sums: dict[tuple[str, str], GramSum] = {}
        self.counts: dict[tuple[str, str], int] = {}
        self.routes: Routes = {}
        self.batch_index = 0
        self._live: dict[int, tuple[weakref.ref, str]] = {}
        self._seen: set[str] = set()
        self.stop_early = stop_early

    def start_batch(self, routes: Routes, index: int, split: str | None) -> None:
        self.routes, self.batch_index, self.split = routes, index, split
        self._live.clear()
        self._seen.clear()
        self._reserve_cpu_sums()

    def _reserve_cpu_sums(self) -> None:
        """Allocate, before the forward, every CPU sum this batch may open.

        A sum allocated inside the forward lands where the layer before just freed its
        activations (glibc puts them in its heap once its mmap threshold has grown), so the next
        layer cannot reuse that hole and the heap grows layer by layer. Calibrating SmolLM2 (32 x
        256 tokens) added 408-606 MB resident for a 403 MB store between identical runs, up to
        950 MB with mmapped sums opened in the hooks, and 392-494 MB (10 runs) with the sums
        reserved here. Readers of a shared input get a reservation until the first batch reveals
        the sharing; its pages are never touched (an untouched mmap, see gram.py) and ``finish``
        drops it. CUDA sums stay lazy: reserved GPU memory would be real.
        """
        for name, target in self.targets.items():
            if self.inputs.get(name, name) != name:  # reads another module's input
                continue
            if not (self.offload or target.module.weight.device.type == "cpu"):
                continue
            for suffix in self.routes.get(target.group, {"": None}):
                key = (name, self._source(suffix))
                if key not in self.sums:
                    self.sums[key] = GramSum(target.d_in, self.dtype, "cpu")
                    self.counts[key] = 0

    def _source(self, suffix: str) -> str:
        # modality parts first, splits below them: calib/image/split0 keeps calib/image whole
        return "/".join(p for p in (self.source, suffix, self.split) if p)

    def finish(self) -> tuple[dict[tuple[str, str], torch.Tensor], dict[tuple[str, str], int]]:
        """The completed sums and their token counts, without reservations no token reached."""
        counts = {key: n for key, n in self.counts.items() if n}
        sums = {key: gram.result() for key, gram in self.sums.items() if key in counts}
        self.sums.clear()  # the unused reservations' mappings go back to the OS here
        return sums, counts

    def hook(self, name: str):
        def pre_hook(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                raise CalibrationError(f"module {name!r} was called without a positional input tensor; "
                                       f"corda_vl hooks the first positional argument of nn.Linear.")
            live = self._live.get(id(x))
            if live is not None and live[0]() is x:
                self._map(name, live[1])
            else:
                self._map(name, name)
                self._live[id(x)] = (weakref.ref(x), name)
                self._accumulate(name, x)
            self._seen.add(name)
            if self.stop_early and len(self._seen) == len(self.targets):
                raise _StopForward

        return pre_hook

    def _map(self, name: str, key: str) -> None:
        previous = self.inputs.setdefault(name, key)
        if previous != key:
            raise CalibrationError(
                f"module {name!r} shared its input with {previous!r} in an earlier batch but with "
                f"{key!r} in batch {self.batch_index}; the model's data flow changes between batches."
            )

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        group = self.targets[name].group
        for suffix, mask in self.routes.get(group, {"": None}).items():
            rows = self._rows(name, _max_scaled(x, mask) if self.sample_scale == "max" else x, mask)
            if rows.shape[0] == 0:  # e.g. no image tokens in a text-only batch
                continue
            key = (name, self._source(suffix))
            device = torch.device("cpu") if self.offload else rows.device
            if key not in self.sums or (not self.counts[key] and self.sums[key].device != device):
                self.sums[key] = GramSum(rows.shape[1], self.dtype, device)
                self.counts[key] = 0
            self.sums[key].add(rows)
            self.counts[key] += rows.shape[0]
            if not self.sums[key].diagonal_finite():
                raise CalibrationError(
                    f"module {name!r} received NaN/Inf activations in batch {self.batch_index} (or "
                    f"x^T x overflowed in {self.dtype}). Check the inputs of that batch, run the model "
                    f"in float32, or use dtype=torch.float64 for accumulation."
                )

    def _rows(self, name: str, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise CalibrationError(
                    f"module {name!r}: input of shape {tuple(x.shape)} does not match the token mask "
                    f"{tuple(mask.shape)} its family routes to it. If the batch has padding, pass "
                    f"'attention_mask' with the same shape as 'input_ids'."
                )
            if not bool(mask.all()):  # indexing copies: skip it when nothing is masked
                x = x[mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])


def _max_scaled(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each sample (batch row) divided by |max| of its (unmasked) activations: PEFT's CorDA hook,
    which weights every sample by 1 / max^2 (it runs batch size 1 and divides by the max)."""
    if x.dim() < 3:
        return x / x.max().abs().clamp_min(torch.finfo(x.dtype).tiny)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is not None:
        flat = flat.masked_fill(~mask.reshape(x.shape[0], -1, 1).to(x.device), float("-inf"))
    peak = flat.amax(dim=(1, 2)).abs().clamp_min(torch.finfo(x.dtype).tiny)
    return x / peak.reshape(-1, *([1] * (x.dim() - 1)))


def _split_names(splits: int):
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


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def collect_covariances(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    groups: Sequence[str] | None = None,
    targets: Sequence[str] | str | None = None,
    exclude: Sequence[str] | str | None = None,
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
        groups, targets, exclude: which modules, as in ``CordaConfig`` (groups, target_modules,
            exclude_modules). Calibrate a superset of what you will adapt, never less.
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
            does (for comparisons: it weights samples by 1 / max^2, see README).
        distributed: under ``torchrun`` / ``accelerate launch`` (an initialised process group of
            several ranks), "auto" has each rank run every world_size-th batch of the same
            ``batches`` and then adds all ranks' sums and counts, so every rank returns the
            single-process store (up to float summation order). "reduce": your ``batches`` are
            already this rank's shard; only add. False: this rank's data only.
        progress: show a tqdm bar (on the main process).
    """
    family = family or detect_family(model)
    resolved = resolve_targets(model, family, groups, targets, exclude)
    if not isinstance(splits, int) or splits < 1:
        raise CalibrationError(f"splits={splits!r} must be a positive integer.")
    if sample_scale not in ("none", "max"):
        raise CalibrationError(f"sample_scale={sample_scale!r} must be 'none' or 'max'.")
    if distributed not in (True, False, "auto", "reduce"):
        raise CalibrationError(f"distributed={distributed!r} must be 'auto', 'reduce', True or False.")
    rank, size = world() if distributed else (0, 1)
    shard = size if distributed in ("auto", True) else 1
    collector = _Collector(resolved, source, dtype, offload, stop_early, sample_scale)
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
                      f"reaches them, or leave them out of the targets.", stacklevel=2)
    store.fingerprint = model_fingerprint(model, list(store.inputs))
    _warn_small(store, {t.name: t.d_in for t in resolved})
    return store


def _run_batches(model: nn.Module, family: Family, batches: Iterable[Any], collector: _Collector, splits: int,
                 shard: tuple[int, int], progress: bool) -> None:
    """The hooked no-grad forward over this rank's batches (``shard`` = (rank, ranks)); batch
    indices stay global so the split dealing does not depend on the number of ranks."""
    deal = _split_names(splits)
    device = _input_device(model)
    handles = [collector.targets[name].module.register_forward_pre_hook(collector.hook(name))
               for name in collector.targets]
    was_training = model.training
    model.eval()
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for index, raw in enumerate(tqdm(batches, total=total, desc="calibrating", disable=not progress)):
            split = deal(index)
            if index % shard[1] != shard[0]:
                continue
            batch = batch_to_device(family.prepare(model, raw), device)
            collector.start_batch(family.route(model, batch), index, split)
            try:
                with torch.no_grad():
                    family.forward(model, batch)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _warn_small(store: CovarianceStore, d_in: dict[str, int]) -> None:
    """One warning for every covariance that saw fewer tokens than its input width."""
    small = [(d_in[key] - n, key, source, n) for (key, source), n in store.counts.items() if n < d_in[key]]
    if not small:
        return
    _, key, source, n = max(small)
    warnings.warn(
        f"{len(small)} covariance(s) saw fewer tokens than their input width, e.g. module {key!r} "
        f"(and modules sharing its input): only {n} calibration tokens for d_in={d_in[key]} ({source}). "
        f"Those covariances are rank-deficient and damping will dominate them; calibrate on at least "
        f"{max(d_in[k] for _, k, _, _ in small)} tokens.",
        stacklevel=3,  # _warn_small -> collect_covariances -> caller
    )
