"""A recipe output folder's identity: every setting that changes the numbers, so that ``--resume``
continues only the very same study and never stitches together runs of different settings.

The identity is the recipe config without the fields that only choose *which* runs exist (the grid:
methods, seeds, learning rates, weight decays; each run's method, rate, decay and seed name its
own folder) or where and how often things are kept. Everything else counts, the thread count and
the device included: both moved results in this project's own runs. So does the base model's
weights (a fingerprint, recorded by the functions that hold the model): a default model rebuilt in
another environment gave other numbers under the same name. It is written to
``<output_dir>/identity.json`` by the first function of the grid that writes there, and checked
before anything is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from corda_vl.atomic import atomic_file
from corda_vl.calibration.store import model_fingerprint
from corda_vl.errors import CordaError
from corda_vl.config import CordaConfig
from corda_vl.lab.recipe_config import RecipeConfig

FILE = "identity.json"
BASE_MODEL = "base_model"  # the fingerprint of the base model's weights, where the caller has the model
CORDA_DEFAULTS = "corda_defaults"  # CordaConfig's defaults: what the recipe's unset fields mean
# Recorded by later versions: compared only where the folder has them, and added where it has not.
RECORDED_LATER = (BASE_MODEL, CORDA_DEFAULTS)
NOT_IDENTITY = frozenset({
    "methods", "seeds", "lrs", "lr_methods", "lora_weight_decays",  # the grid
    "lr", "weight_decay", "seed",  # a run's own are in its folder name (runs/<method>/lr<LR>_wd<WD>/seed<S>)
    "output_dir", "save_adapters", "checkpoint_every", "keep_checkpoints",  # where and how often to keep
})


def identity(cfg: RecipeConfig) -> dict[str, Any]:
    """The settings that change the numbers, as JSON values (tuples become lists). The engine's
    defaults are among them: a recipe that leaves the damping unset builds with whatever
    ``CordaConfig`` defaults to, so a changed default is a changed setting."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY}
    settings[CORDA_DEFAULTS] = CordaConfig().to_dict()
    return json.loads(json.dumps(settings))


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every setting that differs (absent on one side included)."""
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)!r} -> {new.get(k, missing)!r}"
            for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def _has_runs(out: Path) -> bool:
    return any(out.glob("runs/*/*/seed*/runs.json")) or (out / "before_items.jsonl").is_file()


def base_model_fingerprint(model) -> str:
    """A short hash of every weight's name, shape and a fixed sample of its values: two builds or
    checkpoints of one architecture differ here, one checkpoint loaded twice does not."""
    names = [name for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor)]
    return model_fingerprint(model, names)


def claim_output_dir(cfg: RecipeConfig, resume: bool, out_dir: str | Path | None = None, model=None) -> Path:
    """Check ``cfg`` against the identity of ``out_dir`` (default ``cfg.output_dir``), then record
    it; returns the identity file. Every function of the grid that writes into the folder calls
    this first, so the first one to run makes the check, before anything is written.

    * ``--resume`` into a folder of other settings is refused, naming each difference, before
      anything is written;
    * a fresh run into a folder holding runs of other settings is refused too: a run stopped half-way
      would leave old and new results side by side under the new identity;
    * given the base ``model``, its weights count too (``base_model``, a fingerprint): a default
      model rebuilt in another environment, or another checkpoint under the same name, is refused
      the same way. So do CordaConfig's defaults. A folder that predates recording either gets them
      added, with a warning;
    * a folder written before identities existed is accepted with a warning (its settings cannot be
      checked), and gets the current identity from now on.
    """
    out = Path(out_dir if out_dir is not None else cfg.output_dir)
    path, mine = out / FILE, identity(cfg)
    if model is not None:
        mine[BASE_MODEL] = base_model_fingerprint(model)
    if path.is_file():
        recorded = json.loads(path.read_text())
        unrecorded = [k for k in RECORDED_LATER if k not in recorded or k not in mine]
        diff = differences(_without(recorded, unrecorded), _without(mine, unrecorded))
        if diff:
            what = "--resume would continue runs of other settings" if resume else \
                "it holds runs of other settings, which a run stopped half-way would mix with the new ones"
            raise CordaError(f"{out}: {what}. Differences (folder -> now): {'; '.join(diff)}. Use the folder's "
                             f"settings, or another --output-dir.")
        if all(k in recorded for k in mine if k in RECORDED_LATER):
            return path
        warnings.warn(f"{out} predates recording {', '.join(k for k in mine if k not in recorded)}; its runs are "
                      f"taken to match them, and from now on {path.name} records them.", stacklevel=2)
        mine = {**{k: recorded[k] for k in RECORDED_LATER if k in recorded}, **mine}  # keep what it has
    elif _has_runs(out):
        warnings.warn(f"{out} holds runs written before run identities were recorded; their settings cannot be "
                      f"checked against these. From now on {path.name} records them.", stacklevel=2)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(mine, indent=2, sort_keys=True) + "\n")
    return path


def _without(settings: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}
