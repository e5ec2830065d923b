"""What a model family tells the toolkit: its module groups, how to run a calibration batch, and
how each batch's tokens are routed (by mask) to covariance sources per group.

Adding a family = one small file that builds a :class:`Family` and calls :func:`register_family`.
"""

from __future__ import annotations

import difflib
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from corda_vl.errors import CalibrationError, UnknownFamilyError

# group -> {source suffix: token mask (bool, shaped like the module input without its last dim)
# or None for "every token"}. The suffix "" means the calibration source itself.
Routes = dict[str, dict[str, "torch.Tensor | None"]]


@dataclass(frozen=True)
class Family:
    name: str
    detect: Callable[[nn.Module], bool]
    groups: Mapping[str, str]
    """group name -> regex searched in module names; only nn.Linear modules are candidates."""
    default_groups: tuple[str, ...]
    route: Callable[[nn.Module, Mapping[str, Any]], Routes]
    """(model, prepared batch) -> token masks per group and source suffix."""
    forward: Callable[[nn.Module, Mapping[str, Any]], Any]
    """Runs one prepared batch through the model (no grad, outputs ignored)."""
    prepare: Callable[[nn.Module, Any], dict[str, Any]]
    """(model, what the user's iterable yields: dict, BatchEncoding, tensor) -> dict of tensors."""
    describe: Callable[[str, str], str] = lambda name, group: group
    """(module name, group) -> which calibration data reaches it, for the dry-run plan."""
    validate: Callable[[nn.Module], None] | None = None
    """Raises when the model must be prepared first (e.g. open_clip attention not converted)."""
    task_type: str | None = None
    """PEFT task type of the wrapped model (e.g. "CAUSAL_LM"), None for a plain PeftModel."""
    priority: int = 0
    """Higher wins when several families recognise a model (LLaVA contains a LLaMA)."""
    image_groups: tuple[str, ...] = ()
    """Groups fed by image patches: the memory planner sizes them by images, not text tokens."""
    token_sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """group -> the source suffixes its routing splits tokens into (LLaVA's language: image, text).
    Calibration warns when one of them received no token (a VLM calibrated on text only)."""
    probe_batch: Callable[[nn.Module], dict[str, Any]] | None = None
    """(model built from a shrunk config) -> one small batch the memory planner calibrates it on,
    to see which modules share an input. None: the plan assumes no sharing and says so."""

    def group_of(self, module_name: str) -> str | None:
        for group, pattern in self.groups.items():
            if re.search(pattern, module_name):
                return group
        return None


_REGISTRY: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    _REGISTRY[family.name] = family
    return family


def registered_families() -> list[str]:
    return sorted(_REGISTRY)


