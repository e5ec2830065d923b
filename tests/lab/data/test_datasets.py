"""Offline datasets: stable disjoint splits, column types, class names, users' own data loaders."""

import csv
import gzip
import io
import json
import struct

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Image, Value
from PIL import Image as PILImage

from corda_vl.lab.data import (colors, country_splits, digits, easy_vqa, fashion_mnist, from_datasets, image_folder,
                           image_table, knowledge_qa, shapes)
from corda_vl.lab.data.images import FASHION_MNIST_ROOT
from corda_vl.lab.data.vqa import SHAPES, _evidence, easy_vqa_split
from corda_vl.errors import CordaError


def image_refs(split: Dataset) -> list:
    """Each row's image bytes (in-memory images) or file path, without decoding it."""
    return [im["bytes"] or im["path"] for im in split.cast_column("image", Image(decode=False))["image"]]


def raw(split: Dataset) -> list:
    """(image bytes or path, label) per row."""
    return list(zip(image_refs(split), split["label"]))


# ---------------------------------------------------------------- knowledge QA

@pytest.fixture(scope="module")
def qa():
    return knowledge_qa()


def test_knowledge_splits_are_by_country_disjoint_and_sized(qa):
    countries = {name: set(qa[name]["country"]) for name in ("calibration", "train", "eval")}
    assert countries["calibration"].isdisjoint(countries["train"])
    assert countries["calibration"].isdisjoint(countries["eval"])
    assert countries["train"].isdisjoint(countries["eval"])
    sizes = {name: len(c) for name, c in countries.items()}
    assert sizes == {"calibration": 75, "train": 50, "eval": 125}  # 30 / 20 / 50 % of 250 countries
    assert set(qa["eval"]["field"]) == {"capital", "region", "languages", "currencies"}


def test_knowledge_is_stable_and_seeded(qa):
    again = knowledge_qa()
    for split in qa:
        assert qa[split].to_list() == again[split].to_list()
    other = knowledge_qa(seed=1)
    assert set(other["eval"]["country"]) != set(qa["eval"]["country"])
    # A country's split does not depend on the fields asked about.
    capitals = knowledge_qa(fields=("capital",))
    for split in qa:
        assert set(capitals[split]["country"]) == set(qa[split]["country"])
        assert set(capitals[split]["field"]) == {"capital"}
    assert country_splits(0) == country_splits(0) != country_splits(1)


def test_knowledge_rows_columns_and_aliases(qa):
    assert qa["eval"].column_names == ["question", "answer", "aliases", "field", "country"]
    assert qa["eval"].features["aliases"].feature == Value("string")
    rows = {(r["country"], r["field"]): r for split in qa for r in qa[split]}
    assert rows["France", "capital"]["question"] == "What is the capital of France?"
    assert rows["France", "capital"]["answer"] == "Paris"
    swiss = rows["Switzerland", "languages"]
    assert swiss["answer"] == "German" and set(swiss["aliases"]) == {"German", "French", "Italian"}
    money = rows["Switzerland", "currencies"]
    assert money["answer"] == "Swiss Franc" and "CHF" in money["aliases"] and "CHE" not in money["aliases"]
    assert rows["Belarus", "currencies"]["answer"] == "Belarusian Ruble"  # babel's "(2000–2016)" dropped
    assert rows["Japan", "region"]["aliases"] == ["Asia", "Eastern Asia"]
    assert ("Curaçao", "capital") in rows and ("Curaçao", "languages") not in rows  # no language data: skipped
    assert all(r["aliases"][0] == r["answer"] for r in rows.values())


def test_knowledge_rejects_unknown_fields():
    with pytest.raises(CordaError, match="unknown field 'anthem'"):
        knowledge_qa(fields=("capital", "anthem"))


# ---------------------------------------------------------------- built-in image sets

