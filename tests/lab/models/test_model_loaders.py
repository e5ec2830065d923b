"""Real-checkpoint loaders on local files: open_clip (architecture, checkpoint) and LLaVA folders."""

import json

import pytest
import torch
from conftest import tiny_open_clip

from corda_vl import CordaError
from corda_vl.lab.models import load_open_clip

TINY = {"embed_dim": 24, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "head_width": 8, "patch_size": 4},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}


def test_open_clip_from_a_local_safetensors_checkpoint(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    (tmp_path / "corda-tiny-vit.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(tmp_path / "corda-tiny-vit.json")
    reference = tiny_open_clip()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "tiny.safetensors")
    model, tokenizer, preprocess = load_open_clip("corda-tiny-vit", str(tmp_path / "tiny.safetensors"))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = tokenizer(["a photo of a cat", "a dog"])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.encode_text(text), reference.encode_text(text), atol=1e-6, rtol=0)
    assert any(type(m).__name__ == "ExplicitAttention" for m in model.modules())  # converted for adapters
    assert callable(preprocess)
    with pytest.raises(CordaError, match="no architecture"):
        load_open_clip("not-a-model")
    with pytest.raises(CordaError, match="does not exist"):
        load_open_clip("corda-tiny-vit", str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("loader", ["load_llama", "load_clip", "load_llava"])
def test_a_missing_model_path_says_so(tmp_path, loader):
    import corda_vl.lab.models as models

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(CordaError, match=f"model path '{missing}' does not exist"):
        getattr(models, loader)(missing)
