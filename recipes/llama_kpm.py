"""Teach a LLaMA-style model a new skill with CorDA-KPM, and measure what it kept.

    python recipes/llama_kpm.py                          # SmolLM2-135M: lora vs corda vs corda++ (KPM)
    python recipes/llama_kpm.py --methods lora,corda --rank 32 --steps 200
    python recipes/llama_kpm.py --model meta-llama/Llama-2-7b-hf --mode ipm
    python recipes/llama_kpm.py --seeds 0,1,2 --lrs 5e-4,1e-3,2e-3   # a trade-off study with intervals
    python recipes/llama_kpm.py --smoke                  # seconds, for CI

Task: a generated skill the model cannot do yet ("Reverse the list: 4 7 1" -> "1 7 4"; exact
match on held-out lists). Knowledge to keep: capitals of held-out countries (3-shot exact match),
the perplexity of their fact paragraphs, and the standard forgetting metric: cross-entropy on a
general-text sample (corda_vl.lab.data.general_texts) used nowhere else. KPM calibrates on capital
Q&A and fact paragraphs of *other* countries (the calibration split; a seeded sample per seed),
so the adapter starts from the directions that carry the least of that knowledge; IPM calibrates
on a seeded sample of the task rows instead.

Flow: evaluate the base model (item by item) -> calibrate each seed -> for each seed, method and
learning rate: build, train (same rows, order from the seed), evaluate, save -> results.json /
report.md / plot.png, and study.md / study.json / tradeoff.png (intervals) in --output-dir. Settings:
recipes/configs/llama_kpm.yaml (keys and types: corda_vl.lab.recipe_config.LlamaRecipeConfig), each
overridable by its flag (see --help).
"""

import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from corda_vl.lab.data import (country_records, general_texts, knowledge_calibration_texts, knowledge_qa,
                               knowledge_shots, padded_batches)
from corda_vl.lab.data.countries import country_fact_texts
from corda_vl.lab.data.skills import skill_qa
from corda_vl.lab.eval.llm import qa_exact_match, qa_prompt, text_perplexity
from corda_vl.lab.eval.scores import hits, token_nll
from corda_vl.lab.experiment import (Recipe, base_scores, calibrate_seeds, compare_methods, parse_recipe,
                                     print_plans, recipe_device)
from corda_vl.lab.losses import answer_batch, answer_loss
from corda_vl.lab.models import load_llama
from corda_vl.lab.recipe_config import LlamaRecipeConfig

args, cfg = parse_recipe(__doc__, Path(__file__).parent / "configs" / "llama_kpm.yaml",
                         config_type=LlamaRecipeConfig)
out_dir = Path(cfg.output_dir)
torch.manual_seed(cfg.seed)


def load_model():
    return load_llama(cfg.model, device=recipe_device(cfg))[0]


model, tokenizer = load_llama(cfg.model, device=recipe_device(cfg))
print(f"model: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")

# --- data: the task to learn, the knowledge to keep (the same items for every run) ------------
task = skill_qa(cfg.task, cfg.task_train_rows, cfg.task_eval_rows, seed=cfg.seed)
capitals = knowledge_qa(fields=("capital",), seed=cfg.seed)
held_out = capitals["eval"].shuffle(seed=cfg.seed).select(range(min(cfg.capital_questions, len(capitals["eval"]))))
shots = knowledge_shots(cfg.capital_shots, "capital", seed=cfg.seed)
facts = {r["name"]: text for r, text in zip(country_records(), country_fact_texts())}
eval_facts = [facts[c] for c in held_out["country"]][: cfg.fact_texts]
held_countries = set(held_out["country"])  # the other fields are asked of the same countries
knowledge = (knowledge_qa(fields=tuple(cfg.knowledge_fields), seed=cfg.seed)["eval"]
             .filter(lambda r: r["country"] in held_countries) if cfg.knowledge_fields else None)
general = general_texts(cfg.general_texts, path=cfg.general_text_file) if cfg.general_texts else []
task_texts = [qa_prompt(q) + f" {a}" for q, a in zip(task["train"]["question"], task["train"]["answer"])]


def calibration(seed):
    """KPM: a seeded sample of capital Q&A / fact texts of other countries; IPM: of the task rows."""
    if cfg.mode == "kpm":
        texts = knowledge_calibration_texts(cfg.calib_samples, seed=seed)
    else:
        texts = random.Random(seed).sample(task_texts, min(cfg.calib_samples, len(task_texts)))
    return padded_batches(tokenizer, texts, batch_size=cfg.calib_batch_size)


def exact_match(m, rows, shots=()):
    em = qa_exact_match(m, tokenizer, rows, shots=shots, batch_size=cfg.eval_batch_size, progress=False)
    return hits("em", em["hits"])


def nll(m, metric, texts):
    out = text_perplexity(m, tokenizer, texts, batch_size=cfg.eval_batch_size, progress=False)
    return token_nll(metric, out["text_nll"], out["text_tokens"])


# {benchmark: model -> per-item scores}, the task first
benchmarks = {cfg.task: lambda m: exact_match(m, task["eval"])}
if "capitals" in cfg.retention:
    benchmarks["capitals"] = lambda m: exact_match(m, held_out, shots)
if "knowledge" in cfg.retention:  # every held-out country, each field with its own solved examples
    benchmarks["knowledge"] = lambda m: hits("em", [h for f in cfg.knowledge_fields for h in exact_match(
        m, knowledge.filter(lambda r: r["field"] == f), knowledge_shots(cfg.capital_shots, f, seed=cfg.seed)).values])
if "facts" in cfg.retention:
    benchmarks["facts"] = lambda m: nll(m, "perplexity", eval_facts)
if "general" in cfg.retention:
    benchmarks["general"] = lambda m: nll(m, "ce", general)


def loss_fn(m, rows):
    inputs, targets = answer_batch(tokenizer, [qa_prompt(r["question"]) for r in rows], [r["answer"] for r in rows])
    return answer_loss(m, inputs, targets)


recipe = Recipe(cfg.recipe, cfg, load_model, task["train"], loss_fn, benchmarks, cfg.task, calibration=calibration,
                save_with=tokenizer, store_name=f"covariances_{cfg.mode}")
if args.dry_run:
    print_plans(recipe, model)
    raise SystemExit(0)

# --- evaluate the base once, calibrate every seed, then each run from a fresh copy -------------
before = base_scores(recipe, model, out_dir, resume=args.resume)
stores = calibrate_seeds(recipe, model, out_dir, resume=args.resume)
del model  # each run loads a fresh copy
compare_methods(recipe, stores, before, out_dir, resume=args.resume)
