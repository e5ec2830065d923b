"""Layer-sequential CorDA: calibrate and decompose one block at a time, for models whose
covariances do not fit in memory all at once (7B-class LLaMA / LLaVA language models).

The calibration batches run through the model once, up to the first block of the stack that
holds the targets; the hidden states entering it are cached (in ``cache_dtype``, optionally on
disk). Then, block by block: the cached states go through the block with the covariance hooks
on its linear layers, the block's outputs replace the cache, and the block's covariances are
decomposed into adapter factors and freed. Only one block's covariances are alive at any time.

The blocks run with their original weights (the model is only rewritten at the end, from the
factors, exactly as :func:`build_corda` does), so each block sees the same activations as in
one full forward pass and the adapters equal the all-at-once path's. Under torch.distributed
each rank runs its share of the batches, every block's store is all-reduced and its
decomposition sharded (see ``corda_vl.scaleout.distributed``).
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from corda_vl.adapters.build import build_corda, check_targets, wrap_with_factors
from corda_vl.adapters.record import BuildRecord
from corda_vl.calibration.collector import Collector
from corda_vl.calibration.loop import Step, collect_covariances, input_device, run_hooked, warn_small
from corda_vl.calibration.store import CovarianceStore, model_fingerprint
from corda_vl.config import CordaConfig
from corda_vl.deprecation import module_getattr
from corda_vl.errors import CalibrationError
from corda_vl.families import detect_family
from corda_vl.families.base import Family, batch_to_device
from corda_vl.methods import get_method
from corda_vl.scaleout.blocks import block_stack
from corda_vl.scaleout.distributed import agreed, all_reduce_store, gather_objects, is_main_process, world
from corda_vl.scaleout.memory import plan_memory
from corda_vl.targets import Target, config_targets


class _Captured(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__()
        self.args_, self.kwargs = args, kwargs


class HiddenCache:
    """The hidden states entering the current block, one tensor per calibration batch, kept in
    ``dtype`` in memory or, with ``directory``, as safetensors files there (read back per block)."""

    def __init__(self, dtype: torch.dtype | None, directory: str | Path | None):
        self.dtype, self.directory = dtype, Path(directory) if directory is not None else None
        self._memory: dict[int, torch.Tensor] = {}
        self._devices: dict[int, torch.device] = {}
        self._sizes: dict[int, int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of one generation of cached states (in memory or on disk)."""
        return sum(self._sizes.values())

    def put(self, index: int, hidden: torch.Tensor) -> None:
        hidden = hidden.detach().to(self.dtype or hidden.dtype)
        self._sizes[index] = hidden.numel() * hidden.element_size()
        if self.directory is None:
            self._memory[index] = hidden
            return
        from safetensors.torch import save_file

        self._devices[index] = hidden.device
        save_file({"hidden": hidden.contiguous().cpu()}, str(self.directory / f"batch{index}.safetensors"))

    def get(self, index: int, dtype: torch.dtype) -> torch.Tensor:
        if self.directory is None:
            return self._memory[index].to(dtype)
        from safetensors.torch import load_file

        return load_file(str(self.directory / f"batch{index}.safetensors"))["hidden"].to(self._devices[index], dtype)


@dataclass
class _Record:
    """What one calibration batch needs to run block by block (its hidden states are in the cache)."""

    index: int
    routes: Any
    hidden_dtype: torch.dtype
    args: list[tuple]
    """Per block: the positional arguments after the hidden states (usually none)."""
    kwargs: list[dict]
    """Per block: its keyword arguments (masks, position embeddings...). One entry when every
    block received the very same objects (LLaMA); one per block when they differ (e.g. Qwen2 /
    Gemma layers alternating full and sliding-window attention masks)."""

    def call_args(self, block: int) -> tuple[tuple, dict]:
        i = block if len(self.kwargs) > 1 else 0
        return self.args[i], self.kwargs[i]


