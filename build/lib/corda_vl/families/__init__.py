"""Model families: module groups and per-modality routing. One small file per family."""

from .base import Family, detect_family, get_family, register_family, registered_families
from .llama import LLAMA

__all__ = ["Family", "LLAMA", "detect_family", "get_family", "register_family", "registered_families"]
