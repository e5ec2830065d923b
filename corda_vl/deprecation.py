"""Deprecation shims for the 0.2 layout; they go in 0.3 (see CHANGELOG.md).

Old module paths (``corda_vl.decompose``, ``corda_vl.experiment``, ``corda_vl.data.vqa`` ...)
still import, as the module that replaced them, with a DeprecationWarning. Renamed or moved
names resolve through :func:`module_getattr` / :func:`moved`, lazily, so ``import corda_vl`` never
needs the lab's dependencies.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

MOVED_MODULES = {
    "corda_vl.covariance": "corda_vl.calibration.store",
    "corda_vl.gram": "corda_vl.calibration.gram",
    "corda_vl.decompose": "corda_vl.decomposition.cosvd",
    "corda_vl.cordapp": "corda_vl.decomposition.compactness",
    "corda_vl.allocation": "corda_vl.methods.cordapp",
    "corda_vl.pages": "corda_vl.adapters.pages",
    "corda_vl.distributed": "corda_vl.scaleout.distributed",
    "corda_vl.sequential": "corda_vl.scaleout.sequential",
    "corda_vl.memory": "corda_vl.scaleout.memory",
    "corda_vl.experiment": "corda_vl.lab.experiment",
    "corda_vl.training": "corda_vl.lab.training",
    "corda_vl.losses": "corda_vl.lab.losses",
    "corda_vl.report": "corda_vl.lab.report",
    "corda_vl.plots": "corda_vl.lab.plots",
    "corda_vl.interpolation": "corda_vl.lab.interpolation",
    "corda_vl.resources": "corda_vl.lab.resources",
}
MOVED_PACKAGES = {
    "corda_vl.data": "corda_vl.lab.data",
    "corda_vl.eval": "corda_vl.lab.eval",
    "corda_vl.models": "corda_vl.lab.models",
}
def new_module_name(old: str) -> str | None:
    """Where an old module path lives now (None: it did not move)."""
    if old in MOVED_MODULES:
        return MOVED_MODULES[old]
    for prefix, target in MOVED_PACKAGES.items():
        if old == prefix or old.startswith(prefix + "."):
            return target + old[len(prefix):]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__  # importlib sets the alias's spec on the module; put its own back
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # already executed under its new name


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):
        new = new_module_name(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; the old path goes in corda_vl 0.3.", DeprecationWarning,
                      stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _Alias(new), is_package=new in MOVED_PACKAGES.values())


def moved(old: str, new: str) -> Any:
    """The object now at ``new`` (``"package.module.name"``), with a warning that ``old`` is now
    there; called from a deprecated name's accessor, so the warning points at that accessor's caller."""
    module, _, name = new.rpartition(".")
    warnings.warn(f"{old} is now {name} ({new}); the old name goes in corda_vl 0.3.", DeprecationWarning,
                  stacklevel=3)
    return getattr(importlib.import_module(module), name)


def module_getattr(module: str, moves: dict[str, str]):
    """A module ``__getattr__`` answering each old name in ``moves`` with the object at its new
    dotted path (imported only then, so a move into the lab costs the core nothing)."""

    def __getattr__(name: str) -> Any:
        if name not in moves:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        return moved(f"{module}.{name}", moves[name])

    return __getattr__


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finder, or a submodule would load twice


def renamed_arguments(**renames: str):
    """Decorator: accept each old keyword (``old=new``) for one release, with a DeprecationWarning."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; pass {new}= only.")
                    warnings.warn(f"{fn.__name__}({old}=...) is now {new}=; the old name goes in corda_vl 0.3.",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap
