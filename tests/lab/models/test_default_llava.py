"""The default LLaVA build (tiny size: same code, seconds): assembled from a CLIP folder and a
causal LM, only the projector trained, text-only outputs equal to the language model's own,
saved / reloaded / cached, deterministic."""

import json
import os

import pytest
import torch
from conftest import tiny_llama, tiny_tokenizer

from corda_vl.lab.models.default_llava import BUILD_RECORD, build_default_llava, default_llava_dir, load_llava


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    lm_dir = root / "lm"
    tiny_llama().save_pretrained(lm_dir)
    tiny_tokenizer(image_token=False).save_pretrained(lm_dir)  # the build adds <image> and a row
    record = build_default_llava(root / "llava", size="tiny", language_model=str(lm_dir), cache_dir=root / "cache",
                                 progress=False)
    return root, record


def test_build_record_and_files(built):
    root, record = built
    out = root / "llava"
    assert {"config.json", "model.safetensors", BUILD_RECORD, "processor_config.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / BUILD_RECORD).read_text())
    assert saved["scores"] == record["scores"] and saved["recipe"]["size"] == "tiny"
    assert 0 <= record["scores"]["vqa"]["accuracy"] <= 1 and record["scores"]["capitals"]["n"] == 3
    assert record["parameters"]["projector"] > 0 and record["loss"]["first"] > 0
    assert record["environment"]["threads"] == saved["recipe"]["train"]["threads"]  # pinned, whoever builds


def test_only_the_projector_changed_and_text_outputs_are_the_lms(built):
    root, _ = built
    model, processor = load_llava(str(root / "llava"))
    lm = tiny_llama()
    ids = processor.tokenizer(["what is the capital of france ?"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
        assert out.shape[-1] == lm.config.vocab_size + 1  # <image> was added
        torch.testing.assert_close(out[..., :-1], lm(input_ids=ids).logits, atol=1e-6, rtol=0)
    for name, p in lm.model.state_dict().items():
        torch.testing.assert_close(model.model.language_model.state_dict()[name][: p.shape[0]], p)


def test_deterministic_and_cached(built, tmp_path, monkeypatch):
    root, record = built
    again = build_default_llava(tmp_path / "again", size="tiny", language_model=str(root / "lm"),
                                cache_dir=root / "cache", progress=False)
    assert again["scores"] == record["scores"] and again["loss"] == record["loss"]
    a, _ = load_llava(str(root / "llava"))
    b, _ = load_llava(str(tmp_path / "again"))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    # the alias is cached: a second call does not build
    monkeypatch.setenv("CORDA_VL_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "corda-vl-llava-tiny"
    target.mkdir(parents=True)
    (target / BUILD_RECORD).write_text(json.dumps({"recipe": json.loads((root / "llava" / BUILD_RECORD).read_text())["recipe"]}))
    assert default_llava_dir("corda-vl-llava-tiny") == target and len(os.listdir(target)) == 1
