"""Model families: module groups and per-modality routing. One small file per family."""

from .base import Family, detect_family, get_family, register_family, registered_families
from .hf_clip import HF_CLIP
from .llama import LLAMA
from .llava import LLAVA

__all__ = ["Family", "HF_CLIP", "LLAMA", "LLAVA", "detect_family", "get_family", "register_family", "registered_families"]
