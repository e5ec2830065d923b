"""Exceptions raised by corda_vl.

Every message names the module (or file) at fault and says what to do about it. They subclass
``ValueError`` so that callers who already catch bad-input errors keep working.
"""


class CordaError(ValueError):
    """Base class of every error corda_vl raises on bad input."""


class TargetError(CordaError):
    """The target selection (groups, target_modules, ranks) does not fit the model."""


class CalibrationError(CordaError):
    """Calibration saw something it cannot turn into a covariance (NaN/Inf, bad masks...)."""


class DecompositionError(CordaError):
    """The context-oriented SVD could not be computed for a module."""


class CacheError(CordaError):
    """A saved covariance store or adapter folder is corrupted or belongs to another model."""


class UnknownFamilyError(CordaError):
    """No registered model family recognises the model."""
