"""Save / load / convert CorDA models.

``save_corda(model, out)`` writes::

    out/residual/      the base model with W_res in place of W (``from_pretrained`` loads it; for
                       models without ``save_pretrained``, e.g. open_clip: model.safetensors, a
                       state dict that ``load_corda(out, base_model=...)`` loads into a fresh model)
    out/adapter/       a stock PEFT adapter folder (``PeftModel.from_pretrained(residual, ...)``)
    out/corda_vl.json  how it was built (method, source, damping and rank per module)

Folders are written to a temporary sibling and renamed into place, so an interrupted save never
leaves a half-written folder, and an existing non-empty folder is only replaced on request.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from corda_vl.adapters.record import BuildRecord, build_record, register_record
from corda_vl.atomic import atomic_dir
from corda_vl.errors import CacheError, CordaError

FORMAT = "corda_vl.adapter"
VERSION = 1


def _residual_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The base model's state dict under its original names, without adapter tensors."""
    state = {}
    for key, value in peft_model.get_base_model().state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def _save_residual(peft_model: PeftModel, path: Path, tokenizer: Any = None) -> str:
    """Write the residual base; return its format: 'transformers' or 'state_dict'."""
    base = peft_model.get_base_model()
    state = _residual_state_dict(peft_model)
    if hasattr(base, "save_pretrained"):
        base.save_pretrained(path, state_dict=state)
        kind = "transformers"
    else:
        from safetensors.torch import save_file

        path.mkdir(parents=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, path / "model.safetensors")
        kind = "state_dict"
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(path)
    return kind


def save_corda(peft_model: PeftModel, out_dir: str | os.PathLike, *, tokenizer: Any = None,
               overwrite: bool = False) -> Path:
    """Write ``residual/``, ``adapter/`` and ``corda_vl.json`` under ``out_dir`` (see module doc)."""
    if not isinstance(peft_model, PeftModel):
        raise CordaError("save_corda expects the PeftModel returned by build_corda or load_corda.")
    record = build_record(peft_model)
    with atomic_dir(out_dir, overwrite) as tmp:
        residual_format = _save_residual(peft_model, tmp / "residual", tokenizer)
        peft_model.save_pretrained(tmp / "adapter")
        meta = {"format": FORMAT, "version": VERSION, "residual_format": residual_format,
                "base_class": type(peft_model.get_base_model()).__name__,
                "adapter_name": peft_model.active_adapter,
                "build": record.to_dict() if record is not None else None}
        (tmp / "corda_vl.json").write_text(json.dumps(meta, indent=2))
    return Path(out_dir)


def _read_meta(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "corda_vl.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CacheError(f"{out_dir} is not a corda_vl folder (no corda_vl.json); was it written by save_corda?") from None
    except json.JSONDecodeError as exc:
        raise CacheError(f"{path} is corrupted ({exc}); save the model again.") from exc
    if meta.get("format") != FORMAT:
        raise CacheError(f"{path} is not a corda_vl adapter description.")
    return meta


def _load_transformers_residual(out: Path, meta: dict[str, Any], dtype) -> torch.nn.Module:
    import transformers

    model_cls = getattr(transformers, meta["base_class"], None)
    if model_cls is None:
        raise CacheError(f"transformers has no class {meta['base_class']!r}; upgrade transformers.")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return model_cls.from_pretrained(out / "residual", **kwargs)


def _load_state_dict_residual(out: Path, meta: dict[str, Any], base_model: torch.nn.Module | None) -> torch.nn.Module:
    from safetensors.torch import load_file

    if base_model is None:
        raise CordaError(
            f"{out} holds a {meta['base_class']} residual as a plain state dict; pass base_model= a freshly "
            f"built model of the same architecture (for open_clip: "
            f"convert_open_clip(open_clip.create_model(...)))."
        )
    try:
        base_model.load_state_dict(load_file(out / "residual" / "model.safetensors"), strict=True)
    except RuntimeError as exc:
        raise CacheError(f"the residual in {out} does not fit base_model ({exc}).") from exc
    return base_model


def load_corda(out_dir: str | os.PathLike, *, base_model: torch.nn.Module | None = None,
               dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
               is_trainable: bool = False) -> PeftModel:
    """Load what :func:`save_corda` wrote: the residual base with the adapter attached.

    ``base_model`` is only needed for residuals saved as plain state dicts (models without
    ``save_pretrained``, such as open_clip): the weights are loaded into it."""
    out = Path(out_dir)
    meta = _read_meta(out)
    if meta.get("residual_format", "transformers") == "transformers":
        base = _load_transformers_residual(out, meta, dtype)
    else:
        base = _load_state_dict_residual(out, meta, base_model)
    if device is not None:
        base = base.to(device)
    name = meta.get("adapter_name", "default")
    adapter_dir = out / "adapter" if name == "default" else out / "adapter" / name  # PEFT nests non-default names
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name, is_trainable=is_trainable)
    if meta.get("build"):
        register_record(model, BuildRecord.from_dict(meta["build"]))
    return model


def export_lora(trained: PeftModel, initial_adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                *, overwrite: bool = False) -> Path:
    """Convert a trained CorDA/PiSSA adapter into a plain LoRA for the *original* base model.

    Uses PEFT's own conversion (``save_pretrained(path_initial_model_for_weight_conversion=...)``):
    ``Delta W = s (B A - B0 A0)``, stored as a LoRA of twice the rank. ``initial_adapter_dir`` is
    the ``adapter/`` folder save_corda wrote *before* training; it is copied, never modified.
    """
    initial = Path(initial_adapter_dir)
    if not (initial / "adapter_config.json").is_file():
        raise CacheError(f"{initial} has no adapter_config.json; pass the adapter/ folder save_corda wrote before training.")
    adapter = trained.active_adapter
    with tempfile.TemporaryDirectory() as scratch, atomic_dir(out_dir, overwrite) as tmp:
        init_copy = Path(scratch) / "corda_initial"
        shutil.copytree(initial, init_copy)
        trained.save_pretrained(tmp, selected_adapters=[adapter],
                                path_initial_model_for_weight_conversion=str(init_copy))
        if adapter != "default":  # PEFT nests non-default adapters in a sub-folder
            for item in (tmp / adapter).iterdir():
                os.replace(item, tmp / item.name)
            (tmp / adapter).rmdir()
    return Path(out_dir)

