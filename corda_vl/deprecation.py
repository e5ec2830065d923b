"""Deprecation shims for the 0.2 layout; they go in 0.3 (see CHANGELOG.md).

Old module paths (``corda_vl.decompose``, ``corda_vl.experiment``, ``corda_vl.data.vqa`` ...)
still import, as the module that replaced them, with a DeprecationWarning. The report names that
were re-exported at the top level (``corda_vl.Run`` ...) resolve lazily from ``corda_vl.lab``, so
``import corda_vl`` never needs the lab's dependencies.
"""

from __future__ import annotations

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
LAB_NAMES = {"Run": "corda_vl.lab.report", "Score": "corda_vl.lab.report",
             "load_results": "corda_vl.lab.report", "write_report": "corda_vl.lab.report",
             "plot_ranks": "corda_vl.lab.plots"}


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


def lab_attribute(name: str) -> Any:
    """Module ``__getattr__`` of corda_vl: the report names, now in corda_vl.lab.report."""
    if name not in LAB_NAMES or name == "plot_ranks":
        raise AttributeError(f"module 'corda_vl' has no attribute {name!r}")
    warnings.warn(f"corda_vl.{name} moved to {LAB_NAMES[name]}.{name}; the old name goes in corda_vl 0.3.",
                  DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(LAB_NAMES[name]), name)


def renamed(module: str, old: str, new: str, value: Any) -> Any:
    """``value`` for a module-level name that was renamed, with a warning (module ``__getattr__``)."""
    warnings.warn(f"{module}.{old} is now {new}; the old name goes in corda_vl 0.3.", DeprecationWarning,
                  stacklevel=3)
    return value


def lab_function(old: str, name: str) -> Any:
    """The lab function that replaced a core method (``Plan.plot`` -> ``plot_ranks``), with a warning."""
    warnings.warn(f"{old} moved to {LAB_NAMES[name]}.{name}; the old name goes in corda_vl 0.3.",
                  DeprecationWarning, stacklevel=3)
    return getattr(importlib.import_module(LAB_NAMES[name]), name)


if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finder, or a submodule would load twice


def renamed_arguments(**renames: str):
    """Decorator: accept each old keyword (``old=new``) for one release, with a DeprecationWarning."""
    import functools

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
