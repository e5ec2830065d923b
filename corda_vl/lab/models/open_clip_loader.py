"""open_clip models by (architecture, pretrained), the way open_clip users name them, ready for
corda_vl: converted so hooks and PEFT reach every attention projection (see
``corda_vl.families.open_clip_convert``), with open_clip's own tokenizer and eval transform."""

from __future__ import annotations

from pathlib import Path

import torch

from corda_vl.errors import CordaError


def load_open_clip(model_name: str, pretrained: str | None = None, *, convert: bool = True,
                   device: str | torch.device = "cpu"):
    """(model, tokenizer, preprocess) from ``open_clip.create_model_and_transforms``.

    ``pretrained``: an open_clip tag (downloads through the hub: needs network or a warm cache) or
    a local checkpoint file (``.safetensors`` preferred; ``.pt``/``.bin`` load with
    ``weights_only=True``, never a full unpickle). ``model_name`` is an open_clip architecture
    (``open_clip.list_models()``) or one added with ``open_clip.add_model_config(json_path)``.
    ``convert=True`` replaces nn.MultiheadAttention by explicit q/k/v/out Linear layers (outputs
    unchanged), which calibration and adapters need.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise CordaError(f"open_clip has no architecture {model_name!r}; see open_clip.list_models() or register "
                         f"a JSON config with open_clip.add_model_config(path).")
    if pretrained is not None and Path(pretrained).suffix and not Path(pretrained).is_file():
        raise CordaError(f"checkpoint file {pretrained!r} does not exist.")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device,
                                                                 weights_only=True)
    tokenizer = open_clip.get_tokenizer(model_name)
    if convert:
        from corda_vl.families.open_clip_convert import convert_open_clip

        convert_open_clip(model)
    return model.eval(), tokenizer, preprocess
