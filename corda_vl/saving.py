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

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from corda_vl.adapters.record import BuildRecord, adapter_digest, build_record, register_record
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


CHECKED_FILES = ("residual/*.safetensors", "adapter/**/adapter_model.safetensors", "adapter/**/adapter_config.json")
"""What load_corda checks against the SHA-256 that save_corda recorded: the weights and the adapter's config."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digests(root: Path) -> dict[str, str]:
    """{path relative to ``root``: SHA-256} of the files load_corda checks."""
    found = sorted({p for pattern in CHECKED_FILES for p in root.glob(pattern) if p.is_file()})
    return {p.relative_to(root).as_posix(): _sha256(p) for p in found}


def _verify_files(out: Path, meta: dict[str, Any]) -> None:
    recorded = meta.get("files")
    if recorded is None:  # written before checksums were recorded: nothing to compare with
        return
    now = file_digests(out)
    changed = sorted(k for k in recorded if k in now and now[k] != recorded[k])
    missing = sorted(set(recorded) - set(now))
    extra = sorted(set(now) - set(recorded))
    if changed or missing or extra:
        parts = [f"{what}: {names}" for what, names in (("changed", changed), ("missing", missing), ("added", extra))
                 if names]
        raise CacheError(f"{out}: files differ from what save_corda wrote ({'; '.join(parts)}). The residual, the "
                         f"adapter weights and its config must stay as saved, or the model is not the one built. Save "
                         f"again, or pass verify=False if you changed them on purpose.")


def _verify_layers(model: PeftModel, record: BuildRecord, name: str, out: Path) -> None:
    """Every recorded module is adapted with its recorded rank and scaling, and nothing else is."""
    layers = {n: m for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A") and name in m.lora_A}
    wrong = sorted(set(record.modules) ^ set(layers))
    for n, info in record.modules.items():
        if n in layers:
            layer = layers[n]
            if layer.r[name] != info["rank"] or abs(layer.scaling[name] - info["alpha"] / info["rank"]) > 1e-9:
                wrong.append(f"{n} (rank {layer.r[name]}, scaling {layer.scaling[name]:g}; saved rank {info['rank']}, "
                             f"alpha {info['alpha']:g})")
    if wrong:
        raise CacheError(f"{out}: the adapter does not match the build it was saved with: {wrong[:4]}"
                         f"{' ...' if len(wrong) > 4 else ''}. Was adapter/adapter_config.json edited? Save again.")


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
                "build": record.to_dict() if record is not None else None, "files": file_digests(tmp)}
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
               is_trainable: bool = False, verify: bool = True) -> PeftModel:
    """Load what :func:`save_corda` wrote: the residual base with the adapter attached.

    ``base_model`` is only needed for residuals saved as plain state dicts (models without
    ``save_pretrained``, such as open_clip): the weights are loaded into it. ``verify``: refuse
    files that differ from the SHA-256 recorded at save (a residual swapped for the original base,
    an edited adapter config, flipped bytes) and an adapter whose ranks or scalings differ from the
    recorded build."""
    out = Path(out_dir)
    meta = _read_meta(out)
    if verify:
        _verify_files(out, meta)
    name = meta.get("adapter_name", "default")
    adapter_dir = out / "adapter" if name == "default" else out / "adapter" / name  # PEFT nests non-default names
    try:
        if meta.get("residual_format", "transformers") == "transformers":
            base = _load_transformers_residual(out, meta, dtype)
        else:
            base = _load_state_dict_residual(out, meta, base_model)
        if device is not None:
            base = base.to(device)
        model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name, is_trainable=is_trainable)
    except CordaError:
        raise
    except Exception as exc:  # transformers / PEFT / safetensors name neither the folder nor the remedy
        raise CacheError(f"cannot load {out} ({type(exc).__name__}: {exc}). A file in residual/ or adapter/ is "
                         f"missing, truncated or not written by save_corda; save the model again.") from exc
    if meta.get("build"):
        record = BuildRecord.from_dict(meta["build"])
        if verify:
            _verify_layers(model, record, name, out)
        register_record(model, record)
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
    record = build_record(trained)
    if record is not None and record.init_digest is not None:
        from safetensors.torch import load_file

        weights = initial / "adapter_model.safetensors"
        if not weights.is_file() or adapter_digest(load_file(weights)) != record.init_digest:
            raise CacheError(f"{initial} is not the initial adapter of this model (its weights differ from the ones "
                             f"it was built with); the export would be a wrong LoRA. Pass the adapter/ folder that "
                             f"save_corda wrote for this build before training.")
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

