"""LLaVA: image / text token covariances, vision and projector routing, exactness, save/load."""

import pytest
import torch
from conftest import IMAGE_TOKEN, PATCHES, llava_batches, module_inputs, tiny_llava

from corda_vl import CalibrationError, CordaConfig, build_corda, collect_covariances, load_corda, plan, save_corda
from corda_vl.families import detect_family

GROUPS = ["vision", "projector", "language"]


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def store():
    return collect_covariances(tiny_llava(), llava_batches(), groups=GROUPS, progress=False)


def test_llava_wins_over_llama():
    assert detect_family(tiny_llava()).name == "llava"


def test_image_and_text_token_covariances_add_up_to_all_tokens(store):
    model, batches = tiny_llava(), llava_batches()
    name = "model.language_model.layers.1.mlp.down_proj"
    seen = module_inputs(model, name, lambda m, b: m(**b), batches)
    rows = [(x, b) for x, b in zip(seen, batches)]
    everything = torch.cat([x[b["attention_mask"].bool()] for x, b in rows])
    images = torch.cat([x[(b["input_ids"] == IMAGE_TOKEN) & b["attention_mask"].bool()] for x, b in rows])
    assert store.count(name, "calib/image") == images.shape[0] == 3 * 2 * PATCHES
    assert store.count(name, "calib") == everything.shape[0]
    assert store.count(name, "calib/image") + store.count(name, "calib/text") == store.count(name, "calib")
    torch.testing.assert_close(store.sum(name, "calib"), everything.T @ everything, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(store.sum(name, "calib/image"), images.T @ images, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(store.sum(name, "calib/image") + store.sum(name, "calib/text"), store.sum(name, "calib"))


def test_vision_tower_and_projector_see_images_only(store):
    assert store.count("model.vision_tower.encoder.layers.0.mlp.fc1") == 6 * (PATCHES + 1)
    assert store.count("model.multi_modal_projector.linear_1") == 6 * PATCHES
    assert store.sources == ["calib", "calib/image", "calib/text"]
    assert {s for (k, s) in store.sums if "vision_tower" in k} == {"calib"}


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("source", [None, "calib/text"])
def test_outputs_unchanged_at_init(store, mode, source):
    model, batch = tiny_llava(), llava_batches()[0]
    groups = GROUPS if source is None else ["language"]
    ref = logits(model, batch)
    peft_model = build_corda(model, store, CordaConfig(r=4, mode=mode, groups=groups, source=source), progress=False)
    torch.testing.assert_close(logits(peft_model, batch), ref, atol=3e-5, rtol=0)


def test_save_load_and_dry_run(store, tmp_path):
    model, batch = tiny_llava(), llava_batches()[0]
    config = CordaConfig(r=4, groups=GROUPS)
    dry = plan(model, config, store)
    peft_model = build_corda(model, store, config, progress=False)
    adapted = sorted(n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert sorted(dry.modules) == adapted and len(adapted) == 28
    assert set(dry.group_totals()) == set(GROUPS)
    ref = logits(peft_model, batch)
    save_corda(peft_model, tmp_path / "llava")
    torch.testing.assert_close(logits(load_corda(tmp_path / "llava"), batch), ref, atol=1e-6, rtol=0)


def test_mismatched_image_tokens_are_explained():
    batch = dict(llava_batches()[0])
    batch["input_ids"] = batch["input_ids"].clone()
    batch["input_ids"][0, 2] = 5  # one image token too few
    with pytest.raises(CalibrationError, match=r"the rows announce \[15, 16\] image tokens, but each image takes 16"):
        collect_covariances(tiny_llava(), [batch], progress=False)
    batch = dict(llava_batches()[0])
    del batch["pixel_values"]
    with pytest.raises(CalibrationError, match="no 'pixel_values'"):
        collect_covariances(tiny_llava(), [batch], progress=False)


def test_the_right_total_in_the_wrong_rows_is_refused():
    """24 and 8 image tokens for two 16-token images: the total fits, the rows do not."""
    batch = dict(llava_batches()[0])
    ids = torch.randint(1, IMAGE_TOKEN, (2, 28), generator=torch.Generator().manual_seed(0))
    ids[0, 2:26] = IMAGE_TOKEN
    ids[1, 2:10] = IMAGE_TOKEN
    batch["input_ids"], batch["attention_mask"] = ids, torch.ones_like(ids)
    with pytest.raises(CalibrationError, match=r"the rows announce \[24, 8\] image tokens"):
        collect_covariances(tiny_llava(), [batch], progress=False)


def test_bad_pixels_and_key_typos_are_caught():
    batch = dict(llava_batches()[0])
    with pytest.raises(CalibrationError, match="pixel_values are torch.uint8"):
        collect_covariances(tiny_llava(), [{**batch, "pixel_values": batch["pixel_values"].abs().mul(50).to(torch.uint8)}],
                            progress=False)
    with pytest.warns(UserWarning, match="look like 0-255 images"):
        collect_covariances(tiny_llava(), [{**batch, "pixel_values": batch["pixel_values"] * 100}], progress=False)
    typo = {k: v for k, v in batch.items() if k != "attention_mask"} | {"attention_masks": batch["attention_mask"]}
    with pytest.raises(CalibrationError, match="'attention_masks'.*did you mean 'attention_mask'"):
        collect_covariances(tiny_llava(), [typo], progress=False)
    # keys a collator adds that no model input resembles are dropped, as before
    collect_covariances(tiny_llava(), [{**batch, "labels": batch["input_ids"]}], progress=False)


def test_images_sent_to_a_text_only_model(llama):
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "pixel_values": torch.zeros(1, 3, 16, 16)}
    with pytest.raises(CalibrationError, match="text-only"):
        collect_covariances(llama, [batch], progress=False)


def test_per_group_rank_and_mode(store):
    model, batch = tiny_llava(), llava_batches()[0]
    ref = logits(model, batch)
    config = CordaConfig(r=4, groups=["projector", "language"], group_ranks={"projector": 2},
                         group_modes={"projector": "ipm"}, rank_pattern={"down_proj": 3})
    dry = {row.module: row for row in plan(model, config, store).rows}
    peft_model = build_corda(model, store, config, progress=False)
    torch.testing.assert_close(logits(peft_model, batch), ref, atol=3e-5, rtol=0)
    from corda_vl import build_record

    record = build_record(peft_model).modules
    base = peft_model.get_base_model()
    assert base.model.multi_modal_projector.linear_1.r["default"] == 2 == dry["model.multi_modal_projector.linear_1"].rank
    assert record["model.multi_modal_projector.linear_1"]["mode"] == "ipm"
    assert record["model.language_model.layers.0.self_attn.q_proj"]["mode"] == "kpm"
    assert base.model.language_model.layers[0].mlp.down_proj.r["default"] == 3  # rank_pattern wins
    assert not any("vision_tower" in n and "lora" in n for n, _ in base.named_modules())  # vision frozen


def test_text_only_calibration_is_allowed_with_a_warning_that_image_tokens_are_missing():
    import warnings

    model, batches = tiny_llava(), llava_batches()
    text_only = [{"input_ids": b["input_ids"].masked_fill(b["input_ids"] == IMAGE_TOKEN, 3),
                  "attention_mask": b["attention_mask"]} for b in batches]
    with pytest.warns(UserWarning, match="language layers saw no image tokens, so calib/image is missing"):
        store = collect_covariances(model, text_only, groups=["language"], progress=False)
    assert store.sources == ["calib", "calib/text"]
    ref = logits(model, batches[0])
    built = build_corda(model, store, CordaConfig(r=4, groups=["language"]), progress=False)
    torch.testing.assert_close(logits(built, batches[0]), ref, atol=3e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with images, nothing is missing: no warning
        collect_covariances(tiny_llava(), batches, groups=["language"], progress=False)