def test_digits_split_partitions_the_data_and_is_stable():
    from sklearn.datasets import load_digits

    ds = digits()
    assert {k: len(v) for k, v in ds.items()} == {"train": 1258, "test": 539}
    assert ds["test"].features["label"].names == [str(i) for i in range(10)]
    image = ds["test"][0]["image"]
    assert isinstance(image, PILImage.Image) and image.mode == "RGB" and image.size == (8, 8)
    data = load_digits()
    full = sorted((np.rint(im * 255 / 16).astype(np.uint8).tobytes(), int(y)) for im, y in zip(data.images, data.target))
    pixels = [(PILImage.open(io.BytesIO(b)).convert("L").tobytes(), y)
              for split in ds.values() for b, y in raw(split)]
    assert sorted(pixels) == full  # every digit in exactly one split
    assert set(ds["test"]["label"]) == set(range(10))
    assert raw(digits()["test"]) == raw(ds["test"])
    assert raw(digits(seed=1)["test"]) != raw(ds["test"])


@pytest.mark.parametrize("loader, names", [(shapes, list(SHAPES)),
                                           (colors, ["black", "blue", "brown", "gray", "green", "red", "teal", "yellow"])])
def test_easy_vqa_classes_follow_easy_vqa_split_and_answers(loader, names):
    ds = loader()
    assert ds["test"].features["label"].names == names
    train, test = raw(ds["train"]), raw(ds["test"])
    assert len(train) > 3400 and len(test) > 850
    assert all("/train/" in p for p, _ in train) and all("/test/" in p for p, _ in test)
    assert {p for p, _ in train}.isdisjoint(p for p, _ in test)
    assert raw(loader()["train"]) == train
    # Labels agree with every direct question about the same image.
    rows, paths = easy_vqa_split("eval")
    label_of = {p: names[y] for p, y in test}
    direct = [(paths[im], a) for q, a, im in rows if a in names and paths[im] in label_of]
    assert len(direct) > 500 and all(label_of[p] == a for p, a in direct)
    image = ds["test"][0]["image"]
    assert image.mode == "RGB" and image.size == (64, 64)


def test_label_evidence_reads_negated_questions():
    assert _evidence("what shape is present?", "circle", SHAPES) == ("circle", True)
    assert _evidence("is there not a triangle?", "no", SHAPES) == ("triangle", True)
    assert _evidence("does the image not contain a circle?", "yes", SHAPES) == ("circle", False)
    assert _evidence("is a rectangle present?", "no", SHAPES) == ("rectangle", False)
    assert _evidence("what color is the shape?", "red", SHAPES) is None


def test_easy_vqa_keeps_its_own_split():
    ds = easy_vqa()
    assert {k: len(v) for k, v in ds.items()} == {"train": 38575, "eval": 9673}
    assert ds["eval"].column_names == ["image", "question", "answer"]
    row = ds["eval"][0]
    assert row["image"].mode == "RGB" and isinstance(row["question"], str) and isinstance(row["answer"], str)
    paths = {s: image_refs(ds[s]) for s in ds}
    assert all("/test/" in p for p in paths["eval"]) and all("/train/" in p for p in paths["train"])
    assert ds["train"]["question"] == easy_vqa()["train"]["question"] != easy_vqa(seed=1)["train"]["question"]
    assert ds["eval"]["question"] == easy_vqa(seed=1)["eval"]["question"]


# ---------------------------------------------------------------- Fashion-MNIST (Debian layout, IDX format)

