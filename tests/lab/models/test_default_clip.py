"""The embedded default CLIP: the tiny size of the same build code, end to end in a temporary
cache (files, reload, no second build, determinism), its tokenizer against open_clip's, the loss,
and load_clip on a local transformers folder."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from corda_vl import CordaError
from corda_vl.lab.models import build_default_clip, load_clip
from corda_vl.lab.models.default_clip import (BUILD_RECORD, DefaultClipError, clip_bpe_tokenizer, clip_recipe,
                                          contrastive_loss, evaluate_default_clip)

TINY = "corda-vl-clip-tiny"
SENTENCES = ["a photo of a red circle.", "the digit 7.", "A Blurry PHOTO of the number 3!",
             "Hello,   world's  café naïve 123 <tag>", "don't stop-believing!!"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A temporary $CORDA_VL_CACHE in which the tiny default CLIP was built once by load_clip."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CORDA_VL_CACHE", str(root))
        torch.manual_seed(123)  # the build must not depend on the caller's RNG state
        load_clip(TINY)
        yield root


def probe(seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]


def outputs(model, tokenizer, preprocess):
    pixels = torch.stack([preprocess(im) for im in probe()])
    text = tokenizer(["a red circle.", "the digit 4."], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(pixel_values=pixels, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    return out.logits_per_image


def test_tokenizer_gives_open_clips_ids(tmp_path):
    import open_clip
    from transformers import CLIPTokenizer

    ours = clip_bpe_tokenizer(tmp_path / "bpe", max_length=77)
    ref = open_clip.get_tokenizer("ViT-B-32")(SENTENCES)
    expected = [row[:int((row != 0).sum())].tolist() for row in ref]  # open_clip pads with id 0
    assert ours(SENTENCES)["input_ids"] == expected
    ours.save_pretrained(tmp_path / "saved")
    assert CLIPTokenizer.from_pretrained(tmp_path / "saved")(SENTENCES)["input_ids"] == expected
    assert len(ours) == 49408 and ours.bos_token_id == 49406 and ours.eos_token_id == 49407


def test_tiny_build_writes_a_loadable_model_with_its_record(cache, monkeypatch):
    folder = cache / "models" / TINY
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", BUILD_RECORD):
        assert (folder / name).is_file(), name
    record = json.loads((folder / BUILD_RECORD).read_text())
    assert record["recipe"] == clip_recipe("tiny") and record["name"] == TINY
    assert set(record["scores"]) == {"digits", "shapes", "colors"}
    for score in record["scores"].values():
        assert 0 <= score["acc1"] <= 1 and score["n"] == 24 and 0 < score["chance"] < 1
    assert record["seconds"]["total"] > 0 and record["data"]["train"] == {"digits": 48, "easy_vqa": 48}
    assert record["parameters"]["total"] == sum(v.numel() for v in load_file(folder / "model.safetensors").values())

    monkeypatch.setenv("CORDA_VL_CACHE", str(cache))
    mtime = (folder / BUILD_RECORD).stat().st_mtime
    model, tokenizer, preprocess = load_clip(TINY)  # read back, not rebuilt
    assert (folder / BUILD_RECORD).stat().st_mtime == mtime and not model.training
    assert preprocess(probe()[0]).shape == (3, 16, 16)
    again = load_clip(TINY)
    torch.testing.assert_close(outputs(model, tokenizer, preprocess), outputs(*again), atol=0, rtol=0)
    # the reloaded model scores exactly what the build measured on the model it had in memory
    scores = evaluate_default_clip(model, tokenizer, preprocess, clip_recipe("tiny"), progress=False)
    assert {k: v["acc1"] for k, v in scores.items()} == {k: v["acc1"] for k, v in record["scores"].items()}


def test_tiny_build_is_deterministic(cache, tmp_path):
    torch.manual_seed(7)
    callers_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a recipe on 1 thread triggering the build must get the same model
    try:
        record = build_default_clip(tmp_path / "again", size="tiny", progress=False)
        assert torch.get_num_threads() == 1  # the caller's count is given back
    finally:
        torch.set_num_threads(callers_threads)
    assert record["environment"]["threads"] == clip_recipe("tiny")["train"]["threads"] == 2
    first = load_file(cache / "models" / TINY / "model.safetensors")
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name
    cached = json.loads((cache / "models" / TINY / BUILD_RECORD).read_text())
    assert record["scores"] == cached["scores"] and record["loss"] == cached["loss"]


def test_no_training_caption_is_an_evaluation_prompt():
    from corda_vl.lab.data.vqa import COLORS, SHAPES
    from corda_vl.lab.eval.clip import zero_shot_templates
    from corda_vl.lab.models.default_clip import _captions

    recipe = clip_recipe("default")
    captions = set(_captions(recipe)[0])
    assert len(captions) == 10 * 6 + 3 * 8 * 6 + 3 * 5 + 8 * 5
    classes = {"digits": [str(d) for d in range(10)], "shapes": SHAPES, "colors": COLORS}
    for name, templates in recipe["eval"].items():
        prompts = {t.format(c) for t in zero_shot_templates(templates) for c in classes[name]}
        assert not prompts & captions, name


def test_build_refuses_a_full_folder_and_unknown_sizes(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(DefaultClipError, match="choose one of"):
        build_default_clip(tmp_path / "new", size="huge")
    with pytest.raises(ValueError, match="not empty"):
        build_default_clip(tmp_path / "full", size="tiny", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_loss_is_clips_with_one_positive_per_pair():
    g = torch.Generator().manual_seed(0)
    images, texts, scale = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.tensor(2.0)
    normalize = torch.nn.functional.normalize
    logits = scale.exp() * normalize(images, dim=-1) @ normalize(texts, dim=-1).T
    target = torch.arange(5)
    clip = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
    torch.testing.assert_close(contrastive_loss(images, texts, torch.eye(5, dtype=torch.bool), scale), clip)
    # two images of one caption: each has it as its only positive, the caption is shared between them
    positives = torch.tensor([[True, False], [True, False], [False, True]])
    loss = contrastive_loss(images[:3], texts[:2], positives, scale)
    logits = logits[:3, :2]
    i2t = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 1]))
    t2i = -(logits.log_softmax(0)[[0, 1], [0, 0]].mean() + logits.log_softmax(0)[2, 1]) / 2
    torch.testing.assert_close(loss, (i2t + t2i) / 2)


def tiny_bpe_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = {"vocab_size": 49408, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 16, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 49407}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 16, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)
    return CLIPModel(config).eval()


def test_load_clip_reads_a_local_transformers_folder(tmp_path):
    from transformers import CLIPImageProcessor

    from corda_vl.lab.eval.clip import CLIP_MEAN, CLIP_STD, default_preprocess

    model = tiny_bpe_clip()
    model.save_pretrained(tmp_path / "clip")
    clip_bpe_tokenizer(tmp_path / "clip", max_length=16).save_pretrained(tmp_path / "clip")
    loaded, tokenizer, preprocess = load_clip(str(tmp_path / "clip"))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert a.equal(b), name
    image = probe()[0]
    assert preprocess(image).equal(default_preprocess(16, CLIP_MEAN, CLIP_STD)(image))  # no processor config: CLIP's
    torch.testing.assert_close(outputs(loaded, tokenizer, preprocess), outputs(model, tokenizer, preprocess))

    CLIPImageProcessor(image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(tmp_path / "clip")
    assert load_clip(str(tmp_path / "clip"))[2](image).equal(default_preprocess(16, [0.5] * 3, [0.25] * 3)(image))
    with pytest.raises(CordaError, match="model path .*missing' does not exist"):
        load_clip(str(tmp_path / "missing"))
