"""Generated glyph images (corda_vl.lab.data.glyphs): deterministic, balanced, well-formed, checked args."""

from collections import Counter

import numpy as np
import pytest
from datasets import ClassLabel, DatasetDict, Image

from corda_vl.lab.data import letters
from corda_vl.lab.data.glyphs import LETTERS, render_glyph
from corda_vl.errors import CordaError


def pixels(split) -> np.ndarray:
    return np.stack([np.asarray(im) for im in split["image"]])


@pytest.fixture(scope="module")
def small():
    return letters(seed=0, n_train=40, n_test=20)


def test_letters_shapes_classes_and_splits(small):
    assert isinstance(small, DatasetDict) and set(small) == {"train", "test"}
    assert (len(small["train"]), len(small["test"])) == (40, 20)
    for split in small.values():
        assert isinstance(split.features["image"], Image) and split.features["image"].mode == "RGB"
        assert isinstance(split.features["label"], ClassLabel)
        assert split.features["label"].names == [f"letter {c}" for c in LETTERS]
        image = split[0]["image"]
        assert image.mode == "RGB" and image.size == (32, 32)
    assert pixels(small["train"]).shape == (40, 32, 32, 3)


def test_letters_labels_are_balanced(small):
    for split, n in (("train", 4), ("test", 2)):
        assert Counter(small[split]["label"]) == {y: n for y in range(len(LETTERS))}
    uneven = letters(n_train=23, n_test=10)["train"]["label"]
    counts = Counter(uneven).values()
    assert len(counts) == len(LETTERS) and max(counts) - min(counts) <= 1


def test_letters_are_deterministic_per_seed(small):
    again = letters(seed=0, n_train=40, n_test=20)
    for split in ("train", "test"):
        assert np.array_equal(pixels(small[split]), pixels(again[split]))
        assert small[split]["label"] == again[split]["label"]
    other = letters(seed=1, n_train=40, n_test=20)
    assert not np.array_equal(pixels(small["train"]), pixels(other["train"]))
    # train and test are drawn apart, and a longer split extends a shorter one
    assert not np.array_equal(pixels(small["train"])[:20], pixels(small["test"]))
    longer = letters(seed=0, n_train=60, n_test=20)
    assert np.array_equal(pixels(longer["train"])[:40], pixels(small["train"]))


def test_letters_images_vary_and_show_the_glyph(small):
    images = pixels(small["train"]).astype(np.float64)
    # every image has ink and background (not blank), and no two images are identical
    assert (images.reshape(len(images), -1).std(1) > 10).all()
    assert len({im.tobytes() for im in pixels(small["train"])}) == len(images)


def test_letters_custom_classes_and_size():
    ds = letters(seed=3, n_train=6, n_test=3, chars="XO", size=16)
    assert ds["train"].features["label"].names == ["letter X", "letter O"]
    assert ds["train"][0]["image"].size == (16, 16)


def test_render_glyph_is_a_pure_function_of_the_generator():
    a = render_glyph("A", np.random.default_rng([0, 0, 7]))
    b = render_glyph("A", np.random.default_rng([0, 0, 7]))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3) and np.array_equal(a, b)


@pytest.mark.parametrize("kwargs", [
    {"n_train": 0}, {"n_test": -1}, {"n_train": 2.5}, {"n_train": True}, {"seed": -1}, {"seed": "0"},
    {"chars": "A"}, {"chars": "AA"}, {"chars": "ab"}, {"chars": "A1"}, {"chars": ["A", "B"]}, {"size": 4},
])
def test_letters_bad_arguments_raise(kwargs):
    with pytest.raises(CordaError):
        letters(**kwargs)
