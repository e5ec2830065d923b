"""LLaMA-style decoder-only language models (LlamaForCausalLM, SmolLM2, Mistral, Qwen2, Qwen3, Gemma,
Gemma 2 and 3 text, Phi-3...).

Recognised by structure: decoder layers with ``self_attn.q_proj`` (or Phi-3's fused ``qkv_proj``)
and ``mlp.gate_proj`` / ``up_proj`` (or ``gate_up_proj``), in a model whose config has no
``vision_config`` (a VLM's language model sees image tokens: not a text-only model). Groups:
``language`` (default): every Linear inside the decoder layers; ``head``: the LM head, opt-in
(calibrating it costs a vocabulary-sized forward, and it is often tied to the embeddings).
Padding is excluded through the attention mask.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from corda_vl.errors import CalibrationError
from corda_vl.families.base import (Family, Routes, has_module, is_vision_language, register_family, tensor_dict,
                                   text_mask, text_probe)

TEXT_KEYS = ("input_ids", "attention_mask")


def _detect(model) -> bool:
    if is_vision_language(model):  # Qwen2-VL, PaliGemma...: LLaMA-like layers, but not text-only
        return False
    return has_module(model, r"layers\.\d+\.self_attn\.(q|qkv)_proj$") and has_module(
        model, r"layers\.\d+\.mlp\.(gate|up|gate_up)_proj$"
    )


def prepare_text(model, batch: Any) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if "pixel_values" in batch:
        raise CalibrationError("this batch has 'pixel_values' but the model is a text-only language model; "
                               "calibrate it on text batches (input_ids, attention_mask) only.")
    out = tensor_dict(batch, TEXT_KEYS)
    if "input_ids" not in out:
        raise CalibrationError("a text batch needs 'input_ids' (and usually 'attention_mask').")
    if out["input_ids"].dim() == 1:
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    return out


def text_route(model, batch: Mapping[str, Any]) -> Routes:
    return {"language": {"": text_mask(batch)}}


def causal_lm_forward(model, batch: Mapping[str, Any]):
    return model(**batch, use_cache=False)


LLAMA = register_family(
    Family(
        name="llama",
        detect=_detect,
        groups={"language": r"(^|\.)layers\.\d+\.(self_attn|mlp)\.[^.]+$", "head": r"(^|\.)lm_head$"},
        default_groups=("language",),
        route=text_route,
        forward=causal_lm_forward,
        prepare=prepare_text,
        task_type="CAUSAL_LM",
        describe=lambda name, group: "LM head input (text tokens)" if group == "head" else "text tokens",
        probe_batch=lambda model: text_probe(),
    )
)
