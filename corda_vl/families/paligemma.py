"""PaliGemma and Gemma 3 (``PaliGemmaForConditionalGeneration``, ``Gemma3ForConditionalGeneration``):
a SigLIP vision tower, a projector, a Gemma language model, image tokens spliced into the prompt.

Groups as LLaVA's: ``vision`` (the SigLIP encoder layers; its pooling head is unused here) <-
image patches; ``projector`` (PaliGemma's ``multi_modal_projector.linear``; Gemma 3 projects with
a bare weight, ``mm_input_projection_weight``, which no adapter can reach, so the group is empty
there) <- vision features; ``language`` (default) and ``head`` <- image tokens and text tokens as
two covariances. Batches are the processor's output, ``token_type_ids`` included (PaliGemma
attends to its prefix bidirectionally through it).
"""

from __future__ import annotations

from typing import Any

from corda_vl.families.base import Family, has_module, prepare_vlm_batch, register_family
from corda_vl.families.llava import forward_vlm, image_token_id, route_image_and_text

KEYS = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")


def _detect(model) -> bool:
    return (has_module(model, r"multi_modal_projector$") and not has_module(model, r"multi_modal_projector\.linear_\d+$")
            and has_module(model, r"vision_tower\..*encoder\.layers\.\d+\.self_attn\.q_proj$")
            and has_module(model, r"language_model\..*layers\.\d+\.self_attn\.q_proj$"))


def _prepare(model, batch: Any) -> dict[str, Any]:
    return prepare_vlm_batch(batch, KEYS, [image_token_id(model)], "PaliGemma / Gemma 3")


PALIGEMMA = register_family(
    Family(
        name="paligemma",
        detect=_detect,
        groups={
            "vision": r"vision_tower\..*encoder\.layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "projector": r"multi_modal_projector\.linear$",
            "language": r"language_model\..*layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "head": r"(^|\.)lm_head$",
        },
        default_groups=("language",),
        route=route_image_and_text,
        forward=forward_vlm,
        prepare=_prepare,
        task_type="CAUSAL_LM",
        describe=lambda name, group: {"vision": "image patches", "projector": "vision features"}.get(
            group, "image tokens + text tokens (separate sources)"),
        image_groups=("vision", "projector"),
        token_sources={"language": ("image", "text"), "head": ("image", "text")},
        priority=10,
    )
)
