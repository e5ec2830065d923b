"""Calibration: run batches through the model and sum each target input's x x^T.

``collector`` holds the hooks and the running sums, ``loop`` the one hooked forward loop that
both the all-at-once and the layer-sequential paths use, ``gram`` the symmetric sum itself, and
``store`` the :class:`CovarianceStore` the decomposition reads.
"""

from corda_vl.calibration.loop import collect_covariances
from corda_vl.calibration.store import CovarianceStore, model_fingerprint

__all__ = ["CovarianceStore", "collect_covariances", "model_fingerprint"]
