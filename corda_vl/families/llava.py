"""transformers ``LlavaForConditionalGeneration`` (LLaVA-1.5 style: CLIP vision tower, MLP
projector, LLaMA-style language model).

Groups: ``vision`` (vision tower encoder Linears) <- images; ``projector``
(``multi_modal_projector.linear_N``) <- vision features; ``language`` (decoder Linears) <- the
token sequence, split into two covariance sources: ``<source>/image`` (positions of the image
token) and ``<source>/text`` (every other non-padding token); asking the store for
``<source>`` gives their sum, the all-token covariance. ``head`` (lm_head) is opt-in.
Module paths are matched by structure, so transformers 4 (``language_model.model.layers``,
``vision_tower.vision_model``) and 5 (``model.language_model.layers``) layouts both work.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from corda_vl.errors import CalibrationError
from corda_vl.families.base import (Family, Routes, has_module, image_probe, image_tokens, prepare_vlm_batch,
                                    register_family, text_mask, text_probe)

KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


def _detect(model) -> bool:
    return has_module(model, r"multi_modal_projector\.linear_\d+$") and has_module(
        model, r"language_model\..*layers\.\d+\.self_attn\.q_proj$")


def image_token_id(model) -> int:
    config = model.config
    token = getattr(config, "image_token_id", None)
    token = token if token is not None else getattr(config, "image_token_index", None)
    if token is None:
        raise CalibrationError("the LLaVA config names no image token (image_token_id / image_token_index).")
    return int(token)


def _prepare(model, batch: Any) -> dict[str, Any]:
    out = prepare_vlm_batch(batch, KEYS, [image_token_id(model)], "LLaVA")
    if "pixel_values" in out:
        _check_image_tokens(model, out)
    return out


def _check_image_tokens(model, batch: Mapping[str, Any]) -> None:
    """Plain LLaVA: every row announces whole images (the same number of tokens each), and the
    batch announces as many images as it carries. With the right total but wrong rows (24 and 8
    tokens for 16-token images), the features would be spliced into the wrong rows."""
    config = model.config
    if getattr(config, "model_type", None) != "llava":  # NeXT / OneVision: the count varies per image
        return
    vision = config.vision_config
    per_image = (vision.image_size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
    counts = (batch["input_ids"] == image_token_id(model)).sum(dim=1).tolist()
    images = batch["pixel_values"].shape[0]
    if any(c % per_image for c in counts) or sum(counts) != images * per_image:
        raise CalibrationError(f"the rows announce {counts} image tokens, but each image takes {per_image} and the "
                               f"batch carries {images} image(s); build the batch with the model's processor, so "
                               f"that every row holds {per_image} image tokens per image it shows.")


def route_image_and_text(model, batch: Mapping[str, Any]) -> Routes:
    keep = text_mask(batch)
    image = (batch["input_ids"] == image_token_id(model)) & keep
    tokens = {"image": image, "text": keep & ~image}
    return {"vision": {"": None}, "projector": {"": None}, "language": tokens, "head": tokens}


def forward_vlm(model, batch: Mapping[str, Any]):
    try:
        return model(**batch, use_cache=False)
    except ValueError as exc:
        if "image" in str(exc).lower():
            raise CalibrationError(
                f"the batch's image tokens do not match its image features ({exc}). Each image must "
                f"be announced by exactly as many image tokens as the vision tower yields patches; "
                f"build batches with the model's processor."
            ) from exc
        raise


def _describe(name: str, group: str) -> str:
    return {"vision": "image patches", "projector": "vision features",
            "language": "image tokens + text tokens (separate sources)",
            "head": "image tokens + text tokens (separate sources)"}[group]


def _probe_batch(model: nn.Module) -> dict[str, torch.Tensor]:
    """Text with one image's worth of image tokens in it, and the image."""
    config = model.config
    image_id = getattr(config, "image_token_id", None)
    image_id = config.image_token_index if image_id is None else image_id
    n = image_tokens(config) - (getattr(config, "vision_feature_select_strategy", "default") == "default")
    text = text_probe()["input_ids"]
    ids = torch.cat([text[:, :2], torch.full((1, n), image_id), text[:, 2:]], dim=1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": image_probe(config.vision_config)}


LLAVA = register_family(
    Family(
        name="llava",
        detect=_detect,
        groups={
            "vision": r"vision_tower\..*encoder\.layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "projector": r"multi_modal_projector\.linear_\d+$",
            "language": r"language_model\..*layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "head": r"(^|\.)lm_head$",
        },
        default_groups=("language",),
        route=route_image_and_text,
        forward=forward_vlm,
        prepare=_prepare,
        describe=_describe,
        image_groups=("vision", "projector"),
        token_sources={"language": ("image", "text"), "head": ("image", "text")},
        probe_batch=_probe_batch,
        priority=10,  # a LLaVA contains a LLaMA; the more specific family wins
    )
)
