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
(:func:`agreed`): a rank that fails tells the others, and all raise the same error.
"""

from __future__ import annotations

import heapq
import os
from contextlib import contextmanager
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from corda_vl.errors import CordaError

T = TypeVar("T")


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
    """Where collective tensors must live: this process's GPU for NCCL, else the CPU."""
    if is_distributed() and torch.distributed.get_backend() == "nccl":
        return process_device("cuda")
    return torch.device("cpu")


def init_from_launcher(timeout_minutes: float = 120) -> tuple[int, int]:
    """Join the process group that ``accelerate launch`` / ``torchrun`` set up in the environment
    (WORLD_SIZE > 1), through accelerate's PartialState: gloo on CPU, NCCL on GPUs, one GPU per
    process. A no-op for a plain ``python`` run. Returns (rank, world size).

    ``timeout_minutes``: how long a collective may wait. The recipes evaluate and save on the main
    process while the others wait, which for a 7B model exceeds torch's 10-minute NCCL default."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        from datetime import timedelta

        from accelerate import PartialState

        PartialState(timeout=timedelta(minutes=timeout_minutes))
    return world()


def process_device(device: str) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:1"...) for this process: under a launcher with several
    GPU processes, "cuda" means this process's own GPU (its local rank)."""
    if device == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", world()[0])) % torch.cuda.device_count())
    return torch.device(device)


_FIRST_DEPTH = [0]


@contextmanager
def main_process_first():
    """The main process runs the block first (e.g. builds a cached default model), the others
    after it, finding its result. Also usable as a decorator. Re-entrant: only the outermost
    level synchronises, so a nested build (the default LLaVA builds the default CLIP) does not
    release the other ranks early."""
    wait = is_distributed() and _FIRST_DEPTH[0] == 0
    if wait and not is_main_process():
        barrier()
    _FIRST_DEPTH[0] += 1
    try:
        yield
    finally:
        _FIRST_DEPTH[0] -= 1
        if wait and is_main_process():
            barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the main process only and hand its (picklable) result to every rank: for
    work that needs no collectives and should not be repeated (evaluation, file writes)."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None, None]
    if is_main_process():
        try:
            box[0] = fn()
        except BaseException as exc:  # noqa: BLE001 - the other ranks must not wait forever
            box[1] = f"{type(exc).__name__}: {exc}"
            torch.distributed.broadcast_object_list(box, src=0)
            raise
    torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CordaError(f"process 0 failed: {box[1]}")
    return box[0]


def broadcast_parameters(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Collective: overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
    if not is_distributed():
        return
    device = comm_device()
    with torch.no_grad():
        for t in tensors:
            buffer = t.detach().to(device).contiguous()
            torch.distributed.broadcast(buffer, src=src)
            t.copy_(buffer.to(t.device))


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over all ranks, in one flat buffer (missing grads count as 0)."""
    if not is_distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    device = comm_device()
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    flat = torch.cat([g.reshape(-1).to(device, dtype) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.device, g.dtype)
        offset += n


def all_reduce_sum(value: float) -> float:
    """Collective: the sum of a Python float over all ranks."""
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=comm_device())
    torch.distributed.all_reduce(tensor)
    return float(tensor.item())


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


def agreed(fn: Callable[[], T], kind: type[Exception] = CordaError, *, collective: bool = True) -> T:
    """``fn()``, with its failure agreed on across ranks (when ``collective``): the rank that
    raised re-raises its error, every other rank raises ``kind`` naming it, so no rank is left
    waiting in the next collective. ``collective=False``: a plain call (per-rank work)."""
    try:
        result = fn()
    except Exception as exc:
        if collective:
            raise_if_any_failed(exc, kind)
        raise
    if collective:
        raise_if_any_failed(None, kind)
    return result


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


def run_owned(by_input: Mapping[str, list[Any]], work: Callable[[str, list[Any]], None], *, desc: str,
              progress: bool, kind: type[Exception] = CordaError) -> None:
    """Collective: ``work(key, members)`` for the keys this rank owns (see :func:`owned_keys`),
    with a progress bar on the main process; a failure on any rank raises on every rank."""
    from tqdm.auto import tqdm

    mine = owned_keys(by_input)
    bar = tqdm(total=sum(len(by_input[k]) for k in mine), desc=desc, disable=not (progress and is_main_process()))

    def work_on_mine() -> None:
        for key in mine:
            work(key, by_input[key])
            bar.update(len(by_input[key]))

    try:
        agreed(work_on_mine, kind)
    finally:
        bar.close()


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
