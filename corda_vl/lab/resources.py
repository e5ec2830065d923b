"""Access to the lab's data files (prompt templates, class names, model specs) in ``assets/``,
which ships inside the package as package data."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from typing import Any


def assets_root():
    """A Traversable for the assets folder (a plain path in a checkout, a zip entry in a zipped install)."""
    return resources.files("corda_vl.lab").joinpath("assets")


@lru_cache(maxsize=None)
def load_json_asset(relative_path: str) -> Any:
    """Parse ``assets/<relative_path>``."""
    return json.loads(assets_root().joinpath(relative_path).read_text())


def merge_overrides(base: dict, override: dict) -> dict:
    """A deep copy of ``base`` with ``override``'s entries on top (nested dicts merged key by key):
    how a recipe's smaller sizes list only what they change."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_overrides(out[key], value) if both else copy.deepcopy(value)
    return out
