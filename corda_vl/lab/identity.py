"""A recipe output folder's identity: every setting that changes the numbers, so that ``--resume``
continues only the very same study and never stitches together runs of different settings.

The identity is the recipe config without the fields that only choose *which* runs exist (the grid:
methods, seeds, learning rates, weight decays; each run's method, rate, decay and seed name its
own folder) or where and how often things are kept. Everything else counts, the thread count and
the device included: both moved results in this project's own runs. It is written to
``<output_dir>/identity.json`` by the first function of the grid that writes there, and checked
before anything is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from corda_vl.atomic import atomic_file
from corda_vl.errors import CordaError
from corda_vl.lab.recipe_config import RecipeConfig

FILE = "identity.json"
NOT_IDENTITY = frozenset({
    "methods", "seeds", "lrs", "lr_methods", "lora_weight_decays",  # the grid
    "lr", "weight_decay", "seed",  # a run's own are in its folder name (runs/<method>/lr<LR>_wd<WD>/seed<S>)
    "output_dir", "save_adapters", "checkpoint_every", "keep_checkpoints",  # where and how often to keep
})


def identity(cfg: RecipeConfig) -> dict[str, Any]:
    """The settings that change the numbers, as JSON values (tuples become lists)."""
    return json.loads(json.dumps({k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY}))


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs (absent on one side included)."""
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def _has_runs(out: Path) -> bool:
    return any(out.glob("runs/*/*/seed*/runs.json")) or (out / "before_items.jsonl").is_file()


def claim_output_dir(cfg: RecipeConfig, resume: bool, out_dir: str | Path | None = None) -> Path:
    """Check ``cfg`` against the identity of ``out_dir`` (default ``cfg.output_dir``), then record
    it; returns the identity file. Every function of the grid that writes into the folder calls
    this first, so the first one to run makes the check, before anything is written.

    * ``--resume`` into a folder of other settings is refused, naming each difference, before
      anything is written;
    * a fresh run into a folder holding runs of other settings is refused too: a run stopped half-way
      would leave old and new results side by side under the new identity;
    * a folder written before identities existed is accepted with a warning (its settings cannot be
      checked), and gets the current identity from now on.
    """
    out = Path(out_dir if out_dir is not None else cfg.output_dir)
    path, mine = out / FILE, identity(cfg)
    if path.is_file():
        diff = differences(json.loads(path.read_text()), mine)
        if diff:
            what = "--resume would continue runs of other settings" if resume else \
                "it holds runs of other settings, which a run stopped half-way would mix with the new ones"
            raise CordaError(f"{out}: {what}. Differences (folder -> now): {'; '.join(diff)}. Use the folder's "
                             f"settings, or another --output-dir.")
        return path
    if _has_runs(out):
        warnings.warn(f"{out} holds runs written before run identities were recorded; their settings cannot be "
                      f"checked against these. From now on {path.name} records them.", stacklevel=2)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(mine, indent=2, sort_keys=True) + "\n")
    return path
