"""Idefics3 and SmolVLM (``Idefics3ForConditionalGeneration``, ``SmolVLMForConditionalGeneration``):
a SigLIP-style vision encoder, a pixel-shuffle connector, a LLaMA-style text model.

Groups: ``vision`` (``vision_model.encoder.layers``) <- image patches (every patch of every real
image: the model drops images that are all padding); ``projector`` (the connector's
``modality_projection.proj``) <- shuffled patch features; ``language`` (``text_model.layers``,
default) and ``head`` <- image tokens and text tokens as two covariances. Batches are the
processor's output: ``input_ids``, ``attention_mask``, ``pixel_values`` (batch, images, C, H, W)
and ``pixel_attention_mask``.
"""

from __future__ import annotations

from typing import Any

import torch

from corda_vl.errors import CalibrationError
from corda_vl.families.base import Family, check_pixels, has_module, register_family, tensor_dict
from corda_vl.families.llava import forward_vlm, image_token_id, route_image_and_text

KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")


def _detect(model) -> bool:
    return (has_module(model, r"connector\.modality_projection\.proj$")
            and has_module(model, r"vision_model\.encoder\.layers\.\d+\.self_attn\.q_proj$")
            and has_module(model, r"text_model\.layers\.\d+\.self_attn\.q_proj$"))


def _prepare(model, batch: Any) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    out = tensor_dict(batch, KEYS)
    if "input_ids" not in out:
        raise CalibrationError("an Idefics3 / SmolVLM batch needs 'input_ids' (with the image tokens the processor "
                               "inserts) and, with images, 'pixel_values'; build it with the model's processor.")
    if bool((out["input_ids"] == image_token_id(model)).any()) and "pixel_values" not in out:
        raise CalibrationError("the batch has image tokens but no 'pixel_values'; pass the processor's images with it.")
    if "pixel_values" in out:
        check_pixels(out["pixel_values"])
    return out


IDEFICS3 = register_family(
    Family(
        name="idefics3",
        detect=_detect,
        groups={
            "vision": r"vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "projector": r"connector\.modality_projection\.proj$",
            "language": r"text_model\.layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "head": r"(^|\.)lm_head$",
        },
        default_groups=("language",),
        route=route_image_and_text,
        forward=forward_vlm,
        prepare=_prepare,
        task_type="CAUSAL_LM",
        describe=lambda name, group: {"vision": "image patches", "projector": "shuffled patch features"}.get(
            group, "image tokens + text tokens (separate sources)"),
        image_groups=("vision", "projector"),
        token_sources={"language": ("image", "text"), "head": ("image", "text")},
        priority=10,
    )
)