def write_idx(path, array):
    header = b"\x00\x00\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_the_debian_files(tmp_path):
    rng = np.random.default_rng(0)
    parts = {"train": (rng.integers(0, 256, (5, 28, 28)), np.array([0, 9, 3, 3, 1])),
             "t10k": (rng.integers(0, 256, (3, 28, 28)), np.array([8, 0, 2]))}
    for prefix, (images, labels) in parts.items():
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    ds = fashion_mnist(tmp_path)
    assert {k: len(v) for k, v in ds.items()} == {"train": 5, "test": 3}
    assert ds["test"].features["label"].names[9] == "Ankle boot" and len(ds["test"].features["label"].names) == 10
    assert ds["test"]["label"] == [8, 0, 2]
    image = ds["train"][1]["image"]
    assert image.mode == "RGB" and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], parts["train"][0][1])


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(CordaError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(not FASHION_MNIST_ROOT.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_installed():
    ds = fashion_mnist()
    assert {k: len(v) for k, v in ds.items()} == {"train": 60000, "test": 10000}


# ---------------------------------------------------------------- users' own data

def save(path, mode="RGB", value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new(mode, (6, 4), value).save(path)
    return path


def test_image_folder_flat_and_split_layouts(tmp_path):
    save(tmp_path / "flat" / "dog" / "b.png", "L", 200)
    save(tmp_path / "flat" / "cat" / "a.png", "RGBA", (1, 2, 3, 4))
    save(tmp_path / "flat" / "cat" / "nested" / "c.jpg")
    (tmp_path / "flat" / "cat" / "notes.txt").write_text("not an image")
    ds = image_folder(tmp_path / "flat")
    assert list(ds) == ["train"] and ds["train"].features["label"].names == ["cat", "dog"]
    assert ds["train"]["label"] == [0, 0, 1]
    first = ds["train"][0]["image"]
    assert first.mode == "RGB" and first.getpixel((0, 0)) == (1, 2, 3)
    assert ds["train"][2]["image"].getpixel((0, 0)) == (200, 200, 200)

    save(tmp_path / "split" / "train" / "ant" / "1.png")
    save(tmp_path / "split" / "train" / "bee" / "2.png")
    save(tmp_path / "split" / "test" / "bee" / "3.png")
    ds = image_folder(tmp_path / "split")
    assert sorted(ds) == ["test", "train"]
    assert ds["test"].features["label"].names == ["ant", "bee"] and ds["test"]["label"] == [1]
    with pytest.raises(CordaError, match="no images"):
        image_folder(tmp_path / "split" / "train" / "ant")


def test_image_table_csv_and_jsonl(tmp_path):
    save(tmp_path / "img" / "x.png", value=(10, 20, 30))
    save(tmp_path / "img" / "y.png")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "kind"])
        writer.writerows([["img/x.png", "zebra"], ["img/y.png", "apple"]])
    ds = image_table(tmp_path / "list.csv", image_column="file", label_column="kind")
    assert ds["train"].features["label"].names == ["apple", "zebra"] and ds["train"]["label"] == [1, 0]
    assert ds["train"][0]["image"].getpixel((0, 0)) == (10, 20, 30)

    lines = [{"image": "img/x.png", "label": 10}, {"image": "img/y.png", "label": 2}]
    (tmp_path / "list.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    ds = image_table(tmp_path / "list.jsonl")
    assert ds["train"].features["label"].names == ["2", "10"] and ds["train"]["label"] == [1, 0]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "img/missing.png", "label": 0}))
    with pytest.raises(CordaError, match="do not exist"):
        image_table(tmp_path / "bad.jsonl")


def test_from_datasets_normalises_columns_and_labels(tmp_path):
    a, b = save(tmp_path / "a.png", value=(5, 5, 5)), save(tmp_path / "b.png")
    plain = Dataset.from_dict({"path": [str(a), str(b)], "name": ["pear", "fig"], "extra": [1, 2]})
    ds = from_datasets(plain, image_column="path", label_column="name")
    assert list(ds) == ["train"] and ds["train"].column_names == ["image", "label"]
    assert ds["train"].features["label"].names == ["fig", "pear"] and ds["train"]["label"] == [1, 0]
    assert ds["train"][0]["image"].getpixel((0, 0)) == (5, 5, 5)

    labelled = Dataset.from_dict({"img": [str(a), str(b)], "y": [1, 0]}).cast_column(
        "y", ClassLabel(names=["no", "yes"])).cast_column("img", Image())
    ds = from_datasets(DatasetDict({"train": labelled, "test": labelled}), "img", "y")
    assert sorted(ds) == ["test", "train"] and ds["test"].features["label"].names == ["no", "yes"]
    assert ds["test"]["label"] == [1, 0] and ds["test"][1]["image"].mode == "RGB"

    with pytest.raises(CordaError, match="datasets.Image"):
        from_datasets(Dataset.from_dict({"image": [1, 2], "label": [0, 1]}))
