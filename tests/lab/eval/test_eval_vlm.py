"""LLaVA VQA evaluation on a tiny LLaVA with a real LlavaProcessor: batching, exact match,
text-only QA through the same model, identical numbers with an initialised adapter attached."""

import numpy as np
import pytest
from conftest import llava_batches, tiny_llava, tiny_tokenizer
from PIL import Image

from corda_vl import CordaConfig, build_corda, collect_covariances
from corda_vl.lab.eval.llm import qa_exact_match
from corda_vl.lab.eval.vlm import vqa_accuracy


def processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(image_processor=images, tokenizer=tiny_tokenizer(), patch_size=4,
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


def rows(n=6, seed=0):
    rng = np.random.default_rng(seed)
    questions = ["what shape is in the image ?", "what color is the shape ?", "does the image contain a circle ?"]
    return [{"image": Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)),
             "question": questions[i % 3], "answer": ["circle", "red", "yes"][i % 3]} for i in range(n)]


@pytest.fixture
def proc():
    return processor()


def test_batched_equals_one_by_one_and_scores_exact_matches(proc):
    model = tiny_llava()
    batched = vqa_accuracy(model, proc, rows(), batch_size=4, progress=False)
    single = vqa_accuracy(model, proc, rows(), batch_size=1, progress=False)
    assert batched["predictions"] == single["predictions"] and batched["n"] == 6
    answered = [dict(r, aliases=[p]) for r, p in zip(rows(), batched["predictions"])]
    assert vqa_accuracy(model, proc, answered, progress=False)["vqa_accuracy"] == 1.0
    text_only = qa_exact_match(model, proc.tokenizer, [{"question": "what is the capital of france ?", "answer": "paris"}],
                               progress=False)
    assert text_only["n"] == 1 and isinstance(text_only["predictions"][0], str)


def test_identical_with_an_initialised_corda_adapter(proc):
    model = tiny_llava()
    ref = vqa_accuracy(model, proc, rows(), progress=False)
    groups = ["vision", "projector", "language"]
    store = collect_covariances(model, llava_batches(), groups=groups, progress=False)
    peft_model = build_corda(model, store, CordaConfig(r=4, groups=groups), progress=False)
    assert vqa_accuracy(peft_model, proc, rows(), progress=False) == ref
