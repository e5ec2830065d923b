"""MiLoRA: data-free; the adapter from the smallest components of the plain SVD of W.

It is CorDA's KPM with the identity in place of the covariance, so it reuses CorDA's code."""

from __future__ import annotations

from typing import TYPE_CHECKING

from corda_vl.errors import CordaError
from corda_vl.methods.base import register_method
from corda_vl.methods.corda import Corda

if TYPE_CHECKING:
    from corda_vl.config import CordaConfig


class Milora(Corda):
    name = "milora"
    summary = "data-free: adapter from the smallest plain-SVD components of W"
    needs_store = False

    def validate(self, config: CordaConfig) -> None:
        if config.svd == "lowrank":  # mode and group_modes do not apply: always the smallest components
            raise CordaError("svd='lowrank' finds the largest components only; milora needs the smallest. "
                             "Use svd='auto' or 'full'.")

    def mode(self, config: CordaConfig, group: str) -> str:
        return "kpm"


MILORA = register_method(Milora())