def get_family(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownFamilyError(f"no model family named {name!r}; registered: {registered_families()}.") from None


def detect_family(model: nn.Module) -> Family:
    """The highest-priority registered family that recognises ``model``."""
    matches = [f for f in _REGISTRY.values() if f.detect(model)]
    if not matches:
        raise UnknownFamilyError(f"{type(model).__name__} is not a model family corda_vl knows{_why_unknown(model)} "
                                 f"(registered: {registered_families()}). Add one: build a corda_vl.families.Family "
                                 f"(groups, routing, forward) and pass it to corda_vl.families.register_family.")
    return max(matches, key=lambda f: f.priority)


def is_vision_language(model: nn.Module) -> bool:
    """Whether the model's config has a vision part (``vision_config``): its language layers then
    see image tokens too, so a text-only family must not claim it."""
    return getattr(getattr(model, "config", None), "vision_config", None) is not None


def _why_unknown(model: nn.Module) -> str:
    """What the error can say about a model no family recognises."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if is_vision_language(model):
        return (f": it is a vision-language model (model_type {model_type!r}) in a layout no registered family "
                f"describes, and adapting it as a text-only model would leave out its image tokens and vision layers")
    if any(type(m).__name__ == "Conv1D" for m in model.modules()):
        return (": its projections are transformers Conv1D layers (GPT-2 style), in a layout other than "
                "GPT-2's blocks (h.N.attn.c_attn, ...)")
    return ""


def has_module(model: nn.Module, pattern: str) -> bool:
    regex = re.compile(pattern)
    return any(regex.search(name) for name, _ in model.named_modules())


def tensor_dict(batch: Any, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A plain dict from a dict / BatchEncoding, keeping only ``keys`` when given. Other keys are
    dropped (collators add ``labels`` and the like), except a near miss of a known one: a typo
    such as ``attention_masks`` would silently count the padding."""
    if isinstance(batch, torch.Tensor):
        raise TypeError("expected a dict of tensors")
    items = dict(batch.items()) if hasattr(batch, "items") else dict(batch)
    if keys is not None:
        for key in items:
            close = difflib.get_close_matches(str(key), [k for k in keys if k not in items], n=1, cutoff=0.8)
            if key not in keys and close:
                raise CalibrationError(f"the batch has {key!r}, which is not an input of this model; did you mean "
                                       f"{close[0]!r}? (inputs read: {', '.join(keys)})")
        items = {k: v for k, v in items.items() if k in keys}
    return items


def check_pixels(pixel_values: torch.Tensor) -> None:
    """Images as the model's processor makes them: floating point, normalised. Raw 0-255 values
    would run, and give a meaningless covariance."""
    if not pixel_values.is_floating_point():
        raise CalibrationError(f"pixel_values are {pixel_values.dtype} (raw images); pass what the model's image "
                               f"processor returns: normalised floats.")
    peak = float(pixel_values.abs().max()) if pixel_values.numel() else 0.0
    if peak > 20:
        warnings.warn(f"pixel_values reach {peak:.0f}: they look like 0-255 images, not "
                      f"normalised ones (|x| of a few units). Run the model's image processor on them.", stacklevel=4)


def prepare_vlm_batch(batch: Any, keys: tuple[str, ...], media_tokens: list[int], model_name: str,
                      pixel_keys: tuple[str, ...] = ("pixel_values",)) -> dict[str, Any]:
    """A vision-language batch as the processor makes it: ``input_ids`` always, and images
    (``pixel_keys``) wherever the ids hold image tokens (``media_tokens``), as normalised floats."""
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    out = tensor_dict(batch, keys)
    if "input_ids" not in out:
        raise CalibrationError(f"a {model_name} batch needs 'input_ids' (with the image tokens the processor inserts) "
                               f"and, with images, {' / '.join(map(repr, pixel_keys))}; build it with the model's "
                               f"processor.")
    media = torch.isin(out["input_ids"], torch.tensor(media_tokens, device=out["input_ids"].device))
    if bool(media.any()) and not any(k in out for k in pixel_keys):
        raise CalibrationError(f"the batch has image tokens but no {pixel_keys[0]!r}; pass the processor's images "
                               f"with it.")
    for key in pixel_keys:
        if key in out:
            check_pixels(out[key])
    return out


def text_mask(batch: Mapping[str, Any]) -> torch.Tensor:
    """Which tokens count: attention_mask (padding excluded), or every token without one."""
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    return mask.bool()


def clip_describe(name: str, group: str) -> str:
    """What feeds each CLIP module (transformers and open_clip name their projections alike:
    ``visual...`` / ``text...``)."""
    if group == "projection":
        return "pooled image features" if name.startswith(("visual", "vision_model")) else "pooled text features"
    return "image patches" if group == "vision" else "text tokens"


def text_probe() -> dict[str, torch.Tensor]:
    """A short fixed text batch for the memory planner's probe."""
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 2]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def image_probe(vision_config) -> torch.Tensor:
    """One seeded image of the vision config's size for the memory planner's probe."""
    gen = torch.Generator().manual_seed(0)
    size = vision_config.image_size
    return torch.randn(1, getattr(vision_config, "num_channels", 3), size, size, generator=gen)


def image_tokens(config) -> int:
    """Patch tokens per image (+1 class token) from a (vision) config; 0 without one."""
    vision = getattr(config, "vision_config", config)
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    return (size // patch) ** 2 + 1 if size and patch else 0


def batch_to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors moved to ``device`` (other entries as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
