"""CovarianceStore: uncentred second moments of linear-layer inputs, kept as sums and counts.

Layout (what a newcomer needs to know):

* ``inputs``: module name -> *input key*. Modules that read the same tensor (q/k/v, gate/up)
  share one key; the key is the name of the first module that read it.
* ``sums[(key, source)]``: sum over tokens of x x^T, and ``counts[(key, source)]`` the token
  count. ``source`` names the calibration data or modality ("calib", "nq", "calib/image"...).
  Sums and counts, not means, so stores from several batches, processes or files add exactly.
  A source with parts ("calib/image", "calib/text") also answers to its parent name ("calib"):
  the parts are added on request, so the all-token covariance is never stored twice.
* ``fingerprint``: identifies the model the statistics came from (see :func:`model_fingerprint`);
  :meth:`CovarianceStore.load` and ``build_corda`` refuse a store made on another model.

On disk: one safetensors file; the JSON metadata (inputs, counts, fingerprint, a CRC32 of every
matrix) sits in the safetensors header, so a truncated or corrupted file is detected on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from corda_vl.atomic import atomic_file
from corda_vl.decomposition.cosvd import DampedCovariance, damp_covariance
from corda_vl.errors import CacheError, CordaError

FORMAT_VERSION = 1
DERIVED_SEPARATOR = "/"


def model_fingerprint(model: nn.Module, module_names: list[str]) -> str:
    """A short hash of the target modules' names, shapes and a fixed sample of their weights.

    Weight samples are rounded to bfloat16 so the same checkpoint loaded in fp32 or bf16 gives
    the same fingerprint, while a different checkpoint of the same architecture does not.
    """
    h = hashlib.sha256()
    for name in sorted(module_names):
        weight = model.get_submodule(name).weight
        flat = weight.detach().reshape(-1)
        # integer positions: a float32 linspace rounds past the end of tensors over 2**24 elements
        idx = (torch.arange(16) * (flat.numel() - 1) // 15).to(flat.device)
        sample = flat[idx].to(torch.bfloat16).float().cpu()
        h.update(name.encode())
        h.update(str(tuple(weight.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _with_parents(source: str) -> list[str]:
    """'calib/0/image' -> ['calib', 'calib/0', 'calib/0/image']."""
    parts = source.split(DERIVED_SEPARATOR)
    return [DERIVED_SEPARATOR.join(parts[:i]) for i in range(1, len(parts) + 1)]


@dataclass
class CovarianceStore:
    """Covariance sums of linear-layer inputs keyed by (input key, source)."""

    inputs: dict[str, str] = field(default_factory=dict)
    sums: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    fingerprint: str = ""

    # ------------------------------------------------------------------ queries
    @property
    def modules(self) -> list[str]:
        return list(self.inputs)

    @property
    def sources(self) -> list[str]:
        """Every source name a query accepts: stored ones and the parents of split ones."""
        return sorted({name for _, source in self.sums for name in _with_parents(source)})

    def sources_for(self, module: str) -> list[str]:
        """The sources that hold data for ``module``'s input, parents of split sources included."""
        key = self.input_key(module)
        return sorted({name for k, source in self.sums if k == key for name in _with_parents(source)})

    def input_key(self, module: str) -> str:
        try:
            return self.inputs[module]
        except KeyError:
            raise CordaError(
                f"module {module!r} has no covariance in this store; calibrate it (include it in "
                f"the targets of collect_covariances) or leave it out of the adapter targets."
            ) from None

    def resolve_source(self, source: str | None) -> str:
        """The source to use: the one asked for, or the store's only top-level one."""
        available = self.sources
        if source is None:
            roots = [s for s in available if DERIVED_SEPARATOR not in s]
            if len(roots) != 1:
                raise CordaError(
                    f"the store holds several covariance sources {available}; choose one with "
                    f"CordaConfig(source=...)."
                )
            return roots[0]
        if source not in available:
            raise CordaError(f"source {source!r} is not in the store; available: {available}.")
        return source

    def splits_for(self, module: str) -> list[str]:
        """The split names (``split0``, ``split1``, ...) in ``module``'s sources, in index order."""
        key = self.input_key(module)
        names = {part for k, source in self.sums if k == key for part in source.split(DERIVED_SEPARATOR)
                 if part.startswith("split") and part[5:].isdigit()}
        return sorted(names, key=lambda name: int(name[5:]))

    def _parts(self, module: str, source: str | None, split: str | None = None,
               held_out: bool = False) -> list[tuple[str, str]]:
        """The stored sums that make up ``source``; with ``split``, only those outside it
        (``held_out=False``) or only those inside it (``held_out=True``)."""
        key, source = self.input_key(module), self.resolve_source(source)
        if (key, source) in self.sums:
            parts = [(key, source)]
        else:
            parts = [k for k in self.sums if k[0] == key and k[1].startswith(source + DERIVED_SEPARATOR)]
        if split is not None:
            parts = [k for k in parts if (split in k[1].split(DERIVED_SEPARATOR)) == held_out]
            if not parts:
                raise CordaError(f"module {module!r}: source {source!r} has no data "
                                 f"{'in' if held_out else 'outside'} split {split!r}.")
        if not parts:
            raise CordaError(f"module {module!r} has no covariance for source {source!r}; its data "
                             f"never reached it. Sources it has: "
                             f"{sorted(s for k, s in self.sums if k == key)}.")
        return parts

    def _sum_of(self, parts: list[tuple[str, str]]) -> torch.Tensor:
        if len(parts) == 1:
            return self.sums[parts[0]]
        total = self.sums[parts[0]].clone()
        for part in parts[1:]:
            total += self.sums[part]
        return total

    def leaves(self, module: str, source: str | None, split: str | None = None,
               held_out: bool = False) -> list[str]:
        """The stored source names whose sums make up ``source`` (and ``split``, as in :meth:`covariance`)."""
        return sorted(name for _, name in self._parts(module, source, split, held_out))

    def sum(self, module: str, source: str | None = None) -> torch.Tensor:
        return self._sum_of(self._parts(module, source))

    def count(self, module: str, source: str | None = None, split: str | None = None,
              held_out: bool = False) -> int:
        return sum(self.counts[part] for part in self._parts(module, source, split, held_out))

    def covariance(self, module: str, source: str | None = None, dtype=torch.float64, split: str | None = None,
                   held_out: bool = False) -> torch.Tensor:
        """C = (1/n) sum_t x_t x_t^T for the input of ``module``. With ``split``: over the tokens
        outside that split (``held_out=False``) or inside it (``held_out=True``) only."""
        parts = self._parts(module, source, split, held_out)
        n = sum(self.counts[part] for part in parts)
        if n == 0:
            raise CordaError(f"module {module!r} saw no tokens for source {source!r}; calibrate on data that reaches it.")
        total = self._sum_of(parts)
        return total.to(dtype).div_(n) if total.dtype != dtype else total / n

    def damped(self, module: str, source: str | None, damping: tuple[float, ...], normalize: bool = True,
               dtype=torch.float64, device=None, name: str | None = None,
               without_split: str | None = None) -> DampedCovariance:
        """:func:`damp_covariance` of :meth:`covariance` (leaving out ``without_split``), on
        ``device``. The copy made here is handed over and damped in place (no second d x d matrix)."""
        cov = self.covariance(module, source, dtype, split=without_split).to(device)
        return damp_covariance(cov, damping, normalize=normalize, dtype=dtype, name=name or module, overwrite=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())

    # --------------------------------------------------------------- arithmetic
    def __add__(self, other: "CovarianceStore") -> "CovarianceStore":
        out = CovarianceStore(dict(self.inputs), {k: v.clone() for k, v in self.sums.items()},
                              dict(self.counts), self.fingerprint)
        return out.merge(other)

    def merge(self, other: "CovarianceStore") -> "CovarianceStore":
        """Add ``other`` into this store in place (same model; sums and counts add)."""
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise CacheError(
                f"cannot merge stores from different models (fingerprints {self.fingerprint} "
                f"and {other.fingerprint})."
            )
        for module, key in other.inputs.items():
            if self.inputs.setdefault(module, key) != key:
                raise CacheError(f"module {module!r} reads input {key!r} in one store and "
                                 f"{self.inputs[module]!r} in the other; they come from different models.")
        for key, tensor in other.sums.items():
            if key in self.sums:
                self.sums[key] += tensor.to(self.sums[key].device, self.sums[key].dtype)
                self.counts[key] += other.counts[key]
            else:
                self.sums[key] = tensor.clone()
                self.counts[key] = other.counts[key]
        self.fingerprint = self.fingerprint or other.fingerprint
        return self

    def rename_source(self, old: str, new: str) -> "CovarianceStore":
        """Return a store whose source ``old`` is called ``new`` (tensors shared, not copied)."""
        rename = lambda s: new + s[len(old):] if s == old or s.startswith(old + DERIVED_SEPARATOR) else s  # noqa: E731
        return CovarianceStore(
            dict(self.inputs),
            {(k, rename(s)): v for (k, s), v in self.sums.items()},
            {(k, rename(s)): v for (k, s), v in self.counts.items()},
            self.fingerprint,
        )

    # --------------------------------------------------------------------- I/O
    def save(self, path: str | os.PathLike) -> Path:
        """Write the store to one safetensors file (atomically: temp file, then rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, entries = {}, []
        for i, ((key, source), tensor) in enumerate(self.sums.items()):
            tensor = tensor.detach().contiguous().cpu()
            tensors[f"cov.{i}"] = tensor
            entries.append({"key": key, "source": source, "count": self.counts[(key, source)],
                            "crc32": zlib.crc32(_tensor_bytes(tensor))})
        meta = {"format": "corda_vl.calibration.store", "version": FORMAT_VERSION,
                "fingerprint": self.fingerprint, "inputs": self.inputs, "entries": entries}
        meta["header_crc32"] = _header_crc(meta)
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"corda_vl": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None,
             device: str | torch.device = "cpu") -> "CovarianceStore":
        """Read a store; with ``model``, refuse it unless it was computed on that model."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise CacheError(f"covariance file {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = json.loads((f.metadata() or {}).get("corda_vl", "null"))
                if not meta or meta.get("format") != "corda_vl.calibration.store":
                    raise CacheError(f"{path} is not a corda_vl covariance file.")
                if "header_crc32" in meta and meta["header_crc32"] != _header_crc(meta):
                    raise CacheError(f"{path}: its header (module names, sources, counts, model fingerprint) fails "
                                     f"its checksum; the file was edited or corrupted. Delete it and recalibrate.")
                store = cls(inputs=dict(meta["inputs"]), fingerprint=meta["fingerprint"])
                for i, entry in enumerate(meta["entries"]):
                    tensor = f.get_tensor(f"cov.{i}")
                    if zlib.crc32(_tensor_bytes(tensor)) != entry["crc32"]:
                        raise CacheError(f"{path}: matrix {entry['key']!r} ({entry['source']}) fails its "
                                         f"checksum; the file is corrupted. Delete it and recalibrate.")
                    store.sums[(entry["key"], entry["source"])] = tensor.to(device)
                    store.counts[(entry["key"], entry["source"])] = int(entry["count"])
        except CacheError:
            raise
        except Exception as exc:  # safetensors raises several types for truncated/garbled files
            raise CacheError(f"cannot read covariance file {path} ({exc}); it is truncated or "
                             f"corrupted. Delete it and recalibrate.") from exc
        if model is not None:
            store.check_model(model)
        return store

    def check_model(self, model: nn.Module, modules: list[str] | None = None) -> None:
        """Raise CacheError unless this store was computed on ``model``."""
        names = list(self.inputs)
        missing = [n for n in names if not _has_linear(model, n)]
        if missing:
            raise CacheError(f"this covariance store was built for another model: it covers "
                             f"{missing[0]!r}, which this model does not have. Recalibrate on this model.")
        actual = model_fingerprint(model, names)
        if self.fingerprint and actual != self.fingerprint:
            raise CacheError(
                f"this covariance store was built for another model (fingerprint {self.fingerprint}, "
                f"this model {actual}): different weights or architecture. Recalibrate on this model "
                f"or load the checkpoint the store was made with."
            )
        if modules is not None:
            absent = [m for m in modules if m not in self.inputs]
            if absent:
                raise CordaError(f"the store has no covariance for {absent[0]!r} "
                                 f"({len(absent)} targets missing); calibrate with these targets included.")


def _header_crc(meta: dict) -> int:
    """CRC-32 of the header without its own checksum (files from before it carry none)."""
    return zlib.crc32(json.dumps({k: v for k, v in meta.items() if k != "header_crc32"}, sort_keys=True).encode())


def _has_linear(model: nn.Module, name: str) -> bool:
    try:
        return hasattr(model.get_submodule(name), "weight")
    except AttributeError:
        return False


def _tensor_bytes(tensor: torch.Tensor):
    """A zero-copy byte view of a CPU tensor (for checksums)."""
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
