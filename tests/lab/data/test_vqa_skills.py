"""vqa_skill: new question types on easy-VQA images, deterministic, consistent with easy-vqa's
labels, train and eval images apart."""

import pytest

from corda_vl import CordaError
from corda_vl.lab.data import vqa_skill
from corda_vl.lab.data.vqa import COLORS, SHAPES, easy_vqa_labels, easy_vqa_split
from corda_vl.lab.data.vqa_skills import CORNERS, SKILLS, vqa_skill_images

pytest.importorskip("easy_vqa")


def paths(rows):
    from datasets import Image

    return [im["path"] for im in rows.cast_column("image", Image(decode=False))["image"]]


def image_ids(split, rows):
    by_path = {p: i for i, p in easy_vqa_split(split)[1].items()}
    return [by_path[p] for p in paths(rows)]


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_deterministic_and_seeded(skill):
    a, b = vqa_skill(skill, 40, 20, seed=3), vqa_skill(skill, 40, 20, seed=3)
    for split in ("train", "eval"):
        assert a[split].to_dict() == b[split].to_dict()  # image paths, not decoded pixels
        assert a[split].column_names == ["image", "question", "answer", "aliases"]
    assert len(a["train"]) == 40 and len(a["eval"]) == 20
    assert paths(vqa_skill(skill, 40, 20, seed=4)["train"]) != paths(a["train"])


@pytest.mark.parametrize("skill", sorted(SKILLS))
def test_answers_follow_the_labels(skill):
    data = vqa_skill(skill, 200, 100)
    for split in ("train", "eval"):
        shapes, colors = easy_vqa_labels(split, SHAPES), easy_vqa_labels(split, COLORS)
        rows = data[split]
        for image, question, answer, aliases in zip(image_ids(split, rows), rows["question"], rows["answer"],
                                                    rows["aliases"]):
            assert question in SKILLS[skill][0]
            expected = CORNERS[shapes[image]] if skill == "corners" else f"{colors[image]} {shapes[image]}"
            assert answer == expected and answer not in aliases
    assert set(data["train"]["answer"]) >= ({"0", "3", "4"} if skill == "corners" else set())


def test_train_and_eval_images_are_apart_and_whole_sets_by_default():
    data = vqa_skill("corners")
    train, held_out = paths(data["train"]), paths(data["eval"])
    assert len(train) == len(set(train)) == len(vqa_skill_images("train"))
    assert len(held_out) == len(set(held_out)) == len(vqa_skill_images("eval"))
    assert not set(train) & set(held_out)
    assert all("/train/" in p for p in train) and all("/test/" in p for p in held_out)
    image = data["eval"][0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)


def test_eval_rows_are_a_fixed_ordered_sample():
    small, large = vqa_skill("corners", 10, 30), vqa_skill("corners", 10, 60)
    ids = image_ids("eval", small["eval"])
    assert ids == sorted(ids) and set(ids) <= set(image_ids("eval", large["eval"]))


@pytest.mark.parametrize("kwargs", [dict(skill="count"), dict(n_train=0), dict(n_eval=-1), dict(n_train=10 ** 6),
                                    dict(n_eval=2.5), dict(n_train=True)])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(CordaError):
        vqa_skill(**kwargs)


def test_bad_split_raises():
    with pytest.raises(CordaError, match="split"):
        vqa_skill_images("test")
