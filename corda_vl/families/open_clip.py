"""open_clip CLIP models, after :func:`convert_open_clip`.

Groups: ``vision`` (``visual.transformer.resblocks.N``: attn q/k/v/out, mlp c_fc/c_proj; for a
timm tower such as ConvNeXt, its trunk's Linear layers and its head's projection; a ResNet tower
has none that can be adapted, so there only ``text`` and ``projection`` apply) <- images; ``text`` (``transformer.resblocks.N``) <- texts, padding (token id 0 after the end
token) masked; ``projection`` (``visual.proj.linear``, ``text_projection.linear``) <- pooled
features. Batches: ``{"pixel_values" or "image": images}`` and/or ``{"input_ids" or "text":
tokens from open_clip's tokenizer}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from corda_vl.errors import CalibrationError, TargetError
from corda_vl.families.base import Family, Routes, clip_describe, register_family
from corda_vl.families.open_clip_convert import is_converted

PAD_ID = 0


def _detect(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("encode_image", "encode_text", "visual", "transformer"))


def _validate(model: nn.Module) -> None:
    if not is_converted(model):
        raise TargetError("this open_clip model still uses nn.MultiheadAttention, whose q/k/v/out_proj "
                          "hooks and PEFT cannot reach. Convert it first: "
                          "corda_vl.families.open_clip_convert.convert_open_clip(model).")


def _prepare(model, batch: Any) -> dict[str, Any]:
    if isinstance(batch, torch.Tensor):
        batch = {"image": batch} if batch.dim() == 4 else {"text": batch}
    images = batch.get("pixel_values", batch.get("image"))
    texts = batch.get("input_ids", batch.get("text"))
    if images is None and texts is None:
        raise CalibrationError("an open_clip batch needs images ('pixel_values' or 'image') and/or "
                               "tokens ('input_ids' or 'text', from open_clip's tokenizer).")
    return {k: v for k, v in (("image", images), ("text", texts)) if v is not None}


def _route(model, batch: Mapping[str, Any]) -> Routes:
    routes: Routes = {"projection": {"": None}}
    if "image" in batch:
        routes["vision"] = {"": None}
    if "text" in batch:
        routes["text"] = {"": batch["text"] != PAD_ID}
    return routes


def _forward(model, batch: Mapping[str, Any]):
    if "image" in batch:
        model.encode_image(batch["image"])
    if "text" in batch:
        model.encode_text(batch["text"])



BLOCK = r"transformer\.resblocks\.\d+\.(attn\.(q|k|v|out)_proj|mlp\.c_(fc|proj))$"
# timm towers (ConvNeXt, timm ViTs): the Linear layers their forward calls as modules. ModifiedResNet's
# attention pool is left out: it hands its q/k/v/c_proj weights to F.multi_head_attention_forward,
# so an adapter on them would never run.
TIMM = r"(trunk\..*\.(attn\.(qkv|proj)|mlp\.fc\d)|head\.(proj|mlp\.fc\d))$"

OPEN_CLIP = register_family(
    Family(
        name="open_clip",
        detect=_detect,
        groups={"vision": r"^visual\.(" + BLOCK + "|" + TIMM + ")", "text": r"^" + BLOCK,
                "projection": r"^(visual\.proj\.linear|text_projection\.linear|text_projection)$"},
        default_groups=("vision", "text"),
        image_groups=("vision",),
        route=_route,
        forward=_forward,
        prepare=_prepare,
        describe=clip_describe,
        validate=_validate,
    )
)
