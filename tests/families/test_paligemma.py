"""PaliGemma and Gemma 3: SigLIP vision tower, projector, Gemma language model with image-token
and text-token covariances; exact at init, dry run equal to the build, stock-PEFT reload."""

import pytest
import torch
import transformers
from conftest import assert_exact_at_init_and_stock_reload, assert_image_text_split

from corda_vl import CordaConfig, TargetError, collect_covariances
from corda_vl.families import detect_family

IMAGE = 90
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, head_dim=8)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
              patch_size=8)  # 4 patches, 4 image tokens per image


def tiny(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "paligemma":
        config = transformers.PaliGemmaConfig(text_config=dict(TEXT, model_type="gemma"), vision_config=VISION,
                                              image_token_index=IMAGE, projection_dim=32)
        return transformers.PaliGemmaForConditionalGeneration(config).eval()
    config = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                       image_token_index=IMAGE, boi_token_index=91, eoi_token_index=92)
    return transformers.Gemma3ForConditionalGeneration(config).eval()


def batches(n: int = 3, seed: int = 5):
    """Two prompts of one image each (4 image tokens first, as PaliGemma's processor puts them)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 89, (2, 10), generator=g)
        ids[:, :4] = IMAGE
        ids[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids),
                    "pixel_values": torch.randn(2, 3, 16, 16, generator=g)})
    return out


@pytest.mark.parametrize("kind, projector", [("paligemma", ["model.multi_modal_projector.linear"]), ("gemma3", [])])
def test_routing_exactness_and_stock_reload(kind, projector, tmp_path):
    model, data = tiny(kind), batches()
    assert detect_family(model).name == "paligemma"
    groups = ["vision", "language"] + (["projector"] if projector else [])
    store = collect_covariances(model, data, groups=groups, progress=False)
    assert [n for n in store.modules if "multi_modal_projector" in n] == projector
    assert store.count("model.vision_tower.encoder.layers.0.mlp.fc1") == 3 * 2 * 4  # patches of every image
    assert_image_text_split(model, store, "model.language_model.layers.1.mlp.down_proj", data, IMAGE, 3 * 2 * 4)
    assert_exact_at_init_and_stock_reload(model, store, CordaConfig(r=4, groups=groups), data[0], tmp_path / kind)


def test_gemma3s_bare_projection_weight_is_named_when_the_projector_is_asked_for():
    model = tiny("gemma3")
    with pytest.raises(TargetError, match=r"group 'projector' matches no nn.Linear.*\['vision', 'language'"):
        collect_covariances(model, batches(), groups=["projector"], progress=False)
