"""PiSSA: PEFT's principal-SVD initialisation (adapter from the largest plain-SVD components)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corda_vl.errors import CordaError
from corda_vl.methods.base import Method, register_method

if TYPE_CHECKING:
    from corda_vl.config import CordaConfig


class Pissa(Method):
    name = "pissa"
    summary = "PEFT's principal-SVD init (largest components of W)"

    def validate(self, config: CordaConfig) -> None:
        if config.pissa_niter is not None and (not isinstance(config.pissa_niter, int) or config.pissa_niter < 1):
            raise CordaError(f"pissa_niter={config.pissa_niter!r} must be a positive int (or None for the exact SVD).")

    def lora_init(self, config: CordaConfig) -> bool | str:
        return "pissa" if config.pissa_niter is None else f"pissa_niter_{config.pissa_niter}"


PISSA = register_method(Pissa())