def _same(a: Any, b: Any) -> bool:
    """The same object, or equal plain values (tensors must be the very same tensor)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - objects without a usable ==
        return False


def _capture(model: nn.Module, family: Family, stack: nn.ModuleList, last: int, batches: Iterable[Any],
             shard: tuple[int, int], cache: HiddenCache, progress: bool) -> list[_Record]:
    """Run this rank's batches into the stack; cache the hidden states entering block 0 and keep
    every block's other arguments. The first batch runs through blocks 0..``last`` to learn whether
    the blocks all receive the same arguments; if they do, later batches stop at block 0."""
    calls: dict[int, tuple[tuple, dict]] = {}
    uniform: list[bool | None] = [None]

    def pre_hook(i: int):
        def hook(module, args, kwargs):
            calls[i] = (args, kwargs)
            if i == 0 and uniform[0]:
                raise _Captured(args, kwargs)
        return hook

    def after_last(module, args, output):
        raise _Captured((), {})

    records: list[_Record] = []
    device = input_device(model)
    handles = [block.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, block in enumerate(stack[:last + 1])]
    handles.append(stack[last].register_forward_hook(after_last))
    try:
        total = len(batches) if hasattr(batches, "__len__") else None
        for index, raw in enumerate(tqdm(batches, total=total, desc="embedding", disable=not progress)):
            if index % shard[1] != shard[0]:
                continue
            batch = batch_to_device(family.prepare(model, raw), device)
            calls.clear()
            try:
                with torch.no_grad():
                    family.forward(model, batch)
            except _Captured:
                pass
            if 0 not in calls:
                raise CalibrationError("the forward pass never reached the first block of the stack holding the "
                                       "targets; layer-sequential calibration cannot be used with this model.")
            args, kwargs = [], []
            for i in sorted(calls):
                a, k = calls[i][0], dict(calls[i][1])
                hidden = a[0] if a else k.pop("hidden_states")
                if i == 0:
                    cache.put(len(records), hidden)
                    hidden_dtype = hidden.dtype
                args.append(tuple(a[1:]))
                kwargs.append(k)
            if uniform[0] is None:
                uniform[0] = all(_same(args[i], args[0]) and k.keys() == kwargs[0].keys()
                                 and all(_same(v, kwargs[0][key]) for key, v in k.items()) for i, k in enumerate(kwargs))
            if uniform[0]:
                args, kwargs = args[:1], kwargs[:1]
            records.append(_Record(index, family.route(model, batch), hidden_dtype, args, kwargs))
    finally:
        for handle in handles:
            handle.remove()
    return records


def _calibrate_block(i: int, block: nn.Module, targets: list[Target], records: list[_Record], cache: HiddenCache,
                     dtype: torch.dtype, source: str, fingerprint: str) -> CovarianceStore:
    """Covariances of ``targets`` (inside block ``i``) over the cached inputs; advances the cache."""
    collector = Collector(targets, source, dtype, offload=False, stop_early=False)

    def steps():
        for j, rec in enumerate(records):
            args, kwargs = rec.call_args(i)

            def forward(j=j, rec=rec, args=args, kwargs=kwargs) -> None:
                out = block(cache.get(j, rec.hidden_dtype), *args, **kwargs)
                cache.put(j, out[0] if isinstance(out, tuple) else out)

            yield Step(rec.index, rec.routes, None, forward)

    run_hooked(collector, steps())
    return CovarianceStore(collector.inputs, *collector.finish(), fingerprint)


def build_corda_sequential(
    model: nn.Module,
    batches: Iterable[Any],
    config: CordaConfig | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    offload_dir: str | Path | None = None,
    source: str = "calib",
    adapter_name: str = "default",
    family: Family | None = None,
    progress: bool = True,
) -> PeftModel:
    """Calibrate and build adapters block by block; same result as
    ``build_corda(model, collect_covariances(model, batches, ...), config)`` with one block's
    covariances in memory at a time.

    Args:
        batches: calibration batches, as for :func:`collect_covariances` (KPM: the knowledge to
            keep; IPM: the task). Under torch.distributed each rank runs every world_size-th one.
        dtype: covariance accumulation dtype.
        cache_dtype: dtype of the cached hidden states between blocks (default: as the model
            produces them, which keeps the result equal to the all-at-once path; bfloat16 halves
            the cache at a small cost in accuracy).
        offload_dir: keep the cached hidden states as files in this folder (a temporary folder
            inside it is used and removed) instead of in memory.
    The adapters must lie inside one stack of repeated blocks (LLaMA's decoder layers; for
    LLaVA choose ``groups=["language"]``). Every method that needs a store runs here: each
    block's covariances are analysed and freed before the next block (CorDA: the block's factors;
    CorDA++: each layer's scores and its ``rank_max`` kept components, the ranks allocated once
    every block is in). Methods that need no covariances go straight to :func:`build_corda`.
    """
    config = config or CordaConfig()
    method = get_method(config.method)
    if not method.needs_store:  # no covariances to collect
        return build_corda(model, None, config, adapter_name=adapter_name, family=family, progress=progress)
    family = family or detect_family(model)
    targets = config_targets(model, family, config)
    check_targets(model, targets, config)
    _, stack, blocks = block_stack(model, targets)
    rank, size = world()
    show = progress and is_main_process()
    analysed: dict[str, Any] = {}
    seen = CovarianceStore()
    peak = 0
    last = max(i for i, inside in enumerate(blocks) if inside)  # the blocks after it are not needed
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(dir=offload_dir) if offload_dir is not None else nullcontext() as tmp:
            cache = HiddenCache(cache_dtype, tmp)
            records = agreed(lambda: _capture(model, family, stack, last, batches, (rank, size), cache, show),
                             CalibrationError)
            if sum(gather_objects(len(records))) == 0:
                raise CalibrationError("calibration saw no data: the batch iterable was empty. Pass at least one batch.")
            for i in tqdm(range(last + 1), desc="blocks (calibrate + decompose)", disable=not show):
                inside = blocks[i]
                # the fingerprint lets the reduce check that every rank holds the same model
                fingerprint = model_fingerprint(model, [t.name for t in inside]) if inside and size > 1 else ""
                store = agreed(lambda: _calibrate_block(i, stack[i], inside, records, cache, dtype, source, fingerprint),
                               CalibrationError)
                if not inside:
                    continue
                all_reduce_store(store)
                peak = max(peak, store.nbytes())
                seen.inputs.update(store.inputs)
                seen.counts.update(store.counts)
                analysed.update(method.analyse(inside, store, config, source, progress=False))
                del store
    finally:
        model.train(was_training)
    warn_small(seen, {t.name: t.d_in for t in targets})
    result = method.finish(analysed, targets, config)
    record = BuildRecord(family.name, config.to_dict(), source, result.modules, result.budget)
    record.calibration = {"sequential": True, "blocks": len(stack), "peak_covariance_bytes": peak,
                          "cache_bytes": cache.nbytes, "cache_on_disk": offload_dir is not None}
    return wrap_with_factors(model, targets, config, family, result.factors, record, adapter_name)


def calibrate_and_build(
    model: nn.Module,
    batches: Iterable[Any],
    config: CordaConfig | None = None,
    *,
    memory_limit: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    **sequential_options: Any,
) -> PeftModel:
    """Calibrate on ``batches`` and build ``config``'s adapters in one call, choosing the path by
    memory: layer-sequential (:func:`build_corda_sequential`) when the planned all-at-once
    covariances (:func:`corda_vl.scaleout.memory.plan_memory`) exceed ``memory_limit`` bytes, else
    ``collect_covariances`` + ``build_corda``. ``memory_limit=None`` always goes all at once;
    ``sequential_options`` (cache_dtype, offload_dir) reach the sequential path.
    """
    config = config or CordaConfig()
    if not get_method(config.method).needs_store:  # no covariances to collect
        return build_corda(model, None, config, progress=progress)
    needed = None
    if memory_limit is not None:
        needed = plan_memory(model, groups=config.groups, target_modules=config.target_modules,
                             exclude_modules=config.exclude_modules).covariance_bytes(dtype)
    if needed is not None and needed > memory_limit:
        return build_corda_sequential(model, batches, config, dtype=dtype, progress=progress, **sequential_options)
    store = collect_covariances(model, batches, groups=config.groups, target_modules=config.target_modules,
                                exclude_modules=config.exclude_modules, dtype=dtype, progress=progress)
    return build_corda(model, store, config, progress=progress)


__getattr__ = module_getattr(__name__, {"blocks_of": "corda_vl.scaleout.blocks.blocks_of"})  # the 0.1 place
