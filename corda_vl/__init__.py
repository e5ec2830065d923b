"""corda_vl: CorDA / CorDA++ covariance-oriented low-rank adapters for LLaMA-style and
vision-language models.

Data flows one way: batches -> collect_covariances -> CovarianceStore -> build_corda (pure
decomposition + PEFT wiring) -> training -> save_corda / export_lora. For models whose
covariances do not fit at once, build_corda_sequential does calibration and decomposition block
by block. Under torchrun / accelerate launch both paths shard their work over the processes.
"""

from .adapters import BuildRecord, build_corda, build_record
from .calibration import collect_covariances
from .config import CordaConfig
from .covariance import CovarianceStore
from .errors import (
    CacheError,
    CalibrationError,
    CordaError,
    DecompositionError,
    TargetError,
    UnknownFamilyError,
)
from .cordapp import compactness
from .memory import MemoryPlan, plan_memory
from .plan import Plan, PlanRow, allocate_ranks, plan
from .report import Run, Score, load_results, write_report
from .saving import export_lora, load_corda, save_corda
from .sequential import build_corda_sequential, calibrate_and_build

__version__ = "0.1.0"

__all__ = [
    "BuildRecord",
    "CacheError",
    "CalibrationError",
    "CordaConfig",
    "CordaError",
    "CovarianceStore",
    "DecompositionError",
    "MemoryPlan",
    "Plan",
    "PlanRow",
    "Run",
    "Score",
    "TargetError",
    "UnknownFamilyError",
    "allocate_ranks",
    "build_corda",
    "build_corda_sequential",
    "build_record",
    "calibrate_and_build",
    "collect_covariances",
    "compactness",
    "export_lora",
    "load_corda",
    "load_results",
    "plan",
    "plan_memory",
    "save_corda",
    "write_report",
]
