"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: image-token and text-token covariances in the language model, the vision blocks
(fused qkv) and the patch merger as the projector; exact at init, stock-PEFT reload, text-only
calibration allowed with a warning."""

import pytest
import torch
import transformers
from conftest import assert_exact_at_init_and_stock_reload, assert_image_text_split

from corda_vl import CalibrationError, CordaConfig, collect_covariances
from corda_vl.families import detect_family

IMAGE, VIDEO, START, END = 90, 91, 92, 93
GROUPS = ["vision", "projector", "language"]


def tiny_qwen2_vl(seed: int = 0, version: str = "2"):
    """Qwen2-VL; Qwen2.5-VL (gated vision MLP, windowed attention) with ``version="2.5"``; Qwen3-VL
    (Qwen3 text, deepstack mergers) with ``version="3"``."""
    torch.manual_seed(seed)
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    tokens = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    if version == "3":  # Qwen3 text, deepstack mergers
        text = dict(text, head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                     "mrope_interleaved": True})
        vision = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=1, num_position_embeddings=16,
                      deepstack_visual_indexes=[0])
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **tokens)
        return transformers.Qwen3VLForConditionalGeneration(config).eval()
    if version == "2.5":
        vision = dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=1, fullatt_block_indexes=[0], window_size=8)
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
        return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=1)
    config = transformers.Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    return transformers.Qwen2VLForConditionalGeneration(config).eval()


def batches(n: int = 3, seed: int = 5):
    """What the processor gives for two 16x16 images (16 patches of 4x4, merged 2x2 into 4 image
    tokens each) in two prompts, the second right-padded."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 89, (2, 12), generator=g)
        ids[:, 1], ids[:, 2:6], ids[:, 6] = START, IMAGE, END
        ids[1, 10:] = 0
        out.append({"input_ids": ids, "attention_mask": (ids != 0).long(),
                    "pixel_values": torch.randn(32, 48, generator=g), "image_grid_thw": torch.tensor([[1, 4, 4]] * 2),
                    "mm_token_type_ids": (ids == IMAGE).long()})
    return out


@pytest.fixture(scope="module")
def store():
    return collect_covariances(tiny_qwen2_vl(), batches(), groups=GROUPS, progress=False)


def test_detected_with_its_groups(store):
    model = tiny_qwen2_vl()
    assert detect_family(model).name == "qwen2_vl"
    assert "model.visual.blocks.0.attn.qkv" in store.modules and "model.visual.merger.mlp.0" in store.modules


def test_image_and_text_token_covariances_add_up_to_all_tokens(store):
    assert_image_text_split(tiny_qwen2_vl(), store, "model.language_model.layers.1.mlp.down_proj", batches(), IMAGE,
                            3 * 2 * 4)
    assert store.count("model.visual.blocks.0.mlp.fc1") == 3 * 32  # every patch of every image
    assert store.count("model.visual.merger.mlp.0") == 3 * 8  # merged 2x2
    assert {s for (k, s) in store.sums if ".visual." in k} == {"calib"}


@pytest.mark.parametrize("method, mode", [("corda", "kpm"), ("corda", "ipm"), ("corda++", "kpm")])
def test_exact_at_init_dry_run_and_stock_peft_reload(store, method, mode, tmp_path):
    config = CordaConfig(method=method, mode=mode, r=4, groups=GROUPS)
    adapted = assert_exact_at_init_and_stock_reload(tiny_qwen2_vl(), store, config, batches()[0], tmp_path / "qwen")
    assert len(adapted) == 4 + 2 + 14


def test_text_only_calibration_warns_and_image_tokens_without_images_are_refused():
    model, data = tiny_qwen2_vl(), batches()
    text_only = [{"input_ids": b["input_ids"].masked_fill(b["input_ids"] == IMAGE, 7),
                  "attention_mask": b["attention_mask"]} for b in data]
    with pytest.warns(UserWarning, match="saw no image tokens"):
        collect_covariances(model, text_only, progress=False)
    with pytest.raises(CalibrationError, match="image tokens but no 'pixel_values'"):
        collect_covariances(model, [{"input_ids": data[0]["input_ids"]}], progress=False)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())  # nothing left behind


@pytest.mark.parametrize("version, vision_layers", [
    ("2.5", {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.gate_proj", "blocks.0.mlp.up_proj",
             "blocks.0.mlp.down_proj", "merger.mlp.0", "merger.mlp.2"}),
    ("3", {f"blocks.{i}.{m}" for i in (0, 1) for m in ("attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")}
     | {"merger.linear_fc1", "merger.linear_fc2", "deepstack_merger_list.0.linear_fc1",
        "deepstack_merger_list.0.linear_fc2"}),
])
def test_later_versions_are_adapted_exactly(version, vision_layers, tmp_path):
    model, data = tiny_qwen2_vl(version=version), batches()
    assert detect_family(model).name == "qwen2_vl"
    store = collect_covariances(model, data, groups=GROUPS, progress=False)
    assert {n.removeprefix("model.visual.") for n in store.modules if ".visual." in n} == vision_layers
    assert_exact_at_init_and_stock_reload(model, store, CordaConfig(r=4, groups=GROUPS), data[0], tmp_path / "qwen")
