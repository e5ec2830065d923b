"""Teach a LLaVA a new kind of visual question with CorDA-KPM, and measure what it kept.

    python recipes/llava_kpm.py                          # the default LLaVA: lora vs corda vs corda++ (KPM)
    python recipes/llava_kpm.py --methods lora,corda --rank 32 --steps 120
    python recipes/llava_kpm.py --groups vision,projector,language --mode ipm
    python recipes/llava_kpm.py --task describe          # "describe the shape." -> "red circle"
    python recipes/llava_kpm.py --seeds 0,1,2 --lrs 2.5e-4,5e-4,1e-3   # a trade-off study with intervals
    python recipes/llava_kpm.py --smoke                  # about a minute, for CI

Model: the embedded default LLaVA (corda-vl-llava: the default CLIP's ViT + a projector trained on
easy-VQA + SmolLM2-135M-Instruct), built and cached on first use; --model takes another LLaVA
folder (set `template` in the YAML to its prompt format).
Task: a question type about easy-VQA's pictures that easy-VQA never asks ("how many corners does
the shape have?" -> circle "0", triangle "3", rectangle "4"; VQA accuracy on held-out images).
Knowledge to keep: easy-VQA itself (accuracy on held-out questions) and, text only through the
same model, capitals of held-out countries (3-shot exact match) and the cross-entropy of a
general-text sample (the forgetting metric of PEFT's own benchmark). KPM calibrates on easy-VQA train
questions + answers with their images (the vision tower sees the pictures; the language layers see
image tokens and text tokens, also kept apart as calib/image and calib/text) and on capital Q&A
and fact paragraphs of *other* countries, a seeded sample per seed; IPM calibrates on the task rows
instead.
corda++ chooses among whole covariances only (YAML `cordapp: {candidates: [calib]}`), and the
learning rate is low (5e-4): every task answer is a number, and more training teaches the model to
answer every question with a number (the probes behind both: docs/results.md, llava_kpm).

Flow: evaluate the base model (item by item) -> calibrate each seed -> for each seed, method and
learning rate: build, train (same rows, order from the seed), evaluate, save -> results.json /
report.md / plot.png, and study.md / study.json / tradeoff.png (intervals) in --output-dir. Settings:
recipes/configs/llava_kpm.yaml (keys and types: corda_vl.lab.recipe_config.LlavaRecipeConfig), each
overridable by its flag (see --help).
"""

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from corda_vl.lab.data import (easy_vqa, general_texts, knowledge_calibration_texts, knowledge_qa, knowledge_shots,
                               padded_batches, vqa_skill)
from corda_vl.lab.eval.llm import padding_side, qa_exact_match, text_perplexity
from corda_vl.lab.eval.scores import hits, token_nll
from corda_vl.lab.eval.vlm import vqa_accuracy
from corda_vl.lab.experiment import (Recipe, base_scores, calibrate_seeds, compare_methods, parse_recipe,
                                     print_plans, recipe_device)
from corda_vl.lab.losses import answer_batch, answer_loss
from corda_vl.lab.models.default_llava import load_llava
from corda_vl.lab.recipe_config import LlavaRecipeConfig

args, cfg = parse_recipe(__doc__, Path(__file__).parent / "configs" / "llava_kpm.yaml",
                         config_type=LlavaRecipeConfig)
out_dir = Path(cfg.output_dir)
torch.manual_seed(cfg.seed)
template = cfg.template


def load_model():
    return load_llava(cfg.model, device=recipe_device(cfg))[0]


