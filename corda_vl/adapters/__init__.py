"""PEFT wiring: factors from a method become a stock ``peft.PeftModel`` (``build``), with the
record of how it was built kept beside the model (``record``)."""

from corda_vl.adapters.build import build_corda, decompose_targets, lora_config_for, wrap_with_factors
from corda_vl.adapters.record import BuildRecord, build_record

__all__ = ["BuildRecord", "build_corda", "build_record", "decompose_targets", "lora_config_for",
           "wrap_with_factors"]
