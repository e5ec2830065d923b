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

from corda_vl.families.base import Family, has_module, prepare_vlm_batch, register_family
from corda_vl.families.llava import forward_vlm, image_token_id, route_image_and_text

KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")


def _detect(model) -> bool:
    return (has_module(model, r"connector\.modality_projection\.proj$")
            and has_module(model, r"vision_model\.encoder\.layers\.\d+\.self_attn\.q_proj$")
            and has_module(model, r"text_model\.layers\.\d+\.self_attn\.q_proj$"))


def _prepare(model, batch: Any) -> dict[str, Any]:
    return prepare_vlm_batch(batch, KEYS, [image_token_id(model)], "Idefics3 / SmolVLM")


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