model, processor = load_llava(cfg.model, device=recipe_device(cfg))
tokenizer = processor.tokenizer
print(f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


def sample(rows, n, seed=cfg.seed):
    """A seeded subset of a datasets.Dataset, in its own order (images stay lazy)."""
    return rows if n >= len(rows) else rows.select(sorted(random.Random(seed).sample(range(len(rows)), n)))


# --- data: the task to learn, the knowledge to keep (the same items for every run) ------------
task = vqa_skill(cfg.task, cfg.task_train_rows, cfg.task_eval_rows, seed=cfg.seed)
vqa = easy_vqa(seed=cfg.seed)
vqa_held_out = sample(vqa["eval"], cfg.vqa_questions)
capitals = knowledge_qa(fields=("capital",), seed=cfg.seed)
held_out = capitals["eval"].shuffle(seed=cfg.seed).select(range(min(cfg.capital_questions, len(capitals["eval"]))))
shots = knowledge_shots(cfg.capital_shots, "capital", seed=cfg.seed)
general = general_texts(cfg.general_texts, path=cfg.general_text_file) if cfg.general_texts else []


def image_batches(rows, size):
    """Processor batches of "template answer" with each row's image (right padding: calibration
    drops the padding through the attention mask)."""
    out = []
    for i in range(0, len(rows), size):
        chunk = rows[i:i + size]
        texts = [template.format(question=q) + f" {a}" for q, a in zip(chunk["question"], chunk["answer"])]
        with padding_side(tokenizer, "right"):
            out.append(dict(processor(text=texts, images=chunk["image"], return_tensors="pt", padding=True)))
    return out


def calibration(seed):
    """KPM: a seeded sample of easy-VQA Q&A with images, then of capital Q&A / fact paragraphs of
    other countries (text only); IPM: a seeded sample of the task rows."""
    batches = image_batches(sample(vqa["train"] if cfg.mode == "kpm" else task["train"], cfg.calib_samples, seed),
                            cfg.calib_batch_size)
    if cfg.mode == "kpm":
        with padding_side(tokenizer, "right"):
            batches += padded_batches(tokenizer, knowledge_calibration_texts(cfg.calib_samples, seed=seed),
                                      batch_size=cfg.calib_batch_size)
    return batches


def accuracy(m, rows):
    return hits("accuracy", vqa_accuracy(m, processor, rows, template=template, max_new_tokens=cfg.vqa_new_tokens,
                                         batch_size=cfg.eval_batch_size, progress=False)["hits"])


def general_ce(m):
    out = text_perplexity(m, tokenizer, general, batch_size=cfg.eval_batch_size, progress=False)
    return token_nll("ce", out["text_nll"], out["text_tokens"])


# {benchmark: model -> per-item scores}, the task first
benchmarks = {cfg.task: lambda m: accuracy(m, task["eval"])}
if "easy_vqa" in cfg.retention:
    benchmarks["easy_vqa"] = lambda m: accuracy(m, vqa_held_out)
if "capitals" in cfg.retention:
    benchmarks["capitals"] = lambda m: hits("em", qa_exact_match(m, tokenizer, held_out, shots=shots,
                                                                 batch_size=cfg.eval_batch_size, progress=False)["hits"])
if "general" in cfg.retention:
    benchmarks["general"] = general_ce


def loss_fn(m, rows):
    inputs, targets = answer_batch(tokenizer, [template.format(question=r["question"]) for r in rows],
                                   [r["answer"] for r in rows], processor=processor, images=[r["image"] for r in rows])
    return answer_loss(m, inputs, targets)


groups = "+".join(cfg.groups or ["language"])
recipe = Recipe(cfg.recipe, cfg, load_model, task["train"], loss_fn, benchmarks, cfg.task, calibration=calibration,
                save_with=processor, store_name=f"covariances_{cfg.mode}_{groups}")
if args.dry_run:
    print_plans(recipe, model)
    raise SystemExit(0)

# --- evaluate the base once, calibrate every seed, then each run from a fresh copy -------------
before = base_scores(recipe, model, out_dir, resume=args.resume)
stores = calibrate_seeds(recipe, model, out_dir, resume=args.resume)
del model  # each run loads a fresh copy
compare_methods(recipe, stores, before, out_dir, resume=args.resume)
