"""Image classification sets as ``datasets.DatasetDict``: columns ``image`` (PIL, RGB) and
``label`` (``datasets.ClassLabel``, so ``ds["test"].features["label"].names`` are the class
names zero-shot classifiers are built from).

Offline sets: scikit-learn digits, easy-VQA shapes and colours, Fashion-MNIST from its Debian
package. Users' own data: an image folder, a CSV / JSONL table of image paths, or any
``datasets`` dataset. Small in-memory images are stored as raw PGM/PPM bytes (no compression
cost, decoded by PIL on access); files on disk are stored by path and read lazily.
"""

from __future__ import annotations

import csv
import gzip
import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from corda_vl.errors import CordaError
from corda_vl.lab.data.vqa import COLORS, SHAPES, easy_vqa_labels, easy_vqa_split, split_order

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLIT_NAMES = frozenset({"train", "test", "validation", "eval", "calibration"})
DIGITS_TEST_FRACTION = 0.3


class ImageDataError(CordaError):
    """An image data set is missing, or a user's images / labels cannot be read."""


def _features(names):
    from datasets import ClassLabel, Features, Image

    return Features({"image": Image(mode="RGB"), "label": ClassLabel(names=list(names))})


def _pnm(array: np.ndarray) -> dict:
    """Raw PGM (H x W) or PPM (H x W x 3) bytes of a uint8 array, in datasets.Image's format."""
    magic = b"P5" if array.ndim == 2 else b"P6"
    header = magic + f" {array.shape[1]} {array.shape[0]} 255\n".encode()
    return {"bytes": header + np.ascontiguousarray(array, dtype=np.uint8).tobytes(), "path": None}


def from_arrays(images: np.ndarray, labels, names) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"image": [_pnm(a) for a in images], "label": [int(y) for y in labels]},
                             features=_features(names))


def _stratified_test(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: a seeded ``fraction`` of every class, so both splits keep all classes."""
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        test[rng.permutation(idx)[:round(fraction * len(idx))]] = True
    return test


def digits(seed: int = 0) -> DatasetDict:
    """scikit-learn's 1,797 8x8 handwritten digits (bundled, offline), a seeded stratified 70/30
    train/test split; class names "0".."9". Pixels 0..16 are scaled to 0..255."""
    from datasets import DatasetDict
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.rint(data.images * (255 / 16)).astype(np.uint8)
    test = _stratified_test(data.target, DIGITS_TEST_FRACTION, seed)
    names = [str(n) for n in data.target_names]
    return DatasetDict({"train": from_arrays(pixels[~test], data.target[~test], names),
                        "test": from_arrays(pixels[test], data.target[test], names)})


def _easy_vqa_classes(classes: tuple[str, ...], seed: int) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    out = {}
    for ours, split in (("train", "train"), ("test", "eval")):
        labels, paths = easy_vqa_labels(split, classes), easy_vqa_split(split)[1]
        ids = sorted(labels)
        ids = [ids[i] for i in split_order(len(ids), split, seed)]
        out[ours] = Dataset.from_dict({"image": [paths[i] for i in ids],
                                       "label": [classes.index(labels[i]) for i in ids]}, features=_features(classes))
    return DatasetDict(out)


def shapes(seed: int = 0) -> DatasetDict:
    """easy-VQA images labelled circle / rectangle / triangle from easy-vqa's own answers, on
    easy-vqa's train/test split (images never seen by VQA training stay in "test"); ``seed``
    only shuffles the train rows."""
    return _easy_vqa_classes(SHAPES, seed)


def colors(seed: int = 0) -> DatasetDict:
    """easy-VQA images labelled by the shape's colour (8 classes), like :func:`shapes`."""
    return _easy_vqa_classes(COLORS, seed)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: zero bytes, type 0x08 = uint8, rank, big-endian sizes), gzipped."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:3] != b"\x00\x00\x08":
        raise ImageDataError(f"{path} is not a uint8 IDX file; reinstall it: "
                             "sudo apt-get install --reinstall dataset-fashion-mnist")
    rank = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


