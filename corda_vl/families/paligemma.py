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

import torch

from corda_vl.errors import CalibrationError
from corda_vl.families.base import Family, check_pixels, has_module, register_family, tensor_dict
from corda_vl.families.llava import forward_vlm, image_token_id, route_image_and_text

KEYS = ("input_ids", "attention_mask", "pixel_values", "token_type_ids")


def _detect(model) -> bool:
    return (has_module(model, r"multi_modal_projector$") and not has_module(model, r"multi_modal_projector\.linear_\d+$")
            and has_module(model, r"vision_tower\..*encoder\.layers\.\d+\.self_attn\.q_proj$")
            and has_module(model, r"language_model\..*layers\.\d+\.self_attn\.q_proj$"))


def _prepare(model, batch: Any) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    out = tensor_dict(batch, KEYS)
    if "input_ids" not in out:
        raise CalibrationError("a PaliGemma / Gemma 3 batch needs 'input_ids' (with the image tokens the processor "
                               "inserts) and, with images, 'pixel_values'; build it with the model's processor.")
    if bool((out["input_ids"] == image_token_id(model)).any()) and "pixel_values" not in out:
        raise CalibrationError("the batch has image tokens but no 'pixel_values'; pass the processor's images with it.")
    if "pixel_values" in out:
        check_pixels(out["pixel_values"])
    return out


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
