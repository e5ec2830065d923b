"""CLIP zero-shot classification for transformers ``CLIPModel`` and open_clip models, with or
without adapters attached. Conventions of open_clip's ``build_zero_shot_classifier``: for each
class, the L2-normalised text embeddings of its prompts (class name x templates) are averaged
and normalised again; an image is assigned the class whose embedding has the highest cosine.
Metrics as CLIP_benchmark: acc1, acc5 (with >= 5 classes), mean per-class recall."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from corda_vl.families import detect_family
from corda_vl.lab.resources import load_json_asset
from corda_vl.lab.eval.llm import model_device
from corda_vl.lab.eval.metrics import mean_per_class_recall, topk_accuracy

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def zero_shot_templates(name: str = "default") -> list[str]:
    """Prompt templates (``str.format`` with the class name) from ``assets/templates/zero_shot.json``."""
    templates = load_json_asset("templates/zero_shot.json")
    return list(templates.get(name, templates["default"]))


@dataclass
class ClipEncoder:
    """The three things zero-shot evaluation needs from a CLIP model, whatever its library."""

    encode_image: Callable[[torch.Tensor], torch.Tensor]
    encode_text: Callable[[list[str]], torch.Tensor]
    preprocess: Callable[[Any], torch.Tensor]
    """PIL image -> (3, H, W) tensor as the model was trained on."""
    device: torch.device


def _features(out: Any) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def default_preprocess(image_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> Callable[[Any], torch.Tensor]:
    """CLIP's evaluation transform: bicubic resize of the short side, centre crop, normalise."""
    from torchvision import transforms as T

    return T.Compose([T.Lambda(lambda im: im.convert("RGB")),
                      T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(mean, std)])


def clip_encoder(model: nn.Module, tokenizer: Any = None, preprocess: Callable | None = None) -> ClipEncoder:
    """A :class:`ClipEncoder` for a transformers CLIPModel or an open_clip model (PEFT-wrapped or not).

    ``tokenizer``: transformers models need theirs (a ``CLIPTokenizer`` or any tokenizer the
    text tower was trained with); open_clip models default to ``open_clip.get_tokenizer('ViT-B-32')``
    (shipped with open_clip, no download). ``preprocess`` defaults to CLIP's transform at the
    tower's image size.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT-wrapped: same calls
    family = detect_family(base).name
    device = model_device(model)
    if family == "hf_clip":
        config = model.config
        if tokenizer is None:
            raise ValueError("a transformers CLIPModel needs its tokenizer: clip_encoder(model, tokenizer=...).")
        length = config.text_config.max_position_embeddings

        def encode_text(texts: list[str]) -> torch.Tensor:
            enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=length)
            return _features(model.get_text_features(input_ids=enc["input_ids"].to(device),
                                                     attention_mask=enc["attention_mask"].to(device)))

        return ClipEncoder(lambda px: _features(model.get_image_features(pixel_values=px.to(device))), encode_text,
                           preprocess or default_preprocess(config.vision_config.image_size), device)
    if family == "open_clip":
        import open_clip

        tok = tokenizer or open_clip.get_tokenizer("ViT-B-32")
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return ClipEncoder(lambda px: model.encode_image(px.to(device)), lambda texts: model.encode_text(tok(texts).to(device)),
                           preprocess or open_clip.image_transform(size, is_train=False), device)
    raise ValueError(f"zero-shot evaluation needs a CLIP model (hf_clip or open_clip family); got family {family!r}.")


@torch.no_grad()
def build_zero_shot_classifier(encoder: ClipEncoder, classnames: Sequence[str], templates: Sequence[str],
                               batch_size: int = 64) -> torch.Tensor:
    """(embed_dim, n_classes) matrix of normalised, template-averaged class embeddings."""
    columns = []
    for name in classnames:
        prompts = [t.format(name) for t in templates]
        emb = torch.cat([encoder.encode_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).mean(0)
        columns.append(torch.nn.functional.normalize(emb, dim=0))
    return torch.stack(columns, dim=1)


@torch.no_grad()
def image_logits(encoder: ClipEncoder, classifier: torch.Tensor, dataset, batch_size: int = 64,
                 progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine logits n x classes, labels n) for rows with "image" (PIL) and "label"."""
    logits, labels = [], []
    rows = dataset if hasattr(dataset, "__len__") else list(dataset)
    for start in tqdm(range(0, len(rows), batch_size), desc="zero-shot", disable=not progress):
        batch = rows[start:start + batch_size]
        if isinstance(batch, dict):  # a datasets.Dataset slice is a dict of columns
            images, targets = batch["image"], batch["label"]
        else:
            images, targets = [r["image"] for r in batch], [r["label"] for r in batch]
        pixels = torch.stack([encoder.preprocess(im) for im in images])
        feats = torch.nn.functional.normalize(encoder.encode_image(pixels).float(), dim=-1)
        logits.append(feats @ classifier.to(feats.device))
        labels.append(torch.as_tensor(targets))
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def zero_shot_eval(encoder: ClipEncoder, dataset, classnames: Sequence[str], templates: Sequence[str] | None = None,
                   *, batch_size: int = 64, progress: bool = True) -> dict[str, float]:
    """acc1, acc5 (with >= 5 classes) and mean per-class recall of zero-shot classification; "correct"
    says per image whether its top-1 class is right (for per-item statistics)."""
    classifier = build_zero_shot_classifier(encoder, classnames, templates or zero_shot_templates(), batch_size)
    logits, labels = image_logits(encoder, classifier, dataset, batch_size, progress)
    out = {"acc1": topk_accuracy(logits, labels, 1),
           "mean_per_class_recall": mean_per_class_recall(logits.argmax(1), labels), "n": int(labels.shape[0]),
           "correct": (logits.argmax(1) == labels).tolist()}
    if len(classnames) >= 5:
        out["acc5"] = topk_accuracy(logits, labels, 5)
    return out
