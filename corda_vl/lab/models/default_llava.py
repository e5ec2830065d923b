"""The offline default LLaVA, built here from real parts: the default CLIP's ViT (vision tower),
SmolLM2-135M-Instruct (language model, frozen) and a two-layer MLP projector trained on easy-VQA
(LLaVA's stage 1: only the projector learns). Recipe as data in ``assets/models/default_llava.json``.

Because the language model is frozen, text-only prompts get exactly SmolLM2's answers (capital
questions included), while image questions go through the trained projector. The build is
deterministic, cached in ``<cache>/models/corda-vl-llava`` and prints what it built.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from corda_vl.atomic import atomic_dir
from corda_vl.lab.losses import answer_batch, answer_loss
from corda_vl.errors import CordaError
from corda_vl.lab.resources import load_json_asset, merge_overrides
from corda_vl.scaleout.distributed import main_process_first
from corda_vl.lab.models.cache import (BUILD_RECORD, build_environment, built_from, model_dir, pinned_threads,
                                       require_local_path)
from corda_vl.lab.training import warmup_cosine
from corda_vl.lab.models.default_clip import default_clip_dir
from corda_vl.lab.models.llama import load_llama

DEFAULT_LLAVA = "corda-vl-llava"
ALIASES = {DEFAULT_LLAVA: "default", f"{DEFAULT_LLAVA}-tiny": "tiny"}
IMAGE_TOKEN = "<image>"


class DefaultLlavaError(CordaError):
    """The default LLaVA cannot be built, or a LLaVA folder / id cannot be loaded."""


def llava_recipe(size: str = "default") -> dict:
    asset = load_json_asset("models/default_llava.json")
    if size not in asset["sizes"]:
        raise DefaultLlavaError(f"default LLaVA size {size!r} is not in assets/models/default_llava.json; "
                                f"choose one of {sorted(asset['sizes'])}.")
    recipe = merge_overrides(asset["sizes"]["default"], asset["sizes"][size])
    recipe.update(size=size, template=asset["template"], capital_shots_by_population=asset["capital_shots_by_population"])
    return recipe


def assemble_llava(clip_dir: str | Path, lm, tokenizer, recipe: dict, seed: int = 0):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a CLIP folder and a causal LM: vision
    tower and language model copied exactly, projector freshly initialised (seeded)."""
    from transformers import (CLIPImageProcessor, CLIPModel, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)

    clip = CLIPModel.from_pretrained(clip_dir)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    rows = lm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        # The new row is never read as an input (image tokens become features), but a tied LM head
        # turns it into one more logit: make it deterministic (the mean row), not a random draw.
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = lm.get_input_embeddings().weight
            weight[rows:] = weight[:rows].mean(0)
    spec = recipe["model"]
    config = LlavaConfig(vision_config=clip.config.vision_config.to_dict(), text_config=lm.config.to_dict(),
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), **spec)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    getattr(tower, "vision_model", tower).load_state_dict(clip.vision_model.state_dict())  # transformers 4 / 5
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.tie_weights()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(clip_dir), tokenizer=tokenizer,
                               patch_size=clip.config.vision_config.patch_size,
                               vision_feature_select_strategy=spec["vision_feature_select_strategy"],
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=1)
    return model.eval(), processor


def train_projector(model, processor, rows: list[dict], recipe: dict, progress: bool = True) -> list[float]:
    """Stage 1: only the projector learns, from the answer tokens' cross-entropy."""
    from tqdm.auto import tqdm

    train = recipe["train"]
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.model.multi_modal_projector.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    rng = random.Random(train["seed"])
    order = list(range(len(rows)))
    rng.shuffle(order)
    losses = []
    model.train()
    for step in tqdm(range(train["steps"]), desc="training the projector", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = train["lr"] * warmup_cosine(step, train["steps"], train["warmup_steps"])
        start = step * train["batch_size"] % len(order)
        batch = [rows[order[(start + i) % len(order)]] for i in range(train["batch_size"])]
        inputs, targets = answer_batch(processor.tokenizer, [recipe["template"].format(question=r["question"]) for r in batch],
                                       [r["answer"] for r in batch], processor=processor, images=[r["image"] for r in batch])
        loss = answer_loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train["grad_clip_norm"])
        opt.step()
        losses.append(loss.item())
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def _sample(rows, n: int | None, seed: int):
    """A seeded subset of a datasets.Dataset (images stay lazy: nothing is decoded here)."""
    if n is None or n >= len(rows):
        return rows
    return rows.select(sorted(random.Random(seed).sample(range(len(rows)), n)))


