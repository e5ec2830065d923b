"""Where built or converted default models live: ``$CORDA_VL_CACHE`` or ``~/.cache/corda_vl``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("CORDA_VL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "corda_vl"
    return Path(root)


BUILD_RECORD = "corda_vl_build.json"
"""The JSON a built default model keeps next to its weights: its recipe, scores and timings."""


def model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """``<cache>/models/<name>``: where an embedded default model is converted or built."""
    return Path(cache_dir or cache_root()) / "models" / name


def built_from(target: Path, recipe: dict) -> bool | None:
    """Whether the folder holds a build of ``recipe`` (None: nothing built there yet)."""
    record = target / BUILD_RECORD
    if not record.is_file():
        return None
    return json.loads(record.read_text())["recipe"] == recipe


@contextmanager
def pinned_threads(threads: int) -> Iterator[None]:
    """Run a build on ``threads`` torch CPU threads, then give the caller back its own count.

    A build's weights depend on the thread count (reductions split differently), so a build that
    took the caller's count gave a different model when a recipe (1 thread) rather than the build
    script (2 threads) triggered it. The count is part of the build recipe instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_environment() -> dict:
    """What a build's numbers may depend on beyond its recipe: library versions (torch's kernels,
    the image decoding and resizing) and the thread count it ran on."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env = {"python": platform.python_version(), "threads": torch.get_num_threads()}
    for package in ("torch", "transformers", "numpy", "pillow", "scikit-learn", "easy-vqa"):
        try:
            env[package] = version(package)
        except PackageNotFoundError:
            env[package] = None
    return env


def require_local_path(name_or_path: str) -> str:
    """``name_or_path`` unchanged, unless it is written as a path (``/``, ``./``, ``../``, ``~``)
    and nothing is there: then an error that says so, instead of the hub's "Repo id must be in the
    form..." that transformers gives for a path it cannot find."""
    from corda_vl.errors import CordaError

    text = str(name_or_path)
    if text.startswith(("/", "./", "../", "~")) and not Path(text).expanduser().exists():
        raise CordaError(f"model path {text!r} does not exist. Give a folder holding the model, an embedded "
                         f"alias, or a hub id (owner/name).")
    return text
