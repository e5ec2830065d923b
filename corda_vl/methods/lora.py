"""LoRA: PEFT's default initialisation (B = 0), the base weight untouched."""

from __future__ import annotations

from corda_vl.methods.base import Method, register_method


class Lora(Method):
    name = "lora"
    summary = "PEFT's default init (B = 0); the base weight stays as it is"
    rewrites_base = False


LORA = register_method(Lora())
