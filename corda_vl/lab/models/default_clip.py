"""The offline default CLIP, and one loader for CLIP models: the embedded alias, a local
transformers folder or a hub id.

No CLIP weights can be had offline, so the default is *built here*: a small
transformers ``CLIPModel`` (recipe as data in ``assets/models/default_clip.json``) trained
contrastively on the train splits of scikit-learn digits and easy-VQA, with captions made from
their labels ("a photo of a red circle."), tokenised by OpenAI CLIP's real BPE vocabulary (shipped
by open_clip). It is evaluated zero-shot on the held-out test splits, saved with its tokenizer,
image processor and a ``corda_vl_build.json`` record, and cached: the first
``load_clip("corda-vl-clip")`` builds it (minutes, printed), later calls read the folder. Its ViT
is a stock ``CLIPVisionModel``, so the default LLaVA reuses it as its vision tower.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from corda_vl.atomic import atomic_dir
from corda_vl.errors import CordaError
from corda_vl.lab.resources import load_json_asset, merge_overrides
from corda_vl.scaleout.distributed import main_process_first
from corda_vl.lab.models.cache import (BUILD_RECORD, build_environment, built_from, model_dir, pinned_threads,
                                       require_local_path)
from corda_vl.lab.training import warmup_cosine

DEFAULT_CLIP = "corda-vl-clip"
# Embedded alias -> size in assets/models/default_clip.json. The tiny one exists for tests.
ALIASES = {DEFAULT_CLIP: "default", f"{DEFAULT_CLIP}-tiny": "tiny"}


class DefaultClipError(CordaError):
    """The default CLIP cannot be built or a CLIP folder / id cannot be loaded."""


# ----------------------------------------------------------------------------- recipe as data

def clip_recipe(size: str = "default") -> dict:
    """The full recipe of one size: the asset's ``default`` entry with that size's overrides on top,
    plus the shared normalisation, caption templates and evaluation sets."""
    asset = load_json_asset("models/default_clip.json")
    if size not in asset["sizes"]:
        raise DefaultClipError(f"default CLIP size {size!r} is not in assets/models/default_clip.json; "
                               f"choose one of {sorted(asset['sizes'])}.")
    recipe = merge_overrides(asset["sizes"]["default"], asset["sizes"][size])
    recipe.update(size=size, normalize=asset["normalize"], caption_templates=asset["caption_templates"],
                  eval=asset["eval"])
    return recipe


# ----------------------------------------------------------------------------- tokenizer

def _open_clip_bpe():
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError as exc:
        raise DefaultClipError("the default CLIP uses OpenAI CLIP's BPE vocabulary shipped by open_clip: "
                               "run `pip install open_clip_torch` (or `pip install -e '.[vlm]'`).") from exc
    return SimpleTokenizer()


def write_bpe_files(folder: str | Path) -> tuple[Path, Path]:
    """vocab.json and merges.txt (the GPT-2 / transformers format) of OpenAI CLIP's BPE, derived from
    open_clip's ``SimpleTokenizer``: same ids, with the start/end tokens under transformers' names."""
    bpe = _open_clip_bpe()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): i for token, i in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def clip_bpe_tokenizer(folder: str | Path, max_length: int):
    """A transformers ``CLIPTokenizer`` over OpenAI CLIP's BPE (vocab/merges written into ``folder``),
    giving the ids open_clip's tokenizer gives; texts longer than ``max_length`` are truncated."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_bpe_files(folder)
    return CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file), model_max_length=max_length)


# ----------------------------------------------------------------------------- data

def _preprocess(image_size: int, normalize: dict) -> Callable[[Any], torch.Tensor]:
    from corda_vl.lab.eval.clip import default_preprocess

    return default_preprocess(image_size, tuple(normalize["mean"]), tuple(normalize["std"]))


