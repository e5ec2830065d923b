"""Generated glyph images: a classification set no model here has seen (the default CLIP was
trained on digits and easy-VQA shapes / colours only), for recipes that teach a new task.

:func:`letters` draws capital letters with Pillow's bundled default font (``ImageFont.load_default``,
FreeType) at a random size, position and small rotation, in a random bright colour on a random
dark background (light strokes on dark, as in the digits the model knows, so the task is
learnable by a small adapter; random dark-on-light colours made it far harder), rendered at twice
the size and box-downsampled (anti-aliased). Every image is a pure function of
``(seed, split, index)`` and its label is ``index % classes``: the same seed gives the same pixels
on every run and machine with the same Pillow, a longer split extends a shorter one, and labels are
balanced. Class names ("letter A") read well in zero-shot prompts ("a photo of a letter A.").
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from corda_vl.errors import CordaError
from corda_vl.lab.data.images import from_arrays

if TYPE_CHECKING:
    from datasets import DatasetDict

# Ten capitals that look like no digit (0/O, 1/I, 2/Z, 5/S, 6/G, 8/B) and no easy-VQA shape (O).
LETTERS = "AEFHKMPRTX"
SPLIT_IDS = {"train": 0, "test": 1}
SUPERSAMPLE = 2
INK = (150, 256)  # per-channel range of the letter's colour: bright, like the digits' white ink
PAPER = (0, 80)  # and of the background: dark, so strokes stay what the features respond to


class GlyphError(CordaError):
    """Glyph images cannot be generated with these arguments or this Pillow."""


@lru_cache(maxsize=64)
def _font(pixels: int):
    from PIL import ImageFont

    font = ImageFont.load_default(pixels)
    if not isinstance(font, ImageFont.FreeTypeFont):
        raise GlyphError("glyph images need Pillow with FreeType (ImageFont.load_default(size) returned a bitmap "
                         "font); install a Pillow wheel from PyPI (pip install -U pillow).")
    return font


def _colours(rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(letter, background) RGB colours: a random bright ink on a random dark background."""
    return tuple(int(c) for c in rng.integers(*INK, size=3)), tuple(int(c) for c in rng.integers(*PAPER, size=3))


def render_glyph(text: str, rng: np.random.Generator, size: int = 32, scale: tuple[float, float] = (0.75, 1.0),
                 max_rotation: float = 10.0) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``text``: font height a random fraction ``scale`` of the
    image, rotated by up to ``max_rotation`` degrees, placed at random where it fits."""
    from PIL import Image, ImageDraw

    canvas = size * SUPERSAMPLE
    fg, bg = _colours(rng)
    font = _font(round(rng.uniform(*scale) * canvas))
    left, top, right, bottom = font.getbbox(text)
    glyph = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(glyph).text((-left, -top), text, fill=255, font=font)
    glyph = glyph.rotate(float(rng.uniform(-max_rotation, max_rotation)), resample=Image.Resampling.BICUBIC,
                         expand=True)
    if max(glyph.size) > canvas:  # a large rotated glyph: shrink it to fit
        side = canvas / max(glyph.size)
        glyph = glyph.resize((max(1, int(glyph.width * side)), max(1, int(glyph.height * side))),
                             Image.Resampling.BOX)
    x = int(rng.integers(0, canvas - glyph.width + 1))
    y = int(rng.integers(0, canvas - glyph.height + 1))
    mask = Image.new("L", (canvas, canvas), 0)
    mask.paste(glyph, (x, y))
    image = Image.composite(Image.new("RGB", mask.size, fg), Image.new("RGB", mask.size, bg), mask)
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.uint8)


def _split(seed: int, split: str, n: int, chars: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % len(chars)
    images = np.stack([render_glyph(chars[y], np.random.default_rng([seed, SPLIT_IDS[split], i]), size)
                       for i, y in enumerate(labels)])
    return images, labels


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise GlyphError(f"letters: {name} must be a positive int, got {value!r}.")


def letters(seed: int = 0, n_train: int = 2000, n_test: int = 500, *, chars: str = LETTERS,
            size: int = 32) -> DatasetDict:
    """Capital letters as a "train" / "test" ``DatasetDict`` (columns image: PIL RGB ``size`` x
    ``size``, label: ClassLabel "letter A", ...), generated (offline, deterministic per ``seed``).
    ``chars``: the classes, distinct capital letters A-Z (default: 10 that resemble no digit or
    shape the default CLIP knows). Labels cycle through the classes, so they are balanced."""
    from datasets import DatasetDict

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise GlyphError(f"letters: seed must be a non-negative int, got {seed!r}.")
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    if (not isinstance(chars, str) or len(chars) < 2 or len(set(chars)) != len(chars)
            or not all("A" <= c <= "Z" for c in chars)):
        raise GlyphError(f"letters: chars must be at least 2 distinct capital letters A-Z, got {chars!r}.")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise GlyphError(f"letters: size must be an int >= 8 pixels, got {size!r}.")
    names = [f"letter {c}" for c in chars]
    return DatasetDict({split: from_arrays(*_split(int(seed), split, n, chars, size), names)
                        for split, n in (("train", int(n_train)), ("test", int(n_test)))})
