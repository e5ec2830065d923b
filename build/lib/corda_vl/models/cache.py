"""Where built or converted default models live: ``$CORDA_VL_CACHE`` or ``~/.cache/corda_vl``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("CORDA_VL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corda_vl"
    return Path(root)
