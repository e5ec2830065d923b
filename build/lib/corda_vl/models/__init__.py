"""Model loaders and embedded defaults (built or converted once, cached)."""

from .cache import cache_root
from .llama import SMOLLM2, load_llama, smollm2_available, smollm2_dir

__all__ = ["SMOLLM2", "cache_root", "load_llama", "smollm2_available", "smollm2_dir"]
