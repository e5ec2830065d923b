"""transformers ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model`` (dual encoders with the same layout).

Groups: ``vision`` (vision_model encoder Linears) <- images, ``text`` (text_model encoder
Linears) <- texts (padding masked), ``projection`` (``visual_projection`` <- pooled image
features, ``text_projection`` <- pooled text features; SigLIP: ``vision_model.head.mlp`` <- the
attention-pooled image state, ``text_model.head`` <- the pooled text state). A batch may carry images
(``pixel_values``), texts (``input_ids`` + ``attention_mask``) or both; each tower only ever
runs on its own modality, so the text tower receives no image statistics and vice versa. SigLIP 2
batches carry ``pixel_attention_mask`` and ``spatial_shapes`` (its processor's NaFlex output): both
reach the model, and padding patches are left out of the vision covariances.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from corda_vl.errors import CalibrationError
from corda_vl.families.base import (Family, check_pixels, Routes, clip_describe, has_module, image_probe, register_family, tensor_dict,
                                    text_mask, text_probe)

KEYS = ("pixel_values", "input_ids", "attention_mask", "pixel_attention_mask", "spatial_shapes")
NAFLEX = ("pixel_attention_mask", "spatial_shapes")  # SigLIP 2: patches padded to a fixed count


def _detect(model) -> bool:
    return (has_module(model, r"^vision_model\.encoder\.layers\.\d+\.self_attn\.q_proj$")
            and has_module(model, r"^text_model\.encoder\.layers\.\d+\.self_attn\.q_proj$"))


def _prepare(model, batch: Any) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"pixel_values": batch} if batch.dim() == 4 else {"input_ids": batch}
    out = tensor_dict(batch, KEYS)
    if "pixel_values" not in out and "input_ids" not in out:
        raise CalibrationError("a CLIP batch needs 'pixel_values' (images) and/or 'input_ids' (texts).")
    if "attention_mask" in out and "input_ids" not in out:
        del out["attention_mask"]
    if "pixel_values" not in out:
        for key in NAFLEX:
            out.pop(key, None)
    if "pixel_values" in out:
        check_pixels(out["pixel_values"])
    return out


def _route(model, batch: Mapping[str, Any]) -> Routes:
    routes: Routes = {}
    if "pixel_values" in batch:  # every patch token (and CLIP's class token); SigLIP 2's padding patches masked
        mask = batch.get("pixel_attention_mask")
        routes["vision"] = {"": None if mask is None else mask.bool()}
    if "input_ids" in batch:
        routes["text"] = {"": text_mask(batch)}
    routes["projection"] = {"": None}  # pooled features, one row per example
    return routes


def _forward(model, batch: Mapping[str, Any]):
    if "pixel_values" in batch:
        model.get_image_features(pixel_values=batch["pixel_values"], **{k: batch[k] for k in NAFLEX if k in batch})
    if "input_ids" in batch:
        model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))



HF_CLIP = register_family(
    Family(
        name="hf_clip",
        detect=_detect,
        groups={
            "vision": r"^vision_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            "text": r"^text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\.[^.]+$",
            # SigLIP pools with heads instead: the text head and the image head's MLP. Its attention
            # (nn.MultiheadAttention) reads out_proj's weight directly, so an adapter there would
            # never run: it is left out on purpose.
            "projection": r"^(visual_projection|text_projection|text_model\.head|vision_model\.head\.mlp\.fc\d)$",
        },
        default_groups=("vision", "text"),
        route=_route,
        forward=_forward,
        prepare=_prepare,
        describe=clip_describe,
        image_groups=("vision",),
        probe_batch=lambda model: {"pixel_values": image_probe(model.config.vision_config), **text_probe()},
    )
)
