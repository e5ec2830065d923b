"""The fine-tuning loop every recipe shares, on accelerate.

Deterministic by construction, so methods compare fairly and a resumed run ends where an
uninterrupted one does:
- the data order is a pure function of (seed, step): :func:`batch_indices` draws the rows of
  every optimiser step from one seeded permutation per epoch, whatever the method;
- the learning rate is a pure function of the step (linear warm-up, cosine decay);
- a checkpoint holds the trainable parameters, the AdamW state and the step, as safetensors +
  JSON (nothing is unpickled on resume), written atomically every ``checkpoint_every`` steps.

Only the parameters with ``requires_grad`` are trained and checkpointed (the adapter), so a
checkpoint of a LoRA on a 7B model is megabytes, not the model.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from corda_vl.config import help_field
from corda_vl.atomic import atomic_dir, atomic_file
from corda_vl.scaleout.distributed import all_reduce_gradients, all_reduce_sum, broadcast_parameters, world
from corda_vl.errors import CordaError

CHECKPOINTS = "checkpoints"
LOG_FILE = "train_log.jsonl"
STATE_FILE = "state.json"
SCHEDULE = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps", "grad_clip_norm", "seed")
"""TrainConfig fields a resumed run must share with the interrupted one (the rest may change)."""



@dataclass
class TrainConfig:
    """How the adapter is fine-tuned; the same for every method a recipe compares."""

    steps: int = help_field("Optimiser steps.", 100)
    batch_size: int = help_field("Rows per micro-batch.", 8)
    grad_accum: int = help_field("Micro-batches per optimiser step (effective batch = batch_size x grad_accum).", 1)
    lr: float = help_field("Peak learning rate (AdamW).", 1e-3)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    warmup_steps: int = help_field("Linear warm-up steps before the cosine decay.", 10)
    grad_clip_norm: float | None = help_field("Clip the gradient norm to this (None: no clipping).", 1.0)
    checkpoint_every: int = help_field("Write a checkpoint every N steps (0: only at the end).", 50)
    keep_checkpoints: int = help_field("How many of the latest checkpoints to keep on disk.", 2)
    seed: int = help_field("Seeds the data order (same rows at the same step for every method).", 0)
    mixed_precision: str = help_field(
        "'no', 'bf16', 'fp16' (accelerate's), or 'auto': bf16 where a CUDA GPU supports it, else 'no'.", "auto")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CordaError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}.")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise CordaError(f"TrainConfig.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}.")

    def resolved_precision(self) -> str:
        if self.mixed_precision != "auto":
            return self.mixed_precision
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def batch_indices(step: int, micro: int, n_rows: int, config: TrainConfig) -> list[int]:
    """Row indices of micro-batch ``micro`` of optimiser step ``step``: consecutive slices of one
    seeded permutation per epoch, so any step's rows are known without replaying the others."""
    per_step = config.batch_size * config.grad_accum
    start = step * per_step + micro * config.batch_size
    out = []
    for pos in range(start, start + config.batch_size):
        epoch, offset = divmod(pos, n_rows)
        out.append(int(_permutation(config.seed, epoch, n_rows)[offset]))
    return out


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def warmup_cosine(step: int, steps: int, warmup_steps: int) -> float:
    """The one LR schedule of the lab, as a factor of the peak LR: linear warm-up over
    ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate at ``step``: ``lr`` times :func:`warmup_cosine`."""
    return config.lr * warmup_cosine(step, config.steps, config.warmup_steps)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of what the optimiser updates (the adapter)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON


def _checkpoint_dirs(out_dir: Path) -> list[tuple[int, Path]]:
    root = out_dir / CHECKPOINTS
    found = []
    for d in root.glob("step-*") if root.is_dir() else []:
        if (d / STATE_FILE).is_file() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``out_dir/checkpoints`` (None if there is none)."""
    found = _checkpoint_dirs(Path(out_dir))
    return found[-1][1] if found else None


def save_checkpoint(out_dir: Path, step: int, params: dict[str, nn.Parameter], optimizer, config: TrainConfig,
                    fingerprint: dict, log: list[str] | None = None) -> Path:
    """Parameters, AdamW state, settings and the log lines so far, in one folder written atomically:
    a resume takes its loss history from here, never from a top-level log a kill may have cut."""
    from safetensors.torch import save_file

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    tensors = {f"param/{n}": p.detach().float().cpu().contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optim/{index[id(p)]}/{key}"] = torch.as_tensor(value).float().cpu().contiguous()
    target = out_dir / CHECKPOINTS / f"step-{step:06d}"
    with atomic_dir(target, overwrite=True) as tmp:
        save_file(tensors, str(tmp / "trainable.safetensors"))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, "config": asdict(config), **fingerprint}, indent=2))
        if log is not None:
            (tmp / LOG_FILE).write_text(_log_text(log))
    for _, old in _checkpoint_dirs(out_dir)[:-max(1, config.keep_checkpoints)]:
        _remove_tree(old)
    return target


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer, fingerprint: dict) -> int:
    """Restore parameters and AdamW state in place; returns the step to continue from."""
    from safetensors.torch import load_file

    state = json.loads((path / STATE_FILE).read_text())
    mismatch = {k: (state.get(k), v) for k, v in fingerprint.items() if state.get(k) != v}
    if mismatch:
        raise CordaError(f"checkpoint {path} was written by another run ({mismatch}); resume with the same "
                         "method, rank and training settings, or start without --resume.")
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - {k[len("param/"):] for k in tensors if k.startswith("param/")})
    if missing:
        raise CordaError(f"checkpoint {path} lacks trainable parameters {missing[:3]}...; it belongs to another model.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param/{name}"].to(p.dtype))
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    for name, p in params.items():
        keys = {k.rsplit("/", 1)[-1]: v for k, v in tensors.items() if k.startswith(f"optim/{name}/")}
        if keys:
            optimizer.state[p] = {k: (v if k == "step" else v.to(device=p.device, dtype=p.dtype)) for k, v in keys.items()}
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    steps: int
    losses: list[float]
    seconds: float
    resumed_from: int | None


def _log_lines(path: Path, keep_below: int) -> list[str]:
    """Log lines of steps before ``keep_below`` (a resumed run rewrites the rest). Lines that do not
    parse (a log cut by a kill under an older version) are dropped, not fatal."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < keep_below:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    return kept


