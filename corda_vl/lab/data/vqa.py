"""easy-VQA (PyPI ``easy-vqa``, MIT): 5,000 64x64 images of one coloured shape with ~48k
questions, bundled in the wheel, so VQA runs offline. We keep easy-vqa's own train/test split
(4,000 / 1,000 images): the image classification sets derived from it (``images.shapes``,
``images.colors``) use the same split, so no image the VQA evaluation holds out is ever trained on.
"""

from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from corda_vl.errors import CordaError

if TYPE_CHECKING:
    from datasets import DatasetDict

SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
# Our split name -> easy-vqa's folder.
SPLIT_DIRS = {"train": "train", "eval": "test"}


class EasyVQAError(CordaError):
    """easy-vqa is missing or its bundled data is not what we expect."""


@lru_cache(maxsize=None)
def easy_vqa_split(split: str) -> tuple[tuple[tuple[str, str, int], ...], dict[int, str]]:
    """(question, answer, image id) triples in easy-vqa's file order, and image id -> PNG path,
    for our split "train" or "eval"."""
    try:
        import easy_vqa
    except ImportError as exc:
        raise EasyVQAError("easy-vqa is not installed: run `pip install easy-vqa` (MIT, data bundled).") from exc
    folder = SPLIT_DIRS[split]
    reader = easy_vqa.get_train_questions if folder == "train" else easy_vqa.get_test_questions
    paths = (easy_vqa.get_train_image_paths if folder == "train" else easy_vqa.get_test_image_paths)()
    questions, answers, images = reader()
    return tuple(zip(questions, answers, images)), dict(paths)


def split_order(n: int, split: str, seed: int) -> list[int]:
    """Row order of an easy-vqa split: ``seed`` shuffles the train rows; eval keeps file order."""
    return np.random.default_rng(seed).permutation(n).tolist() if split == "train" else list(range(n))


def easy_vqa(seed: int = 0) -> DatasetDict:
    """easy-VQA as "train" (38,575 questions) and "eval" (9,673): columns image (PIL, RGB, read
    lazily from the installed package), question, answer. The split is easy-vqa's own; ``seed``
    only shuffles the order of the train rows (eval keeps the file order)."""
    from datasets import Dataset, DatasetDict, Features, Image, Value

    features = Features({"image": Image(mode="RGB"), "question": Value("string"), "answer": Value("string")})
    out = {}
    for split in SPLIT_DIRS:
        rows, paths = easy_vqa_split(split)
        picked = [rows[i] for i in split_order(len(rows), split, seed)]
        out[split] = Dataset.from_dict({"image": [paths[im] for _, _, im in picked],
                                        "question": [q for q, _, _ in picked],
                                        "answer": [a for _, a, _ in picked]}, features=features)
    return DatasetDict(out)


def _evidence(question: str, answer: str, classes: tuple[str, ...]) -> tuple[str, bool] | None:
    """What one question says about the image: (class, present?) or None if it says nothing.
    "what shape is present?" -> circle states a class; "is there not a red shape?" -> "no"
    states that red is present (negated question, negative answer)."""
    if answer in classes:
        return answer, True
    words = set(re.findall(r"[a-z]+", question))
    named = [c for c in classes if c in words]
    if answer not in ("yes", "no") or len(named) != 1:
        return None
    return named[0], (answer == "yes") != bool(words & {"not", "no"})


@lru_cache(maxsize=None)
def easy_vqa_labels(split: str, classes: tuple[str, ...]) -> dict[int, str]:
    """Image id -> its class among ``classes`` (SHAPES or COLORS), read off easy-vqa's own
    questions and answers: a direct answer or a "yes" names it; "no" answers rule classes out
    until one is left. Images whose questions do not settle the class are left out."""
    present: dict[int, set[str]] = defaultdict(set)
    absent: dict[int, set[str]] = defaultdict(set)
    for question, answer, image in easy_vqa_split(split)[0]:
        evidence = _evidence(question, answer, classes)
        if evidence:
            (present if evidence[1] else absent)[image].add(evidence[0])
    labels = {}
    for image in sorted(set(present) | set(absent)):
        left = set(classes) - absent[image]
        if len(present[image]) > 1 or not present[image] <= left:
            raise EasyVQAError(f"easy-vqa image {split}/{image} has contradictory answers about {classes}; "
                               "reinstall easy-vqa (`pip install --force-reinstall easy-vqa`).")
        if present[image] or len(left) == 1:
            labels[image] = next(iter(present[image] or left))
    return labels
