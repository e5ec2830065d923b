"""Access to the data files in the repository's ``assets/`` folder.

In a wheel, ``assets/`` is installed as ``corda_vl/assets`` (see pyproject.toml); in a source
checkout or an editable install it is read where it lies, next to the package.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


def assets_root():
    """A Traversable for the assets folder."""
    source = Path(__file__).resolve().parent.parent / "assets"
    if source.is_dir():
        return source
    return resources.files("corda_vl.assets")


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
