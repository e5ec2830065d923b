"""Training losses the recipes share: answer-token cross-entropy for causal LMs and LLaVA, and
the zero-shot-classifier cross-entropy for CLIP (FLYP-style: the class prompts go through the
text tower at every step, so text-tower adapters learn too)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from corda_vl.lab.eval.llm import model_device, padding_side
from corda_vl.families.base import batch_to_device


def answer_batch(tokenizer, prompts: Sequence[str], answers: Sequence[str], *, processor: Any = None,
                 images: Sequence[Any] | None = None) -> tuple[dict, torch.Tensor]:
    """Left-padded inputs ``"prompt answer<eos>"`` and the targets of the last positions: the answer
    tokens (prompt tokens inside that window are -100). With ``processor`` (LLaVA) the images go
    through it and ``<image>`` in the prompt is expanded to the image tokens."""
    texts = [f"{p} {a}{tokenizer.eos_token}" for p, a in zip(prompts, answers)]
    with padding_side(tokenizer, "left"):
        if processor is not None:
            inputs = dict(processor(text=texts, images=list(images), return_tensors="pt", padding=True))
        else:
            inputs = dict(tokenizer(texts, return_tensors="pt", padding=True))
    lengths = [len(tokenizer(f" {a}{tokenizer.eos_token}", add_special_tokens=False)["input_ids"]) for a in answers]
    keep = max(lengths)
    targets = inputs["input_ids"][:, -keep:].clone()
    for i, n in enumerate(lengths):
        targets[i, : keep - n] = -100
    return inputs, targets


def answer_loss(model, inputs: dict, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; only the last positions' logits are computed."""
    device = model_device(model)
    inputs = batch_to_device(inputs, device)
    logits = model(**inputs, logits_to_keep=targets.shape[1] + 1).logits[:, :-1]
    return F.cross_entropy(logits.float().transpose(1, 2), targets.to(device), ignore_index=-100)


def clip_class_loss(encoder, pixel_values: torch.Tensor, labels: torch.Tensor, class_prompts: Sequence[str],
                    logit_scale: float) -> torch.Tensor:
    """Cross-entropy of ``logit_scale * cos(image, class prompt)`` against the labels."""
    image = F.normalize(encoder.encode_image(pixel_values).float(), dim=-1)
    text = F.normalize(encoder.encode_text(list(class_prompts)).float(), dim=-1)
    return F.cross_entropy(logit_scale * image @ text.T, labels.to(image.device))
