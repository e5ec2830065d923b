"""Idefics3 and SmolVLM: vision encoder, connector as the projector, image-token and text-token
covariances in the text model; exact at init, dry run equal to the build, stock-PEFT reload."""

import pytest
import torch
import transformers
from conftest import assert_exact_at_init_and_stock_reload, assert_image_text_split

from corda_vl import CordaConfig, collect_covariances
from corda_vl.families import detect_family

IMAGE = 90
GROUPS = ["vision", "projector", "language"]


def tiny_idefics3(seed: int = 0, kind: str = "Idefics3"):
    """Idefics3, or SmolVLM (``kind="SmolVLM"``, the same layout)."""
    torch.manual_seed(seed)
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, model_type="llama")
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)  # 4 patches; scale_factor 1: 4 image tokens per image
    config = getattr(transformers, f"{kind}Config")(text_config=text, vision_config=vision, image_token_id=IMAGE,
                                                    scale_factor=1)
    return getattr(transformers, f"{kind}ForConditionalGeneration")(config).eval()


def batches(n: int = 3, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 89, (2, 10), generator=g)
        ids[:, 1:5] = IMAGE
        ids[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": (ids != 0).long(),
                    "pixel_values": torch.randn(2, 1, 3, 16, 16, generator=g)})
    return out


@pytest.mark.parametrize("kind", ["Idefics3", "SmolVLM"])
def test_routing_exactness_and_stock_reload(kind, tmp_path):
    model, data = tiny_idefics3(kind=kind), batches()
    assert detect_family(model).name == "idefics3"
    store = collect_covariances(model, data, groups=GROUPS, progress=False)
    assert store.count("model.vision_model.encoder.layers.0.mlp.fc1") == 3 * 2 * 4
    assert store.count("model.connector.modality_projection.proj") == 3 * 2 * 4
    assert_image_text_split(model, store, "model.text_model.layers.1.mlp.down_proj", data, IMAGE, 3 * 2 * 4)
    adapted = assert_exact_at_init_and_stock_reload(model, store, CordaConfig(r=4, groups=GROUPS), data[0],
                                                    tmp_path / kind)
    assert len(adapted) == 6 + 1 + 14
