"""transformers CLIPModel: modality routing, exactness at init, save/load, dry run."""

import warnings

import pytest
import torch
from conftest import clip_batches, module_inputs, tiny_clip

from corda_vl import CalibrationError, CordaConfig, build_corda, collect_covariances, load_corda, plan, save_corda
from corda_vl.families import detect_family

ALL = ["vision", "text", "projection"]


def features(model, batches):
    image = next(b for b in batches if "pixel_values" in b)
    text = next(b for b in batches if "input_ids" in b)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        img = base.get_image_features(pixel_values=image["pixel_values"]).pooler_output
        txt = base.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
    return img, txt


def test_clip_is_detected_with_three_groups():
    family = detect_family(tiny_clip())
    assert family.name == "hf_clip" and set(family.groups) == set(ALL)


def test_image_tower_covariance_equals_direct_computation():
    model, batches = tiny_clip(), clip_batches()
    store = collect_covariances(model, batches, groups=ALL, progress=False)
    name = "vision_model.encoder.layers.1.mlp.fc2"
    images = [b for b in batches if "pixel_values" in b]
    seen = module_inputs(model, name, lambda m, b: m.get_image_features(pixel_values=b["pixel_values"]), images)
    xs = torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])
    torch.testing.assert_close(store.sum(name), xs.T @ xs, rtol=1e-5, atol=1e-4)
    assert store.count(name) == 3 * 8 * 17  # 16 patches + class token per image


def test_towers_only_see_their_own_modality():
    model, batches = tiny_clip(), clip_batches()
    with pytest.warns(UserWarning, match="never called"):
        images_only = collect_covariances(model, [b for b in batches if "pixel_values" in b], groups=ALL, progress=False)
    assert all(not n.startswith("text") for n in images_only.modules)
    assert "visual_projection" in images_only.modules
    both = collect_covariances(model, batches, groups=ALL, progress=False)
    text_tokens = sum(int(b["attention_mask"].sum()) for b in batches if "input_ids" in b)
    assert both.count("text_model.encoder.layers.0.mlp.fc1") == text_tokens
    assert both.count("text_projection") == both.count("visual_projection") == 24
    for name in images_only.modules:  # adding text batches changed nothing in the image tower
        torch.testing.assert_close(both.sum(name), images_only.sum(name))


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_outputs_unchanged_at_init(mode):
    model, batches = tiny_clip(), clip_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the projections see only 24 pooled rows
        store = collect_covariances(model, batches, groups=ALL, progress=False)
    ref = features(model, batches)
    peft_model = build_corda(model, store, CordaConfig(r=4, mode=mode, groups=ALL), progress=False)
    for out, expected in zip(features(peft_model, batches), ref):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_save_load_and_dry_run_match_the_adapter(tmp_path):
    model, batches = tiny_clip(), clip_batches()
    store = collect_covariances(model, batches, progress=False)  # default groups: vision, text
    config = CordaConfig(r=4, target_modules=["q_proj", "v_proj", "fc2"])
    dry = plan(model, config, store)
    peft_model = build_corda(model, store, config, progress=False)
    adapted = sorted(n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert sorted(dry.modules) == adapted and len(adapted) == 12
    assert dry.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert {row.group for row in dry.rows} == {"vision", "text"}
    ref = features(peft_model, batches)
    save_corda(peft_model, tmp_path / "clip")
    loaded = load_corda(tmp_path / "clip")
    for out, expected in zip(features(loaded, batches), ref):
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def test_clip_batches_must_carry_images_or_texts():
    with pytest.raises(CalibrationError, match="pixel_values.*input_ids"):
        collect_covariances(tiny_clip(), [{"attention_mask": torch.ones(2, 3)}], progress=False)


def tiny_siglip(seed: int = 0):
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(seed)
    return SiglipModel(SiglipConfig(
        text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=16, patch_size=8))).eval()


def test_siglip_pooling_heads_are_the_projection_group_and_adapt_exactly(tmp_path):
    from peft import PeftModel
    from transformers import SiglipModel

    from corda_vl.targets import resolve_targets

    model, batches = tiny_siglip(), clip_batches()
    family = detect_family(model)
    heads = [t.name for t in resolve_targets(model, family, groups=["projection"])]
    assert heads == ["text_model.head", "vision_model.head.mlp.fc1", "vision_model.head.mlp.fc2"]  # not MHA's out_proj
    assert family.describe("vision_model.head.mlp.fc1", "projection") == "pooled image features"
    store = collect_covariances(model, batches, groups=ALL, progress=False)
    assert store.count("vision_model.head.mlp.fc1") == store.count("text_model.head") == 24  # one row per example
    ref = features(model, batches)
    peft_model = build_corda(model, store, CordaConfig(r=4, groups=ALL), progress=False)
    for out, expected in zip(features(peft_model, batches), ref):
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
    out = save_corda(peft_model, tmp_path / "siglip")
    stock = PeftModel.from_pretrained(SiglipModel.from_pretrained(out / "residual"), out / "adapter")
    for got, expected in zip(features(stock, batches), ref):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)


def test_siglip2_calibrates_on_naflex_batches_with_padding_patches_left_out():
    from transformers import Siglip2Config, Siglip2Model

    torch.manual_seed(0)
    model = Siglip2Model(Siglip2Config(
        text_config=dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                         max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           num_patches=16, patch_size=4))).eval()
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1::2, 12:] = 0  # two images of 3x4 patches, padded to 16
    shapes = torch.tensor([[4, 4], [3, 4], [4, 4], [3, 4]])
    image = {"pixel_values": torch.randn(4, 16, 48, generator=g), "pixel_attention_mask": mask,
             "spatial_shapes": shapes}
    text = next(b for b in clip_batches() if "input_ids" in b)
    assert detect_family(model).name == "hf_clip"
    store = collect_covariances(model, [image, text], progress=False)
    name = "vision_model.encoder.layers.0.mlp.fc1"
    seen = module_inputs(model, name, lambda m, b: m.get_image_features(**b), [image])[0]
    kept = seen[mask.bool()]
    assert store.count(name) == int(mask.sum()) == 56
    torch.testing.assert_close(store.sum(name), kept.T @ kept, rtol=1e-5, atol=1e-4)

    def image_features(m):
        with torch.no_grad():
            return m.get_image_features(**image).pooler_output

    ref = image_features(model)
    built = build_corda(model, store, CordaConfig(r=4), progress=False)
    torch.testing.assert_close(image_features(built.get_base_model()), ref, atol=2e-5, rtol=0)
