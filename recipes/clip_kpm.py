"""Teach the default CLIP a new image set with CorDA-KPM, and measure what it kept.

    python recipes/clip_kpm.py                           # corda-vl-clip: lora vs corda vs corda++ (KPM)
    python recipes/clip_kpm.py --methods lora,corda --rank 16 --steps 500
    python recipes/clip_kpm.py --mode ipm --groups vision
    python recipes/clip_kpm.py --seeds 0,1,2 --lrs 5e-4,1e-3,2e-3   # a trade-off study with intervals
    python recipes/clip_kpm.py --smoke                   # seconds, for CI

Task: generated capital letters (corda_vl.lab.data.glyphs.letters: 10 letters at random size,
position and rotation, bright on a dark background), which the default CLIP never saw: zero-shot acc1 on held-out
images starts at chance. Training is FLYP-style: the cross-entropy of the zero-shot classifier
(one prompt per class through the text tower at every step), so both towers learn. Knowledge to
keep: zero-shot acc1 on the held-out test splits of digits, shapes and colours (template
ensembles of assets/templates/zero_shot.json). KPM calibrates on a seeded sample (one per seed) of
the *train* images of those sets (vision tower) and their class prompts (text tower), so the
adapter starts from the directions that carry the least of that knowledge; IPM calibrates on the
task's train images and prompts.

Flow: evaluate the base model (item by item) -> calibrate each seed -> for each seed, method and
learning rate: build, train (same rows, order from the seed), evaluate, save -> results.json /
report.md / plot.png, and study.md / study.json / tradeoff.png (intervals) in --output-dir. Settings:
recipes/configs/clip_kpm.yaml (keys and types: corda_vl.lab.recipe_config.ClipRecipeConfig), each
overridable by its flag (see --help).
"""

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from corda_vl import CordaError
from corda_vl.lab.data import colors, digits, letters, shapes
from corda_vl.lab.eval.clip import clip_encoder, zero_shot_eval, zero_shot_templates
from corda_vl.lab.eval.scores import hits
from corda_vl.lab.experiment import (Recipe, base_scores, calibrate_seeds, compare_methods, parse_recipe,
                                     print_plans, recipe_device)
from corda_vl.lab.losses import clip_class_loss
from corda_vl.lab.models import load_clip
from corda_vl.lab.recipe_config import ClipRecipeConfig

args, cfg = parse_recipe(__doc__, Path(__file__).parent / "configs" / "clip_kpm.yaml",
                         config_type=ClipRecipeConfig)
out_dir = Path(cfg.output_dir)
torch.manual_seed(cfg.seed)
TASKS = {"letters": lambda seed: letters(seed, cfg.task_train_rows, cfg.task_eval_rows)}
RETENTION = {"digits": digits, "shapes": shapes, "colors": colors}  # their templates share the name
unknown = [cfg.task] * (cfg.task not in TASKS) + [n for n in cfg.retention if n not in RETENTION]
if unknown:
    raise CordaError(f"unknown task / retention set {unknown}; task: one of {sorted(TASKS)}, "
                     f"retention: any of {sorted(RETENTION)}.")


def load_model():
    return load_clip(cfg.model, device=recipe_device(cfg))[0]


model, tokenizer, preprocess = load_clip(cfg.model, device=recipe_device(cfg))
logit_scale = cfg.logit_scale or model.logit_scale.exp().item()
max_length = model.config.text_config.max_position_embeddings
print(f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
      f"{model.config.vision_config.image_size}px images, logit scale {logit_scale:.1f})")


def subsample(split, n, seed=cfg.seed):
    """A seeded subsample of ``n`` rows as a list of {"image": PIL, "label": int}, decoded once."""
    split = split.shuffle(seed=seed).select(range(min(n, len(split))))
    return [{"image": im, "label": y} for im, y in zip(split["image"], split["label"])]


def prompts(classes, templates):
    return [t.format(c) for c in classes for t in templates]


# --- data: the task to learn, the knowledge to keep (the same items for every run) ------------
t0 = time.perf_counter()
task = TASKS[cfg.task](cfg.seed)
task_classes = task["train"].features["label"].names
task_templates = zero_shot_templates(cfg.task_templates)
train_prompts = [cfg.train_template.format(c) for c in task_classes]
rows = [(preprocess(im), y) for im, y in zip(task["train"]["image"], task["train"]["label"])]
# {benchmark: (test rows, class names, templates)}; the task first
eval_sets = {cfg.task: (subsample(task["test"], cfg.task_eval_rows), task_classes, task_templates)}
retention_sets = {name: RETENTION[name](cfg.seed) for name in cfg.retention}
for name, data in retention_sets.items():
    classes = data["train"].features["label"].names
    eval_sets[name] = (subsample(data["test"], cfg.retention_images), classes, zero_shot_templates(name))
print(f"data ({time.perf_counter() - t0:.0f} s): {len(rows)} {cfg.task} train images; eval "
      + ", ".join(f"{k} {len(v[0])}" for k, v in eval_sets.items()))


def calibration(seed):
    """Batches carrying both modalities (images + a share of the prompts), so that each corda++
    split (batches are dealt to splits) holds statistics of both towers. KPM: a seeded sample of
    the retention sets' train images and their class prompts; IPM: of the task's."""
    images, texts = [], []
    for name, data in retention_sets.items():
        classes = data["train"].features["label"].names
        images += [r["image"] for r in subsample(data["train"], cfg.calib_samples // len(retention_sets), seed)]
        # its own templates and the default ones: enough text tokens for the text tower's 512-wide fc2
        texts += prompts(classes, dict.fromkeys(zero_shot_templates(name) + zero_shot_templates("default")))
    if cfg.mode == "ipm":
        images = [r["image"] for r in subsample(task["train"], cfg.calib_samples, seed)]
        texts = prompts(task_classes, task_templates)
    size = cfg.calib_batch_size
    n = max(1, -(-len(images) // size))
    out = []
    for i in range(n):
        batch = {"pixel_values": torch.stack([preprocess(im) for im in images[i * size:(i + 1) * size]])}
        if texts[i::n]:
            batch.update(tokenizer(texts[i::n], padding=True, truncation=True, return_tensors="pt",
                                   max_length=max_length))
        out.append(batch)
    return out


def zero_shot(name):
    """Benchmark ``name`` as the recipe scores it: model -> per-image top-1 hits."""
    test, classes, templates = eval_sets[name]

    def score(m):
        encoder = clip_encoder(m, tokenizer, preprocess)
        return hits("acc1", zero_shot_eval(encoder, test, classes, templates, batch_size=cfg.eval_batch_size,
                                           progress=False)["correct"])
    return score


def loss_fn(m, batch):
    pixels = torch.stack([px for px, _ in batch])
    labels = torch.tensor([y for _, y in batch])
    return clip_class_loss(clip_encoder(m, tokenizer, preprocess), pixels, labels, train_prompts, logit_scale)


recipe = Recipe(cfg.recipe, cfg, load_model, rows, loss_fn, {name: zero_shot(name) for name in eval_sets}, cfg.task,
                calibration=calibration, save_with=tokenizer, store_name=f"covariances_{cfg.mode}")
if args.dry_run:
    print_plans(recipe, model)
    raise SystemExit(0)

# --- evaluate the base once, calibrate every seed, then each run from a fresh copy -------------
before = base_scores(recipe, model, out_dir, resume=args.resume)
stores = calibrate_seeds(recipe, model, out_dir, resume=args.resume)
del model  # each run loads a fresh copy
compare_methods(recipe, stores, before, out_dir, resume=args.resume)
