"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration`` and its successors).

Groups: ``vision`` (the ViT blocks: fused ``attn.qkv``, ``attn.proj`` and the MLP) <- image
patches; ``projector`` (the patch merger's MLP, and Qwen3-VL's deepstack mergers) <- merged
patches; ``language`` (the decoder layers, default) and ``head`` <- image tokens and text tokens
as two covariances (``calib/image``, ``calib/text``; video tokens count as image tokens), padding
masked. Batches are the processor's output: ``input_ids``, ``attention_mask``, ``pixel_values``,
``image_grid_thw`` and ``mm_token_type_ids`` (videos: ``pixel_values_videos``, ``video_grid_thw``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from corda_vl.errors import CalibrationError
from corda_vl.families.base import Family, Routes, has_module, prepare_vlm_batch, register_family, text_mask

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
        "pixel_values_videos", "video_grid_thw")


def _detect(model) -> bool:
    return has_module(model, r"visual\.blocks\.\d+\.attn\.qkv$") and has_module(model, r"visual\.merger\.") and \
        has_module(model, r"language_model\..*layers\.\d+\.self_attn\.q_proj$")


def _media_tokens(model) -> list[int]:
    config = model.config
    return [int(t) for t in (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
            if t is not None]


def _prepare(model, batch: Any) -> dict[str, Any]:
    return prepare_vlm_batch(batch, KEYS, _media_tokens(model), "Qwen-VL", ("pixel_values", "pixel_values_videos"))


def _route(model, batch: Mapping[str, Any]) -> Routes:
    keep = text_mask(batch)
    media = torch.isin(batch["input_ids"], torch.tensor(_media_tokens(model), device=batch["input_ids"].device)) & keep
    tokens = {"image": media, "text": keep & ~media}
    return {"vision": {"": None}, "projector": {"": None}, "language": tokens, "head": tokens}


def _forward(model, batch: Mapping[str, Any]):
    try:
        return model(**batch, use_cache=False)
    except ValueError as exc:
        raise CalibrationError(f"the batch does not fit the model ({exc}). Build calibration batches with the "
                               f"model's processor: it inserts the image tokens and returns image_grid_thw and "
                               f"mm_token_type_ids.") from exc


QWEN2_VL = register_family(
    Family(
        name="qwen2_vl",
        detect=_detect,
        groups={
            "vision": r"visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.[^.]+)$",
            "projector": r"visual\.(merger|deepstack_merger_list\.\d+)\.(mlp\.\d+|linear_fc\d)$",
            "language": r"language_model\..*layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "head": r"(^|\.)lm_head$",
        },
        default_groups=("language",),
        route=_route,
        forward=_forward,
        prepare=_prepare,
        task_type="CAUSAL_LM",
        describe=lambda name, group: {"vision": "image patches", "projector": "merged image patches"}.get(
            group, "image tokens + text tokens (separate sources)"),
        image_groups=("vision", "projector"),
        token_sources={"language": ("image", "text"), "head": ("image", "text")},
        priority=10,
    )
)
