"""How a PeftModel was built (method, source, damping per module...), kept beside the model.

Records live in a weak dictionary keyed by the PeftModel, never as attributes on the user's
modules; :func:`build_record` reads them and ``save_corda`` writes them next to the adapter.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_RECORDS: "weakref.WeakKeyDictionary[nn.Module, BuildRecord]" = weakref.WeakKeyDictionary()


@dataclass
class BuildRecord:
    """What build_corda did, per module: written to ``corda_vl.json`` by save_corda."""

    family: str
    config: dict[str, Any]
    source: str | None = None
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    budget: dict[str, int] | None = None
    """corda++: {"budget": asked, "realised": sum r_l (d_in + d_out)}."""
    calibration: dict[str, Any] | None = None
    """build_corda_sequential: blocks, peak covariance bytes, cache bytes."""
    init_digest: str | None = None
    """adapter_digest of the adapter at init: export_lora checks the initial adapter it is given."""

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "config": self.config, "source": self.source, "modules": self.modules,
                "budget": self.budget, "calibration": self.calibration, "init_digest": self.init_digest}

    def rank_histograms(self) -> dict[str, dict[str, dict[str, int]]]:
        """How many layers got each rank, per group and per projection type (the last part of the
        module name: q_proj, fc1, ...): ``{"group": {group: {rank: layers}}, "projection": {...}}``,
        ranks as strings (JSON keys), in ascending order. Shows at a glance whether an allocation
        spread rank or went all-or-nothing."""
        out: dict[str, dict[str, dict[str, int]]] = {"group": {}, "projection": {}}
        for name, info in self.modules.items():
            for kind, key in (("group", str(info.get("group"))), ("projection", name.rsplit(".", 1)[-1])):
                counts = out[kind].setdefault(key, {})
                counts[str(info["rank"])] = counts.get(str(info["rank"]), 0) + 1
        return {kind: {key: dict(sorted(c.items(), key=lambda kv: int(kv[0]))) for key, c in table.items()}
                for kind, table in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BuildRecord":
        return cls(data["family"], data["config"], data.get("source"), data.get("modules", {}), data.get("budget"),
                   data.get("calibration"), data.get("init_digest"))


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over an adapter's tensors (names, dtypes, shapes and bytes, in name order): equal for
    the state dict PEFT saves and the tensors read back from adapter_model.safetensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_record(peft_model: nn.Module) -> BuildRecord | None:
    """The record of how ``peft_model`` was built (None for models corda_vl did not build/load)."""
    return _RECORDS.get(peft_model)


def register_record(peft_model: nn.Module, record: BuildRecord) -> None:
    _RECORDS[peft_model] = record
