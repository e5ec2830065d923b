"""corda_vl: CorDA / CorDA++ covariance-oriented low-rank adapters for LLaMA-style and
vision-language models.

Data flows one way:

    batches -> calibration (hooks, sums, CovarianceStore) -> decomposition (pure maths)
            -> methods (lora, pissa, milora, corda, corda++) -> adapters (PEFT wiring) -> saving

with scale-out beside it (``scaleout``: several processes, one block at a time, memory
planning). The retention lab that measures what an adapter keeps lives in ``corda_vl.lab``
(``pip install corda_vl[lab]``); nothing here imports it.
"""

from corda_vl import deprecation
from corda_vl.adapters import BuildRecord, build_corda, build_record
from corda_vl.calibration import CovarianceStore, collect_covariances
from corda_vl.config import CordaConfig
from corda_vl.decomposition.compactness import compactness
from corda_vl.errors import (
    CacheError,
    CalibrationError,
    CordaError,
    DecompositionError,
    TargetError,
    UnknownFamilyError,
)
from corda_vl.methods import get_method, method_names, register_method
from corda_vl.plan import Plan, PlanRow, allocate_ranks, plan
from corda_vl.saving import export_lora, load_corda, save_corda
from corda_vl.scaleout.memory import MemoryPlan, plan_memory
from corda_vl.scaleout.sequential import build_corda_sequential, calibrate_and_build

__version__ = "0.2.0"

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
    "get_method",
    "load_corda",
    "method_names",
    "plan",
    "plan_memory",
    "register_method",
    "save_corda",
]

__getattr__ = deprecation.module_getattr(__name__, {name: f"corda_vl.lab.report.{name}"
                                                    for name in ("Run", "Score", "load_results", "write_report")})