def evaluate_default_llava(model, processor, recipe: dict, progress: bool = True, vqa_data=None) -> dict[str, Any]:
    """VQA accuracy on held-out easy-VQA questions next to the answer prior (always the commonest
    answer), and capital-question exact match through the frozen LM. ``vqa_data``: an
    ``easy_vqa()`` already built (its seed only orders the train rows, which neither score reads)."""
    from collections import Counter

    from corda_vl.lab.data import easy_vqa, knowledge_qa, knowledge_shots
    from corda_vl.lab.eval.llm import qa_exact_match
    from corda_vl.lab.eval.vlm import vqa_accuracy

    spec, vqa_data = recipe["eval"], vqa_data or easy_vqa()
    vqa_rows = _sample(vqa_data["eval"], spec["vqa_questions"], spec["seed"])
    vqa = vqa_accuracy(model, processor, vqa_rows, template=recipe["template"], progress=progress)
    commonest = Counter(vqa_data["train"]["answer"]).most_common(1)[0][0]
    prior = sum(a == commonest for a in vqa_rows["answer"]) / len(vqa_rows)
    shots = knowledge_shots(recipe["capital_shots_by_population"], "capital")
    capitals = _sample(knowledge_qa(fields=("capital",))["eval"], spec["capital_questions"], spec["seed"])
    cap = qa_exact_match(model, processor.tokenizer, capitals, shots=shots, progress=progress)
    return {"vqa": {"accuracy": vqa["vqa_accuracy"], "n": vqa["n"], "commonest_answer_accuracy": prior},
            "capitals": {"exact_match": cap["exact_match"], "n": cap["n"]}}


def build_default_llava(out_dir: str | Path, *, size: str = "default", clip_dir: str | Path | None = None,
                        language_model: str | None = None, cache_dir: str | Path | None = None,
                        progress: bool = True, overwrite: bool = False) -> dict:
    """Assemble, train and evaluate the default LLaVA of ``size`` into ``out_dir`` (atomic)."""
    from corda_vl.lab.data import easy_vqa

    t_start = time.perf_counter()
    recipe = llava_recipe(size)
    clip_dir = Path(clip_dir or default_clip_dir(recipe["clip"], cache_dir=cache_dir, progress=progress))
    with pinned_threads(recipe["train"]["threads"]):
        lm, tokenizer = load_llama(language_model or recipe["language_model"])
        model, processor = assemble_llava(clip_dir, lm, tokenizer, recipe, seed=recipe["train"]["seed"])
        vqa_data = easy_vqa(seed=recipe["train"]["seed"])
        rows = _sample(vqa_data["train"], recipe["train"]["max_train_questions"], 0)
        t0 = time.perf_counter()
        losses = train_projector(model, processor, rows, recipe, progress)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = evaluate_default_llava(model, processor, recipe, progress, vqa_data)
        environment = build_environment()
    record = {"name": DEFAULT_LLAVA if size == "default" else f"{DEFAULT_LLAVA}-{size}", "recipe": recipe,
              "clip": str(clip_dir), "language_model": language_model or recipe["language_model"],
              "parameters": {"total": sum(p.numel() for p in model.parameters()),
                             "projector": sum(p.numel() for p in model.model.multi_modal_projector.parameters())},
              "scores": scores, "loss": {"first": losses[0], "last": losses[-1]}, "environment": environment,
              "seconds": {"train": train_s, "eval": time.perf_counter() - t0}}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        record["seconds"]["total"] = time.perf_counter() - t_start
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2))
    return {**record, "path": str(out_dir)}


@main_process_first()
def default_llava_dir(name: str = DEFAULT_LLAVA, *, cache_dir: str | Path | None = None, rebuild: bool = False,
                      progress: bool = True) -> Path:
    """The cached folder of an embedded LLaVA, built on first use (or when ``rebuild``, or when the
    recipe changed since it was built)."""
    if name not in ALIASES:
        raise DefaultLlavaError(f"{name!r} is not an embedded LLaVA; choose one of {sorted(ALIASES)}.")
    size = ALIASES[name]
    target = model_dir(name, cache_dir)
    if not rebuild and built_from(target, llava_recipe(size)):
        return target
    print(f"[corda_vl] building the default LLaVA {name!r} into {target}: the default CLIP's ViT + SmolLM2 + a "
          "projector trained here on easy-VQA, once")
    result = build_default_llava(target, size=size, cache_dir=cache_dir, progress=progress, overwrite=True)
    s = result["scores"]
    print(f"[corda_vl] built {name} in {result['seconds']['total']:.0f} s: easy-VQA accuracy {s['vqa']['accuracy']:.1%} "
          f"(commonest answer {s['vqa']['commonest_answer_accuracy']:.1%}), capital questions "
          f"{s['capitals']['exact_match']:.1%}")
    return target


def load_llava(name_or_path: str = DEFAULT_LLAVA, *, cache_dir: str | Path | None = None,
               device: str | torch.device | None = None):
    """(model, processor) for a LLaVA: the embedded default (built on first use), a local folder or
    a hub id (``LlavaForConditionalGeneration`` + ``AutoProcessor``)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = (str(default_llava_dir(name_or_path, cache_dir=cache_dir)) if name_or_path in ALIASES
            else require_local_path(name_or_path))
    try:
        model = LlavaForConditionalGeneration.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
    except OSError as exc:
        raise DefaultLlavaError(f"load_llava: {name_or_path!r} is neither an embedded alias ({sorted(ALIASES)}) nor a "
                                f"folder / hub id with a LlavaForConditionalGeneration and its processor "
                                f"(offline, hub ids must already be in the HF cache): {exc}") from exc
    if device is not None:
        model = model.to(device)
    return model.eval(), processor
