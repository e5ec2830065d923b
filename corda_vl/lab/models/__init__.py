"""Model loaders and embedded defaults (built or converted once, cached)."""

from corda_vl.lab.models.cache import cache_root
from corda_vl.lab.models.default_clip import DEFAULT_CLIP, build_default_clip, default_clip_dir, load_clip
from corda_vl.lab.models.default_llava import DEFAULT_LLAVA, build_default_llava, default_llava_dir, load_llava
from corda_vl.lab.models.llama import SMOLLM2, load_llama, smollm2_available, smollm2_dir
from corda_vl.lab.models.open_clip_loader import load_open_clip

__all__ = ["DEFAULT_CLIP", "DEFAULT_LLAVA", "SMOLLM2", "build_default_clip", "build_default_llava", "cache_root",
           "default_clip_dir", "default_llava_dir", "load_clip", "load_llama", "load_llava", "load_open_clip",
           "smollm2_available", "smollm2_dir"]