def _resumed_log(checkpoint: Path | None, log_path: Path, start: int) -> list[str]:
    """The log up to ``start``: the checkpoint's own copy (written with it, atomically), else the
    top-level log (checkpoints of older versions carry none)."""
    if checkpoint is not None and (checkpoint / LOG_FILE).is_file():
        return _log_lines(checkpoint / LOG_FILE, start)
    return _log_lines(log_path, start)


def _log_text(log: list[str]) -> str:
    return "".join(line + "\n" for line in log)


def _write_log(path: Path, log: list[str]) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(_log_text(log))


def train(model: nn.Module, rows: Sequence[Any], loss_fn: Callable[[nn.Module, list[Any]], torch.Tensor],
          config: TrainConfig, out_dir: str | Path, *, resume: bool = False, fingerprint: dict | None = None,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Fine-tune ``model``'s trainable parameters on ``rows`` for ``config.steps`` AdamW steps.

    Under ``accelerate launch`` / ``torchrun`` each process computes the gradient of its share of
    every micro-batch, weighted by its share of the rows, and the shares are summed across
    processes: the step equals a single process's when ``loss_fn`` is a mean over rows (a mean
    over tokens differs by how unevenly the answer tokens fall between the shares). Only the main
    process writes logs and checkpoints.

    ``loss_fn(model, list_of_rows)`` returns the mean loss of one micro-batch. Writes
    ``out_dir/train_log.jsonl`` (one line per step: step, loss, lr, seconds) and checkpoints under
    ``out_dir/checkpoints``; ``resume=True`` continues from the newest checkpoint there (a
    ``fingerprint`` dict, e.g. method and rank, must match the one it was written with).
    ``on_step(steps_done)`` runs after every optimiser step, on every process (e.g. to score the
    task along the way; it must leave the model in train mode).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if not len(rows):
        raise CordaError("train: no training rows; check the task data.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schedule = {k: v for k, v in asdict(config).items() if k in SCHEDULE}
    fingerprint = {"fingerprint": fingerprint or {}, "rows": len(rows), "schedule": schedule}
    params = trainable_parameters(model)
    if not params:
        raise CordaError("train: the model has no trainable parameters; build an adapter first (build_corda).")
    rank, size = world()
    if config.batch_size < size:
        raise CordaError(f"train: batch_size={config.batch_size} is below the number of processes ({size}); each "
                         f"process needs at least one row per micro-batch. Raise batch_size or launch fewer processes.")
    on_cpu = next(iter(params.values())).device.type == "cpu"
    accelerator = Accelerator(mixed_precision=config.resolved_precision(), cpu=on_cpu or not torch.cuda.is_available())
    if accelerator.distributed_type.value in ("DEEPSPEED", "FSDP"):
        raise CordaError(f"train: {accelerator.distributed_type.value} launch configs are not supported; the adapter "
                         f"is small, so plain data parallelism (accelerate launch --num_processes N) is what it needs.")
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    # Only the optimiser goes through accelerate: wrapping the model in DDP would hide the methods
    # the losses call (CLIP's get_image_features...); the adapter's gradients are summed by hand,
    # and every rank starts from rank 0's adapter (as DDP would), e.g. LoRA's random A.
    optimizer = accelerator.prepare(optimizer)
    broadcast_parameters(list(params.values()))
    start, resumed = 0, None
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        start = resumed = load_checkpoint(checkpoint, params, optimizer, fingerprint)
    log_path = out / LOG_FILE
    log = _resumed_log(checkpoint, log_path, start)
    losses = [json.loads(line)["loss"] for line in log]
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="training", disable=not (progress and accelerator.is_main_process),
               initial=start, total=config.steps)
    for step in bar:
        lr = learning_rate(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        for micro in range(config.grad_accum):
            indices = batch_indices(step, micro, len(rows), config)
            mine = indices[rank::size]  # several processes: each takes its share of the same rows
            with accelerator.autocast():
                loss = loss_fn(model, [rows[i] for i in mine]) / config.grad_accum
                if size > 1:  # weight by the share, so the summed gradient is the full batch's mean
                    loss = loss * (len(mine) / len(indices))
            accelerator.backward(loss)
            total += loss.item()
        if size > 1:
            all_reduce_gradients(list(params.values()))
            total = all_reduce_sum(total)
        if config.grad_clip_norm:
            accelerator.clip_grad_norm_(list(params.values()), config.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(total):
            raise CordaError(f"train: the loss is {total} at step {step}; lower --lr or check the data.")
        losses.append(total)
        log.append(json.dumps({"step": step, "loss": total, "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}))
        bar.set_postfix(loss=f"{total:.3f}")
        done = step + 1
        if on_step is not None:
            on_step(done)
        if accelerator.is_main_process and (done == config.steps or
                                             (config.checkpoint_every and done % config.checkpoint_every == 0)):
            save_checkpoint(out, done, params, optimizer, config, fingerprint, log)
            _write_log(log_path, log)
    model.eval()
    if accelerator.is_main_process:
        _write_log(log_path, log)
    return TrainResult(config.steps, losses, time.perf_counter() - t0, resumed)
