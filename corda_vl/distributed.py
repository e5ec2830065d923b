"""Several processes, one result: calibration shards, reduced stores, sharded decompositions.

Everything here runs on ``torch.distributed`` as started by ``torchrun`` or ``accelerate launch``
(gloo on CPU, NCCL on GPU); corda_vl never starts processes itself. Without an initialised
process group (or with one process) every function is a no-op, so the library code calls them
unconditionally.

* Calibration: each rank runs its share of the batches; :func:`all_reduce_store` adds the sums
  and token counts of every rank, so each ends with the store one process would have computed
  over all the batches (up to float summation order).
* Decomposition: :func:`assign_owners` gives every covariance (and the modules reading it) to one
  rank, balancing an estimate of the flops; each rank decomposes its share and
  :func:`share_results` broadcasts the factors. Each adapter is computed once, so every rank
  holds bit-identical factors (no per-rank sign flips of singular vectors).

Collectives deadlock if one rank raises while the others wait, so failures are first agreed on
(:func:`raise_if_any_failed`): a rank that fails tells the others, and all raise the same error.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from typing import Any

import torch

from .errors import CordaError


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when none is initialised."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    return world()[1] > 1


def is_main_process() -> bool:
    return world()[0] == 0


def barrier() -> None:
    if is_distributed():
        torch.distributed.barrier()


def comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable, small: metadata, never weights), in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world()[1]
    torch.distributed.all_gather_object(out, obj)
    return out


def raise_if_any_failed(error: BaseException | None, kind: type[Exception] = CordaError) -> None:
    """Collective: re-raise ``error`` here, or raise ``kind`` naming the rank that failed."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    failures = gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for rank, message in enumerate(failures):
        if message is not None:
            raise kind(f"process {rank} failed: {message}")


# ---------------------------------------------------------------------------------------------
# Calibration


def all_reduce_store(store):
    """Collective: add every rank's sums and counts into ``store`` (in place) and return it.

    Ranks may hold different keys (a rank whose batches had no image tokens has no image
    covariance): the union is reduced, with zeros where a rank has nothing. Sums are reduced in
    their accumulation dtype (float32 or float64), counts as int64.
    """
    if not is_distributed():
        return store
    meta = {"inputs": store.inputs, "fingerprint": store.fingerprint,
            "entries": {key: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in store.sums.items()}}
    gathered = gather_objects(meta)
    fingerprints = {m["fingerprint"] for m in gathered if m["fingerprint"]}
    if len(fingerprints) > 1:
        raise CordaError(f"the processes calibrated different models (fingerprints {sorted(fingerprints)}); load "
                         f"the same checkpoint on every rank.")
    entries: dict[tuple[str, str], tuple[tuple[int, ...], str]] = {}
    for rank, m in enumerate(gathered):
        for module, key in m["inputs"].items():
            if store.inputs.setdefault(module, key) != key:
                raise CordaError(f"module {module!r} shares its input with {key!r} on process {rank} but with "
                                 f"{store.inputs[module]!r} here; every rank must run the same model.")
        for key, spec in m["entries"].items():
            if entries.setdefault(key, spec) != spec:
                raise CordaError(f"covariance {key} is {spec} on process {rank} but {entries[key]} elsewhere; "
                                 f"use the same accumulation dtype on every rank.")
    device = comm_device()
    for key in sorted(entries):
        shape, dtype = entries[key]
        local = store.sums.get(key)
        home = local.device if local is not None else torch.device("cpu")
        buffer = local.to(device) if local is not None else torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
        torch.distributed.all_reduce(buffer)
        store.sums[key] = buffer.to(home)
    keys = sorted(entries)
    counts = torch.tensor([store.counts.get(k, 0) for k in keys], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(counts)
    store.counts = {k: int(n) for k, n in zip(keys, counts.tolist())}
    store.sums = {k: store.sums[k] for k in keys}
    if fingerprints:
        store.fingerprint = fingerprints.pop()
    return store


# ---------------------------------------------------------------------------------------------
# Decomposition


def assign_owners(costs: Mapping[str, float], size: int) -> dict[str, int]:
    """Give each item to one of ``size`` ranks, largest first onto the least loaded rank (LPT).

    Pure and deterministic (ties by name and rank), so every rank computes the same assignment.
    """
    loads = [(0.0, rank) for rank in range(size)]
    owners = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, rank = heapq.heappop(loads)
        owners[name] = rank
        heapq.heappush(loads, (load + costs[name], rank))
    return owners


def owned_keys(by_input: Mapping[str, list[Any]]) -> list[str]:
    """The input keys this rank decomposes (``by_input``: key -> the targets reading it, objects
    with ``d_in`` / ``d_out``): all of them in one process, else a cost-balanced share."""
    rank, size = world()
    if size == 1:
        return list(by_input)
    costs = {key: decomposition_cost(ts[0].d_in, [(t.d_out, t.d_in) for t in ts]) for key, ts in by_input.items()}
    owners = assign_owners(costs, size)
    return [key for key in by_input if owners[key] == rank]


def decomposition_cost(d_in: int, shapes: list[tuple[int, int]]) -> float:
    """Flop estimate for one covariance and the modules reading it: a d_in^3 factorisation of C,
    then an SVD of each d_out x d_in product."""
    return float(d_in) ** 3 + sum(float(o) * i * min(o, i) for o, i in shapes)


def share_results(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], info: dict[str, dict[str, Any]]
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Collective: every rank passes the factors (A, B) and info of the modules it owns and gets
    everyone's. Info (small) is all-gathered; each (A, B) is broadcast from its owner."""
    if not is_distributed():
        return factors, info
    device = comm_device()
    specs = {name: (tuple(A.shape), tuple(B.shape), str(A.dtype).removeprefix("torch."))
             for name, (A, B) in factors.items()}
    everyone = gather_objects((info, specs))
    all_info: dict[str, dict[str, Any]] = {}
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    owner = {}
    for rank, (rank_info, rank_specs) in enumerate(everyone):
        all_info.update(rank_info)
        owner.update({name: (rank, spec) for name, spec in rank_specs.items()})
    me = world()[0]
    for name in sorted(owner):
        rank, (shape_a, shape_b, dtype) = owner[name]
        pair = []
        for i, shape in enumerate((shape_a, shape_b)):
            if rank == me:
                tensor = factors[name][i].to(device).contiguous()
            else:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            torch.distributed.broadcast(tensor, src=rank)
            pair.append(tensor)
        out[name] = (pair[0], pair[1])
    return out, all_info