def _limit(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


def _train_images(recipe: dict, preprocess) -> dict[str, dict]:
    """Per source: preprocessed train images (N, 3, H, W) and their attributes ("digit:7",
    "shape:circle", "color:red"). easy-VQA images carry both attributes where easy-vqa's own
    answers settle them (one of them where only one is settled)."""
    from PIL import Image

    from corda_vl.lab.data.images import digits
    from corda_vl.lab.data.vqa import COLORS, SHAPES, easy_vqa_labels, easy_vqa_split

    cap = recipe["data"]["max_train_images"]
    train = digits()["train"]
    train = train.select(range(_limit(len(train), cap)))
    out = {"digits": {"pixels": torch.stack([preprocess(im) for im in train["image"]]),
                      "attrs": [(f"digit:{train.features['label'].names[y]}",) for y in train["label"]]}}
    shapes, colors = easy_vqa_labels("train", SHAPES), easy_vqa_labels("train", COLORS)
    paths = easy_vqa_split("train")[1]
    ids = sorted(set(shapes) | set(colors))
    ids = ids[:_limit(len(ids), cap)]
    attrs = [tuple(a for a in (f"shape:{shapes[i]}" if i in shapes else None,
                               f"color:{colors[i]}" if i in colors else None) if a) for i in ids]
    out["easy_vqa"] = {"pixels": torch.stack([preprocess(Image.open(paths[i])) for i in ids]), "attrs": attrs}
    return out


def _captions(recipe: dict) -> tuple[list[str], list[frozenset[str]], dict[str, list[int]]]:
    """Every caption the training can draw (templates x labels), its attribute set, and the caption
    indices per kind ("digit", "shape_color", "shape", "color") keyed further by attributes."""
    from corda_vl.lab.data.vqa import COLORS, SHAPES

    templates = recipe["caption_templates"]
    texts, attrs, index = [], [], {}
    fills = {"digit": [{"digit": str(d)} for d in range(10)],
             "shape": [{"shape": s} for s in SHAPES], "color": [{"color": c} for c in COLORS],
             "shape_color": [{"shape": s, "color": c} for s in SHAPES for c in COLORS]}
    for kind, values in fills.items():
        for fill in values:
            key = frozenset(f"{k}:{v}" for k, v in fill.items())
            for template in templates[kind]:
                index.setdefault(key, []).append(len(texts))
                texts.append(template.format(**fill))
                attrs.append(key)
    return texts, attrs, index


def _caption_for(attrs: tuple[str, ...], kind_p: dict[str, float], index: dict, rng: np.random.Generator) -> int:
    """A caption index for an image with ``attrs``: digits take a digit template; easy-VQA images
    with both attributes draw shape+colour / shape / colour captions in the recipe's proportions."""
    if len(attrs) == 2:
        kinds = list(kind_p)
        kind = kinds[rng.choice(len(kinds), p=np.array([kind_p[k] for k in kinds]) / sum(kind_p.values()))]
        key = frozenset(attrs) if kind == "shape_color" else frozenset(a for a in attrs if a.startswith(kind + ":"))
    else:
        key = frozenset(attrs)
    options = index[key]
    return options[rng.integers(len(options))]


def _shift(pixels: torch.Tensor, max_shift: int, rng: np.random.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` pixels per image (edges replicated): the only
    augmentation, as flips would turn digits into other glyphs and colour jitter would change labels."""
    if max_shift <= 0:
        return pixels
    size = pixels.shape[-1]
    padded = torch.nn.functional.pad(pixels, (max_shift,) * 4, mode="replicate")
    offsets = rng.integers(0, 2 * max_shift + 1, size=(len(pixels), 2))
    return torch.stack([padded[i, :, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets)])


# ----------------------------------------------------------------------------- training

def _new_model(recipe: dict):
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(recipe["train"]["seed"])
        return CLIPModel(CLIPConfig(**recipe["model"]))


def _embed_images(model, pixels: torch.Tensor) -> torch.Tensor:
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


def _embed_texts(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, positives: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with a learnable temperature, where a caption may be the positive of
    several images (UniCL, Yang et al. 2022): with only 10 digit classes a batch holds many images of
    "a 7", and treating them as negatives of each other would teach the model to tell apart what
    the captions do not. ``positives`` (images x captions, bool) has at least one True per row and
    column; with one per row and column this is exactly CLIP's loss."""
    image_emb = torch.nn.functional.normalize(image_emb, dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def _optimizer(model, train: dict) -> torch.optim.Optimizer:
    """AdamW with CLIP's exclusions: no weight decay on gains, biases and the temperature."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    return torch.optim.AdamW([{"params": decay, "weight_decay": train["weight_decay"]},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"])


def _batch_plan(recipe: dict, images: dict, rng: np.random.Generator):
    """Per step: (source, row indices) pairs, sources sampled without replacement epoch by epoch and
    in the recipe's proportions, so every image is seen equally often within its source."""
    batch, mix = recipe["train"]["batch_size"], recipe["data"]["mix"]
    counts = {s: round(batch * w / sum(mix.values())) for s, w in mix.items()}
    counts[next(iter(counts))] += batch - sum(counts.values())
    queues = {s: np.empty(0, dtype=np.int64) for s in mix}
    while True:
        plan = []
        for source, n in counts.items():
            while len(queues[source]) < n:
                queues[source] = np.concatenate([queues[source], rng.permutation(len(images[source]["attrs"]))])
            plan.append((source, queues[source][:n]))
            queues[source] = queues[source][n:]
        yield plan


def _train(model, tokenizer, recipe: dict, images: dict, progress: bool) -> list[float]:
    """Contrastive training; returns the loss every step. Deterministic for a given recipe, torch
    version and thread count (one numpy generator drives all sampling, torch's seed the init)."""
    from tqdm.auto import tqdm

    train, data = recipe["train"], recipe["data"]
    rng = np.random.default_rng(train["seed"])
    texts, caption_attrs, index = _captions(recipe)
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    attribute_names = sorted(set().union(*caption_attrs))
    caption_bits = torch.tensor([[a in attrs for a in attribute_names] for attrs in caption_attrs])
    optimizer = _optimizer(model, train)
    plans = _batch_plan(recipe, images, rng)
    losses = []
    model.train()
    for step in tqdm(range(train["steps"]), desc="training CLIP", disable=not progress):
        pixels, image_attrs, caption_ids = [], [], []
        for source, rows in next(plans):
            pixels.append(images[source]["pixels"][torch.from_numpy(rows)])
            for r in rows:
                attrs = images[source]["attrs"][r]
                image_attrs.append(attrs)
                caption_ids.append(_caption_for(attrs, data["easy_vqa_caption"], index, rng))
        pixels = _shift(torch.cat(pixels), data["max_shift"], rng)
        unique = sorted(set(caption_ids))
        image_bits = torch.tensor([[a in attrs for a in attribute_names] for attrs in image_attrs])
        # caption j is a positive of image i when every attribute it names is one the image has
        positives = (caption_bits[unique].float() @ (~image_bits).float().T).T == 0
        for group in optimizer.param_groups:
            group["lr"] = train["lr"] * warmup_cosine(step, train["steps"], train["warmup_steps"])
        loss = contrastive_loss(_embed_images(model, pixels),
                                _embed_texts(model, tokens["input_ids"][unique], tokens["attention_mask"][unique]),
                                positives, model.logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train["grad_clip_norm"])
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(train["max_logit_scale"]))
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- evaluation

def _eval_sets(recipe: dict) -> dict[str, Any]:
    from corda_vl.lab.data import images

    cap = recipe["data"]["max_eval_images"]
    out = {}
    for name in recipe["eval"]:
        test = getattr(images, name)()["test"]
        out[name] = test.select(range(_limit(len(test), cap)))
    return out


def evaluate_default_clip(model, tokenizer, preprocess, recipe: dict, progress: bool = True) -> dict[str, dict]:
    """Zero-shot scores on the held-out test splits (class names x the evaluation templates of
    ``assets/templates/zero_shot.json``), with chance for comparison."""
    from corda_vl.lab.eval.clip import clip_encoder, zero_shot_eval, zero_shot_templates

    encoder = clip_encoder(model.eval(), tokenizer, preprocess)
    scores = {}
    for name, test in _eval_sets(recipe).items():
        classes = test.features["label"].names
        result = zero_shot_eval(encoder, test, classes, zero_shot_templates(recipe["eval"][name]), progress=progress)
        scores[name] = {**result, "chance": 1 / len(classes)}
    return scores


# ----------------------------------------------------------------------------- build

def _image_processor(image_size: int, normalize: dict):
    """The eval transform as a transformers image processor, so LLaVA processors and other tools
    read the model's size and normalisation from the folder."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(normalize["mean"]), image_std=list(normalize["std"]), resample=3)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_default_clip(out_dir: str | Path, *, size: str = "default", progress: bool = True,
                       overwrite: bool = False) -> dict:
    """Train the default CLIP of ``size`` into ``out_dir`` (written atomically) and return its
    build record: recipe, parameters, zero-shot scores next to chance, seconds, data used."""
    t_start = time.perf_counter()
    recipe = clip_recipe(size)
    image_size = recipe["model"]["vision_config"]["image_size"]
    preprocess = _preprocess(image_size, recipe["normalize"])
    with atomic_dir(out_dir, overwrite=overwrite) as tmp, pinned_threads(recipe["train"]["threads"]):
        tokenizer = clip_bpe_tokenizer(tmp, recipe["model"]["text_config"]["max_position_embeddings"])
        t0 = time.perf_counter()
        images = _train_images(recipe, preprocess)
        data_s = time.perf_counter() - t0
        model = _new_model(recipe)
        t0 = time.perf_counter()
        losses = _train(model, tokenizer, recipe, images, progress)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = evaluate_default_clip(model, tokenizer, preprocess, recipe, progress)
        eval_s = time.perf_counter() - t0
        record = {
            "name": DEFAULT_CLIP if size == "default" else f"{DEFAULT_CLIP}-{size}",
            "recipe": recipe,
            "parameters": {"total": _count(model), "vision": _count(model.vision_model),
                           "text": _count(model.text_model)},
            "scores": scores,
            "loss": {"first": losses[0], "last": losses[-1]},
            "data": {"train": {s: len(v["attrs"]) for s, v in images.items()},
                     "sources": "scikit-learn load_digits (corda_vl.lab.data.digits() train split); easy-vqa train "
                                "images with shape / colour labels from easy-vqa's answers",
                     "eval": {name: s["n"] for name, s in scores.items()},
                     "eval_templates": "assets/templates/zero_shot.json"},
            "preprocess": {"image_size": image_size, "resize": "bicubic, shortest edge, centre crop",
                           **recipe["normalize"]},
            "environment": build_environment(),
        }
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _image_processor(image_size, recipe["normalize"]).save_pretrained(tmp)
        record["seconds"] = {"data": data_s, "train": train_s, "eval": eval_s,
                             "total": time.perf_counter() - t_start}
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2))
    return {**record, "path": str(out_dir)}


# ----------------------------------------------------------------------------- loading

@main_process_first()
def default_clip_dir(name: str = DEFAULT_CLIP, *, cache_dir: str | Path | None = None, rebuild: bool = False,
                     progress: bool = True) -> Path:
    """The cached folder of an embedded CLIP (``<cache>/models/<name>``), built on first use (or
    when ``rebuild``). A folder built from an older recipe is rebuilt, so the cache always holds
    what the asset says."""
    if name not in ALIASES:
        raise DefaultClipError(f"{name!r} is not an embedded CLIP; choose one of {sorted(ALIASES)}.")
    size = ALIASES[name]
    target = model_dir(name, cache_dir)
    built = None if rebuild else built_from(target, clip_recipe(size))
    if built:
        return target
    if built is False:
        print(f"[corda_vl] {target} was built from another recipe; rebuilding it")
    print(f"[corda_vl] building the default CLIP {name!r} ({size} size) into {target}: trained here on "
          "digits + easy-VQA, once (the default size takes several minutes)")
    t0 = time.perf_counter()
    result = build_default_clip(target, size=size, progress=progress, overwrite=True)
    scores = ", ".join(f"{k} {v['acc1']:.1%} (chance {v['chance']:.1%})" for k, v in result["scores"].items())
    print(f"[corda_vl] built {name} in {time.perf_counter() - t0:.0f} s; zero-shot acc1: {scores}")
    return target


def _folder_preprocess(path: str, image_size: int) -> Callable[[Any], torch.Tensor]:
    """The eval transform at the model's image size, with the normalisation its image processor
    config states (CLIP's when there is none)."""
    from transformers import CLIPImageProcessor

    from corda_vl.lab.eval.clip import CLIP_MEAN, CLIP_STD

    try:
        processor = CLIPImageProcessor.from_pretrained(path)
        normalize = {"mean": processor.image_mean, "std": processor.image_std}
    except OSError:
        normalize = {"mean": CLIP_MEAN, "std": CLIP_STD}
    return _preprocess(image_size, normalize)


def load_clip(name_or_path: str = DEFAULT_CLIP, *, cache_dir: str | Path | None = None,
              device: str | torch.device | None = None):
    """(model, tokenizer, preprocess) for a transformers CLIP: the embedded default
    ``"corda-vl-clip"`` (built into the cache on first use; ``cache_dir`` replaces
    ``$CORDA_VL_CACHE``), a local folder or a hub id. ``preprocess`` maps a PIL image to the
    normalised tensor the model was trained on."""
    from transformers import CLIPModel, CLIPTokenizer

    path = (str(default_clip_dir(name_or_path, cache_dir=cache_dir)) if name_or_path in ALIASES
            else require_local_path(name_or_path))
    try:
        model = CLIPModel.from_pretrained(path)
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except OSError as exc:
        raise DefaultClipError(f"load_clip: {name_or_path!r} is neither an embedded alias ({sorted(ALIASES)}) nor a "
                               "folder / hub id with a transformers CLIPModel and CLIPTokenizer "
                               f"(offline, hub ids must already be in the HF cache): {exc}") from exc
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer, _folder_preprocess(path, model.config.vision_config.image_size)