@lru_cache(maxsize=2)
def _fashion_arrays(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split -> (uint8 images N x 28 x 28, labels N), read-only arrays decoded once per root."""
    out = {}
    for ours, prefix in (("train", "train"), ("test", "t10k")):
        files = [root / f"{prefix}-{kind}-idx{rank}-ubyte.gz" for kind, rank in (("images", 3), ("labels", 1))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ImageDataError(f"Fashion-MNIST not found ({', '.join(missing)} missing). Install it with "
                                 "`sudo apt-get install dataset-fashion-mnist`, or pass root= to a folder "
                                 "holding the four *-ubyte.gz files.")
        images, labels = (_read_idx(f) for f in files)
        if len(images) != len(labels) or images.ndim != 3:
            raise ImageDataError(f"Fashion-MNIST files in {root} disagree ({images.shape} images, {labels.shape} "
                                 "labels); reinstall: sudo apt-get install --reinstall dataset-fashion-mnist")
        out[ours] = (images, labels)
    return out


def fashion_mnist(root: str | Path | None = None) -> DatasetDict:
    """Fashion-MNIST (70k 28x28 clothing images, MIT) from the Debian package
    ``dataset-fashion-mnist`` (gzipped IDX files in /usr/share/datasets/fashion-mnist), on its
    official 60k/10k train/test split. The decoded arrays are cached, the datasets built anew."""
    from datasets import DatasetDict

    arrays = _fashion_arrays(Path(root) if root is not None else FASHION_MNIST_ROOT)
    return DatasetDict({split: from_arrays(images, labels, FASHION_MNIST_CLASSES)
                        for split, (images, labels) in arrays.items()})


def _name_key(name: str) -> tuple:
    return (0, int(name), name) if name.lstrip("-").isdigit() else (1, 0, name)


def _class_names(labels) -> list[str]:
    """Sorted class names; numeric names sort as numbers, so integer labels 0..K-1 keep their index."""
    return sorted({str(y) for y in labels}, key=_name_key)


def _from_paths(paths: list[str], labels: list[str], names: list[str]) -> Dataset:
    from datasets import Dataset

    return Dataset.from_dict({"image": paths, "label": [names.index(y) for y in labels]}, features=_features(names))


def _folder_items(folder: Path) -> list[tuple[str, str]]:
    """(image path, class) for every image under ``folder/<class>/``, sorted."""
    return [(str(p), d.name) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")
            for p in sorted(d.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]


def image_folder(root: str | Path, split: str = "train") -> DatasetDict:
    """Users' images laid out as ``root/<class>/*.png`` (one split, named ``split``), or as
    ``root/<split>/<class>/*`` when every sub-folder of root is a split name (train, test,
    validation, eval, calibration). Class names are the sorted class folder names, shared by all splits."""
    from datasets import DatasetDict

    root = Path(root)
    if not root.is_dir():
        raise ImageDataError(f"image_folder: {root} is not a folder; give one with a sub-folder per class.")
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    nested = bool(subdirs) and all(d.name in SPLIT_NAMES for d in subdirs)
    items = {d.name: _folder_items(d) for d in subdirs} if nested else {split: _folder_items(root)}
    names = _class_names(c for rows in items.values() for _, c in rows)
    if not names:
        raise ImageDataError(f"image_folder: no images under {root}/<class>/ (suffixes {sorted(IMAGE_SUFFIXES)}).")
    return DatasetDict({s: _from_paths([p for p, _ in rows], [c for _, c in rows], names) for s, rows in items.items()})


def _read_table(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise ImageDataError(f"image_table: {path} must end in .csv or .jsonl.")


def image_table(path: str | Path, image_column: str = "image", label_column: str = "label",
                split: str = "train") -> DatasetDict:
    """Users' images listed in a CSV or JSONL file: one row per image, its path (relative to the
    file's folder, or absolute) and its label (a class name or an integer)."""
    from datasets import DatasetDict

    path = Path(path)
    rows = _read_table(path)
    for i, row in enumerate(rows):
        if image_column not in row or label_column not in row:
            raise ImageDataError(f"image_table: row {i + 1} of {path} lacks column {image_column!r} or {label_column!r}.")
    paths = [str((path.parent / str(row[image_column])).resolve()) for row in rows]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ImageDataError(f"image_table: {len(missing)} image(s) listed in {path} do not exist, e.g. {missing[0]}.")
    labels = [str(row[label_column]) for row in rows]
    names = _class_names(labels)
    return DatasetDict({split: _from_paths(paths, labels, names)})


def _label_names(splits: dict, column: str) -> list[str] | None:
    """Class names of a ClassLabel column (the same in every split), else None (built from the values)."""
    from datasets import ClassLabel

    kinds = {tuple(f.names) if isinstance(f, ClassLabel) else None for f in (p.features[column] for p in splits.values())}
    if len(kinds) > 1:
        raise ImageDataError(f"from_datasets: column {column!r} has different class names in different splits; "
                             "cast every split to one datasets.ClassLabel first.")
    names = kinds.pop()
    return list(names) if names is not None else None


def from_datasets(ds: Dataset | DatasetDict, image_column: str = "image", label_column: str = "label",
                  split: str = "train") -> DatasetDict:
    """Any ``datasets`` dataset (a Dataset becomes split ``split``) with an image column (an
    ``Image`` feature or file paths) and a label column (ClassLabel, integers or strings),
    normalised to columns image (PIL, RGB) / label (ClassLabel) with class names shared by all splits."""
    from datasets import ClassLabel, Dataset, DatasetDict, Image, Value

    splits = {split: ds} if isinstance(ds, Dataset) else dict(ds)
    if not splits:
        raise ImageDataError("from_datasets: the DatasetDict has no splits; give it at least one Dataset.")
    for name, part in splits.items():
        for column in (image_column, label_column):
            if column not in part.column_names:
                raise ImageDataError(f"from_datasets: split {name!r} has no column {column!r} (has {part.column_names}).")
        feature = part.features[image_column]
        if not isinstance(feature, Image) and feature != Value("string"):
            raise ImageDataError(f"from_datasets: column {image_column!r} is {feature}; it must be a datasets.Image "
                                 "feature or image file paths (cast it with ds.cast_column(col, datasets.Image())).")
    names = _label_names(splits, label_column) or _class_names(y for part in splits.values() for y in part[label_column])
    out = {}
    for name, part in splits.items():
        part = part.select_columns([image_column, label_column])
        if not isinstance(part.features[label_column], ClassLabel):
            features = part.features.copy()
            features[label_column] = ClassLabel(names=names)
            part = part.map(lambda ys: {label_column: [names.index(str(y)) for y in ys]}, input_columns=label_column,
                            batched=True, features=features)
        part = part.cast_column(image_column, Image(mode="RGB"))
        part = part.rename_columns({c: n for c, n in ((image_column, "image"), (label_column, "label")) if c != n})
        out[name] = part.cast(_features(names))
    return DatasetDict(out)
