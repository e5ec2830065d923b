"""CLIP zero-shot evaluation: classifier and accuracy against direct computations, open_clip's
own classifier, and identical numbers with an initialised CorDA adapter attached."""

import numpy as np
import pytest
import torch
from conftest import clip_batches, tiny_clip, tiny_open_clip, tiny_tokenizer
from PIL import Image

from corda_vl import CordaConfig, build_corda, collect_covariances
from corda_vl.lab.eval.clip import build_zero_shot_classifier, clip_encoder, image_logits, zero_shot_eval

CLASSES = ["circle", "rectangle", "triangle", "paris", "tokyo", "berlin"]
TEMPLATES = ["a photo of a {} .", "the {} ."]


def images(n=18, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)), "label": i % 6}
            for i in range(n)]


def test_classifier_and_accuracy_equal_a_direct_computation():
    model, tok = tiny_clip(), tiny_tokenizer()
    enc = clip_encoder(model, tok)
    classifier = build_zero_shot_classifier(enc, CLASSES, TEMPLATES)
    with torch.no_grad():
        direct = []
        for name in CLASSES:
            t = tok([x.format(name) for x in TEMPLATES], return_tensors="pt", padding=True)
            e = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                      pixel_values=torch.zeros(1, 3, 16, 16)).text_embeds  # normalised by CLIPModel
            direct.append(torch.nn.functional.normalize(e.mean(0), dim=0))
    torch.testing.assert_close(classifier, torch.stack(direct, 1), atol=1e-6, rtol=0)
    rows = images()
    pixels = torch.stack([enc.preprocess(r["image"]) for r in rows])
    with torch.no_grad():
        feats = model(input_ids=t["input_ids"][:1], pixel_values=pixels).image_embeds
    logits = feats @ classifier
    labels = torch.tensor([r["label"] for r in rows])
    out = zero_shot_eval(enc, rows, CLASSES, TEMPLATES, batch_size=5, progress=False)
    assert out["acc1"] == pytest.approx(float((logits.argmax(1) == labels).float().mean()))
    top5 = logits.topk(5, 1).indices
    assert out["acc5"] == pytest.approx(float((top5 == labels[:, None]).any(1).float().mean()))
    assert out["n"] == 18 and 0 <= out["mean_per_class_recall"] <= 1


def test_identical_with_an_initialised_corda_adapter():
    model, tok = tiny_clip(), tiny_tokenizer()
    rows = images()
    ref_logits, _ = image_logits(clip_encoder(model, tok), build_zero_shot_classifier(clip_encoder(model, tok),
                                                                                       CLASSES, TEMPLATES), rows,
                                 progress=False)
    ref = zero_shot_eval(clip_encoder(model, tok), rows, CLASSES, TEMPLATES, progress=False)
    store = collect_covariances(model, clip_batches(), groups=["vision", "text"], progress=False)
    peft_model = build_corda(model, store, CordaConfig(r=4, groups=["vision", "text"]), progress=False)
    enc = clip_encoder(peft_model, tok)
    logits, _ = image_logits(enc, build_zero_shot_classifier(enc, CLASSES, TEMPLATES), rows, progress=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert zero_shot_eval(enc, rows, CLASSES, TEMPLATES, progress=False) == ref


def test_open_clip_classifier_equals_open_clip_own():
    import open_clip

    model = tiny_open_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    ours = build_zero_shot_classifier(clip_encoder(model), CLASSES, TEMPLATES)
    theirs = open_clip.build_zero_shot_classifier(model, tokenizer, CLASSES, TEMPLATES, device="cpu")
    torch.testing.assert_close(ours, theirs.float(), atol=1e-6, rtol=0)
    out = zero_shot_eval(clip_encoder(model), images(), CLASSES, TEMPLATES, progress=False)
    assert set(out) == {"acc1", "acc5", "mean_per_class_recall", "n", "correct"}


def test_non_clip_model_is_refused(llama):
    with pytest.raises(ValueError, match="CLIP model"):
        clip_encoder(llama)
