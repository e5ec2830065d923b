"""New visual question types about easy-VQA images, for the "learn something new, keep what you
know" LLaVA recipe. easy-VQA only asks for the shape, the colour, or yes / no; these ask
something else about the same pictures, with answers derived from easy-vqa's own labels
(:func:`corda_vl.lab.data.vqa.easy_vqa_labels`):

- ``corners``: "how many corners does the shape have?" -> circle "0", triangle "3", rectangle "4"
  (the model must see the shape *and* map it to a number it was never asked for);
- ``describe``: "describe the shape." -> "red circle" (colour and shape in one answer).

The default LLaVA (``corda-vl-llava``) answers 13 of 100 held-out ``corners`` questions (it says
"1" or "3" whatever the shape: right only for some triangles) and 0 of 100 ``describe`` ones (it
names a shape only); LoRA on its three groups reaches ~80% on ``corners`` in 100 steps of 8 rows at
lr 5e-4 (recipes/llava_kpm.py). Trained on one question type only, a model drifts towards giving
that type's answer to every question: at lr 2e-3 LoRA and CorDA answered every easy-VQA question
("what color is the shape?", "is there a red shape?") with a corner count.

Rows are one question per image: "train" from easy-vqa's train images, "eval" from its test
images, so no evaluated image is ever trained on (the split the default LLaVA's projector was
trained on). Deterministic: the same arguments always give the same rows.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from corda_vl.errors import CordaError
from corda_vl.lab.data.vqa import COLORS, SHAPES, easy_vqa_labels, easy_vqa_split

if TYPE_CHECKING:
    from datasets import DatasetDict

CORNERS = {"circle": "0", "triangle": "3", "rectangle": "4"}
CORNER_ALIASES = {"circle": ["zero", "none"], "triangle": ["three"], "rectangle": ["four"]}

# skill -> (question paraphrases, (shape, colour) -> answer, (shape, colour) -> other accepted answers)
SKILLS = {
    "corners": (("how many corners does the shape have?", "how many corners does the shape in the image have?",
                 "how many corners are on the shape?"),
                lambda shape, color: CORNERS[shape], lambda shape, color: CORNER_ALIASES[shape]),
    "describe": (("describe the shape.", "describe the shape in the image.", "what is in the image?"),
                 lambda shape, color: f"{color} {shape}", lambda shape, color: []),
}


def vqa_skill_images(split: str) -> dict[int, tuple[str, str]]:
    """Image id -> (shape, colour) of the easy-vqa images of ``split`` ("train" / "eval") whose
    questions settle both."""
    if split not in ("train", "eval"):
        raise CordaError(f"vqa_skill: split must be 'train' or 'eval', got {split!r}.")
    shapes, colors = easy_vqa_labels(split, SHAPES), easy_vqa_labels(split, COLORS)
    return {i: (shapes[i], colors[i]) for i in sorted(set(shapes) & set(colors))}


def vqa_skill(skill: str = "corners", n_train: int | None = None, n_eval: int | None = None, *,
              seed: int = 0) -> DatasetDict:
    """A new question type on easy-VQA images as "train" / "eval" rows: columns image (PIL, RGB,
    read lazily from the installed easy-vqa), question, answer, aliases (other accepted answers,
    e.g. "three" for "3"). One row per image; ``n_train`` / ``n_eval`` (None: every labelled
    image, 3,227 / 798) are a seeded sample of the images; ``seed`` also picks each row's
    question among the skill's paraphrases."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    if skill not in SKILLS:
        raise CordaError(f"unknown VQA skill {skill!r}; choose one of {sorted(SKILLS)}.")
    questions, answer, aliases = SKILLS[skill]
    features = Features({"image": Image(mode="RGB"), "question": Value("string"), "answer": Value("string"),
                         "aliases": Sequence(Value("string"))})
    out = {}
    for split, n in (("train", n_train), ("eval", n_eval)):
        labels = vqa_skill_images(split)
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(labels)):
            raise CordaError(f"vqa_skill: n_{split}={n!r} must be an int between 1 and {len(labels)} "
                             f"(the labelled easy-VQA {split} images), or None for all of them.")
        rng = random.Random(f"{skill}/{seed}/{split}")
        ids = list(labels)
        rng.shuffle(ids)
        ids = ids[:n] if n is not None else ids
        if split == "eval":
            ids = sorted(ids)  # held-out rows in a fixed order, whatever n is
        paths = easy_vqa_split(split)[1]
        out[split] = Dataset.from_dict({
            "image": [paths[i] for i in ids],
            "question": [rng.choice(questions) for _ in ids],
            "answer": [answer(*labels[i]) for i in ids],
            "aliases": [aliases(*labels[i]) for i in ids],
        }, features=features)
    return DatasetDict(out)
