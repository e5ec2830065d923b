"""Model families: module groups and per-modality routing. One small file per family."""

from corda_vl.families.base import Family, detect_family, get_family, register_family, registered_families
from corda_vl.families.gpt2 import GPT2
from corda_vl.families.hf_clip import HF_CLIP
from corda_vl.families.idefics3 import IDEFICS3
from corda_vl.families.llama import LLAMA
from corda_vl.families.llava import LLAVA
from corda_vl.families.open_clip import OPEN_CLIP
from corda_vl.families.paligemma import PALIGEMMA
from corda_vl.families.qwen2_vl import QWEN2_VL
from corda_vl.families.open_clip_convert import convert_open_clip, to_open_clip_state_dict

__all__ = ["Family", "GPT2", "HF_CLIP", "IDEFICS3", "LLAMA", "LLAVA", "OPEN_CLIP", "PALIGEMMA", "QWEN2_VL", "convert_open_clip", "to_open_clip_state_dict", "detect_family", "get_family", "register_family", "registered_families"]
