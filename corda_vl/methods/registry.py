"""Methods by name. A leaf module (it imports no method and no config), so ``CordaConfig`` can
check a name against it while every method module is free to refer to the config."""

from __future__ import annotations

from typing import Any

from corda_vl.errors import CordaError

_REGISTRY: dict[str, Any] = {}
"""name -> the registered ``corda_vl.methods.Method`` instance."""


def add(method: Any) -> None:
    _REGISTRY[method.name] = method


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def lookup(name: str) -> Any:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise CordaError(f"method={name!r} is not one of {names()}. Register a new one with "
                         f"corda_vl.methods.register_method.") from None
