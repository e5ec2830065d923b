"""The covariance hooks: a :class:`Collector` sums ``x x^T`` per unique input tensor.

Shared inputs are *detected*: when a module receives the very tensor object another module
received earlier in the same forward pass (q/k/v, gate/up), its statistics are not computed again
and it is mapped to the first reader's input key.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from corda_vl.calibration.gram import GramSum
from corda_vl.errors import CalibrationError
from corda_vl.families.base import Routes
from corda_vl.targets import Target


class StopForward(Exception):
    """Raised from a hook once every target has been seen: the rest of the model is not needed."""


class Collector:
    """Forward pre-hooks that sum x x^T per (input key, source) for the targets; the state is
    kept here, keyed by module name, never on the user's modules."""

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
        activations, so the next layer cannot reuse that hole and the heap grows layer by layer
        (measurements: docs/performance.md). Readers of a shared input get a reservation until
        the first batch reveals the sharing; its pages are never touched (an untouched mmap, see
        gram.py) and ``finish`` drops it. CUDA sums stay lazy: reserved GPU memory would be real.
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
                raise StopForward

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
            rows = self._rows(name, max_scaled(x, mask) if self.sample_scale == "max" else x, mask)
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


def max_scaled(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Each sample (batch row) divided by |max| of its (unmasked) activations: PEFT's CorDA hook,
    which weights every sample by 1 / max^2 (it runs batch size 1 and divides by the max)."""
    if x.dim() < 3:
        return x / x.max().abs().clamp_min(torch.finfo(x.dtype).tiny)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    if mask is not None:
        flat = flat.masked_fill(~mask.reshape(x.shape[0], -1, 1).to(x.device), float("-inf"))
    peak = flat.amax(dim=(1, 2)).abs().clamp_min(torch.finfo(x.dtype).tiny)
    return x / peak.reshape(-1, *([1] * (x.dim() - 1)))
