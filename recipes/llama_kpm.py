"""Teach a LLaMA-style model a new skill with CorDA-KPM, and measure what it kept.

    python recipes/llama_kpm.py                          # SmolLM2-135M: lora vs corda vs corda++ (KPM)
    python recipes/llama_kpm.py --methods lora,corda --rank 32 --steps 200
    python recipes/llama_kpm.py --model meta-llama/Llama-2-7b-hf --mode ipm
    python recipes/llama_kpm.py --smoke                  # seconds, for CI

Task: a generated skill the model cannot do yet ("Reverse the list: 4 7 1" -> "1 7 4"; exact
match on held-out lists). Knowledge to keep: capitals of held-out countries (3-shot exact match)
and the perplexity of their fact paragraphs. KPM calibrates on capital Q&A and fact paragraphs
of *other* countries (the calibration split), so the adapter starts from the directions that
carry the least of that knowledge; IPM calibrates on the task rows instead.

Flow: evaluate the base model -> calibrate -> for each method: build, train (same rows, same
steps), evaluate, save -> results.json / report.md / plot.png in --output-dir. Settings:
recipes/configs/llama_kpm.yaml (keys and types: corda_vl.lab.recipe_config.LlamaRecipeConfig), each
overridable by its flag (see --help).
"""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from corda_vl.lab.data import (country_records, knowledge_calibration_texts, knowledge_qa, knowledge_shots,
                           padded_batches)
from corda_vl.lab.data.countries import country_fact_texts
from corda_vl.lab.data.skills import skill_qa
from corda_vl.lab.eval.llm import qa_exact_match, qa_prompt, text_perplexity
from corda_vl.lab.experiment import (Recipe, base_scores, calibrated_store, compare_methods, parse_recipe,
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

# --- data: the task to learn, the knowledge to keep, the knowledge that calibrates KPM --------
task = skill_qa(cfg.task, cfg.task_train_rows, cfg.task_eval_rows, seed=cfg.seed)
capitals = knowledge_qa(fields=("capital",), seed=cfg.seed)
held_out = capitals["eval"].shuffle(seed=cfg.seed).select(range(min(cfg.capital_questions, len(capitals["eval"]))))
shots = knowledge_shots(cfg.capital_shots, "capital", seed=cfg.seed)
facts = {r["name"]: text for r, text in zip(country_records(), country_fact_texts())}
eval_facts = [facts[c] for c in held_out["country"]][: cfg.fact_texts]
known = knowledge_calibration_texts(cfg.calib_samples, seed=cfg.seed)
task_texts = [qa_prompt(q) + f" {a}" for q, a in zip(task["train"]["question"], task["train"]["answer"])]
calib_texts = known if cfg.mode == "kpm" else task_texts[: cfg.calib_samples]


def evaluate(m):
    """{benchmark: (metric, value)}: the task and each retention benchmark."""
    scores = {cfg.task: ("em", qa_exact_match(m, tokenizer, task["eval"], batch_size=cfg.eval_batch_size,
                                                 progress=False)["exact_match"])}
    if "capitals" in cfg.retention:
        em = qa_exact_match(m, tokenizer, held_out, shots=shots, batch_size=cfg.eval_batch_size, progress=False)
        scores["capitals"] = ("em", em["exact_match"])
    if "facts" in cfg.retention:
        scores["facts"] = ("perplexity", text_perplexity(m, tokenizer, eval_facts, progress=False)["perplexity"])
    return scores


def loss_fn(m, rows):
    inputs, targets = answer_batch(tokenizer, [qa_prompt(r["question"]) for r in rows], [r["answer"] for r in rows])
    return answer_loss(m, inputs, targets)


# --- calibrate once; every CorDA method reads the same store ----------------------------------
store, calib_s = calibrated_store(
    out_dir / f"covariances_{cfg.mode}.safetensors", model,
    lambda: padded_batches(tokenizer, calib_texts, batch_size=cfg.calib_batch_size),
    resume=args.resume, cfg=cfg)
if store is not None:
    print(f"calibrated ({cfg.mode}) on {len(calib_texts)} texts in {calib_s:.1f} s: "
          f"{len(store.modules)} modules, {len(store.sums)} covariances")

if args.dry_run:
    print_plans(model, cfg, store)
    raise SystemExit(0)

# --- evaluate the base once, then each method from a fresh copy --------------------------------
before = base_scores(evaluate, model, out_dir, resume=args.resume)
del model  # each method loads a fresh copy
recipe = Recipe(cfg.recipe, cfg, load_model, task["train"], loss_fn, evaluate, cfg.task, save_with=tokenizer)
compare_methods(recipe, store, before, out_dir, calibrate_seconds=calib_s, resume=args.resume)
