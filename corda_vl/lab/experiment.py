"""What the retention recipes (``recipes/*_kpm.py``) share: their YAML configs and flags, the
calibration cache, and one method's run from build to report rows.

A recipe owns what differs per model family (model loader, task and retention data, the loss,
the evaluators, the calibration batches); this module owns the order of the steps, so every
method and every recipe is compared the same way:

    build adapters -> save init -> train (same rows, same steps) -> evaluate -> save adapter,
    exported LoRA -> optional scale sweep -> report rows

The base model is evaluated once, before any method: every method starts from outputs equal to
the base model's (pinned by the tests), so "before" is the same for all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from corda_vl.adapters import build_corda, build_record
from corda_vl.atomic import atomic_dir, atomic_file
from corda_vl.config import CordaConfig
from corda_vl.methods import get_method, method_names
from corda_vl.calibration.store import CovarianceStore
from corda_vl.scaleout.distributed import init_from_launcher, is_main_process, on_main, process_device
from corda_vl.errors import CordaError
from corda_vl.lab.interpolation import adapter_scale, initial_factors
from corda_vl.lab.report import Run, Score, run_from_dict, run_to_dict
from corda_vl.lab.resources import merge_overrides
from corda_vl.saving import export_lora, save_corda
from corda_vl.lab.training import TrainConfig, train, trainable_parameters

Scores = dict[str, tuple[str, float]]
"""{benchmark: (metric, value)} as a recipe's evaluate(model) returns it; the task is one entry."""

# flag -> (config key, type, help). Every flag defaults to None: "keep the YAML's value".
FLAGS = {
    "--model": ("model", str, "model name or path (default: the embedded model)"),
    "--method": ("methods", str, "one of lora, pissa, corda, corda++ (milora also works)"),
    "--methods": ("methods", str, "several, comma-separated, compared in one run (e.g. lora,corda,corda++)"),
    "--mode": ("mode", str, "kpm (calibrate on what to keep) or ipm (calibrate on the task)"),
    "--rank": ("rank", int, "adapter rank of every targeted module"),
    "--budget": ("budget", int, "corda++: trainable-parameter budget (default: that of uniform --rank)"),
    "--groups": ("groups", str, "comma-separated module groups to adapt, e.g. vision,projector,language"),
    "--task": ("task", str, "the task to learn"),
    "--retention": ("retention", str, "comma-separated retention benchmarks"),
    "--calib-samples": ("calib_samples", int, "calibration rows (KPM: knowledge to keep; IPM: task rows)"),
    "--steps": ("steps", int, "optimiser steps"),
    "--lr": ("lr", float, "peak learning rate"),
    "--seed": ("seed", int, "seeds data order, generated data and the LoRA init"),
    "--output-dir": ("output_dir", str, "where results, adapters and checkpoints go"),
    "--threads": ("threads", int, "torch CPU threads (default: the config's, else torch's own)"),
}
LIST_KEYS = ("methods", "groups", "retention")


def parse_recipe(doc: str, config_path: str | Path, argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """Flags of every recipe; returns (args, config) with the YAML's values overridden by the flags
    given (and by the YAML's ``smoke:`` section first, under ``--smoke``)."""
    rank, _ = init_from_launcher()  # accelerate launch / torchrun: join the process group first
    if rank != 0:  # one copy of the printed progress: the main process's
        sys.stdout = open(os.devnull, "w")
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(config_path), help="YAML config (default: %(default)s)")
    for flag, (_, kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    parser.add_argument("--dry-run", action="store_true", help="print what each method would adapt, then exit")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for CI)")
    parser.add_argument("--scale-sweep", action="store_true", help="also evaluate the trained adapter at scales 0..1")
    args = parser.parse_args(argv)
    overrides = {}
    for flag, (key, _, _) in FLAGS.items():  # --method and --methods both set "methods"
        if getattr(args, flag[2:].replace("-", "_")) is not None:
            overrides[key] = getattr(args, flag[2:].replace("-", "_"))
    for key in LIST_KEYS:
        if isinstance(overrides.get(key), str):
            overrides[key] = [item.strip() for item in overrides[key].split(",") if item.strip()]
    if args.scale_sweep:
        overrides["scale_sweep"] = True
    cfg = load_recipe_config(args.config, smoke=args.smoke, overrides=overrides)
    if cfg.get("threads"):
        # Small models on few cores: one thread avoids OpenMP spin-waits that, on a busy 2-core
        # machine, made training steps 30x slower than with one thread.
        import torch

        torch.set_num_threads(cfg["threads"])
    return args, cfg


def load_recipe_config(path: str | Path, *, smoke: bool = False, overrides: dict | None = None) -> dict:
    """A recipe's YAML (minus its ``smoke:`` section), with that section merged in under ``smoke``
    and then ``overrides`` on top; checks the methods."""
    cfg = yaml.safe_load(Path(path).read_text())
    smoke_part = cfg.pop("smoke", {}) or {}
    if smoke:
        cfg = merge_overrides(cfg, smoke_part)
    cfg = merge_overrides(cfg, overrides or {})
    unknown = [m for m in cfg["methods"] if m not in method_names()]
    if unknown:
        raise CordaError(f"unknown method(s) {unknown}; choose from {method_names()} (--methods lora,corda,corda++).")
    if cfg.get("mode") not in ("kpm", "ipm"):
        raise CordaError(f"mode must be kpm or ipm, got {cfg.get('mode')!r}.")
    return cfg


def _needs_store(method: str) -> bool:
    return get_method(method).needs_store


def recipe_device(cfg: dict) -> str:
    """The config's ``device``; "auto" (the default) is cuda when a GPU is visible, else cpu."""
    import torch

    device = cfg.get("device", "auto")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    return str(process_device(device))  # several GPU processes: each its own GPU


def train_config(cfg: dict) -> TrainConfig:
    """The TrainConfig fields present in the recipe config (steps, lr, batch_size, ...)."""
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in cfg.items() if k in names})


def corda_config(cfg: dict, method: str) -> CordaConfig:
    """The CordaConfig of ``method`` under a recipe config: same targets, rank and scaling for all."""
    kwargs = dict(method=method, r=cfg["rank"], alpha=cfg.get("alpha"), groups=cfg.get("groups"),
                  target_modules=cfg.get("target_modules"), exclude_modules=cfg.get("exclude_modules"),
                  group_ranks=cfg.get("group_ranks") or {})
    kwargs.update(cfg.get("corda") or {})  # e.g. covariance_normalization, damping
    if _needs_store(method):
        kwargs["mode"] = cfg["mode"]
    if method == "corda++":
        kwargs.update(budget=cfg.get("budget"), **(cfg.get("cordapp") or {}))
    return CordaConfig(**kwargs)


def calibrated_store(path: Path, model, make_batches: Callable[[], Any], *, resume: bool, cfg: dict | None = None,
                     **kwargs) -> tuple[CovarianceStore | None, float]:
    """(store, seconds): collect_covariances over ``make_batches()``, saved to ``path``; with
    ``resume`` an existing file is loaded instead (refused if it belongs to another model).
    ``cfg`` (a recipe config) limits the hooks to the modules the methods adapt (its groups,
    target_modules, exclude_modules) and sets the number of random splits (calib_splits) and the
    per-sample weighting (calib_sample_scale); when none of its methods reads covariances, nothing
    is calibrated and the store is None."""
    from corda_vl.calibration.loop import collect_covariances

    if cfg is not None and not any(_needs_store(m) for m in cfg["methods"]):
        return None, 0.0
    if cfg is not None:
        defaults = {"groups": cfg.get("groups"), "targets": cfg.get("target_modules"),
                    "exclude": cfg.get("exclude_modules"), "splits": cfg.get("calib_splits", 1),
                    "sample_scale": cfg.get("calib_sample_scale", "none")}
        kwargs = {**defaults, **kwargs}
    if resume and path.is_file():
        return CovarianceStore.load(path, model=model), 0.0
    t0 = time.perf_counter()
    store = collect_covariances(model, make_batches(), **kwargs)  # several processes: sharded, then summed
    seconds = time.perf_counter() - t0
    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        store.save(path)

    on_main(save)  # writes on the main process; the others wait and share any error
    return store, seconds


def cached_scores(path: Path, evaluate: Callable[[], Scores], *, resume: bool) -> Scores:
    """``evaluate()``, kept in ``path`` (JSON) so that ``--resume`` does not evaluate again."""
    if resume and path.is_file():
        return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}
    def evaluate_and_keep() -> Scores:
        scores = evaluate()
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(scores, indent=2))
        return scores

    return on_main(evaluate_and_keep)  # once, on the main process


@dataclass
class Recipe:
    """What one recipe hands to :func:`run_method`: how to get a fresh model and how to train and
    evaluate it. ``evaluate(model)`` returns Scores; ``task`` names the entry that is the task."""

    name: str
    cfg: dict
    load_model: Callable[[], Any]
    rows: Sequence[Any]
    loss_fn: Callable[[Any, list[Any]], Any]
    evaluate: Callable[[Any], Scores]
    task: str
    save_with: Any = None  # tokenizer / processor saved next to the residual


def _run(recipe: Recipe, method: str, trainable: int, budget: int | None, before: Scores, after: Scores,
         seconds: dict, scale: float | None = None) -> Run:
    def score(name: str) -> Score:
        metric, value = after[name]
        return Score(metric, before[name][1], value)

    cfg = recipe.cfg
    return Run(method=method, mode=cfg["mode"] if _needs_store(method) else None,
               rank=None if budget is not None else cfg["rank"], budget=budget, trainable_params=trainable,
               task_name=recipe.task, task=score(recipe.task),
               retention={k: score(k) for k in after if k != recipe.task}, seconds=seconds, scale=scale)


def run_method(recipe: Recipe, method: str, store: CovarianceStore | None, before: Scores, out_dir: Path, *,
               calibrate_seconds: float = 0.0, resume: bool = False, progress: bool = True) -> list[Run]:
    """Build ``method``'s adapter on a fresh model, train it, evaluate it, save it; returns its
    report rows (one, plus one per scale under ``scale_sweep``). Writes under ``out_dir/<method>``:
    ``init/`` (save_corda at init: residual + adapter), ``adapter/`` (trained, loads on
    ``init/residual``), ``lora/`` (plain LoRA for the original base), ``train_log.jsonl``,
    ``checkpoints/`` and ``runs.json`` (this method's rows; ``resume`` reuses it)."""
    cfg = recipe.cfg
    out = Path(out_dir) / method.replace("+", "p")
    done = out / "runs.json"
    if resume and done.is_file():
        return [run_from_dict(d) for d in json.loads(done.read_text())]
    import torch

    torch.manual_seed(cfg["seed"])  # lora's random A
    seconds = {"calibrate": calibrate_seconds} if _needs_store(method) else {}
    t0 = time.perf_counter()
    peft_model = build_corda(recipe.load_model(), store if _needs_store(method) else None,
                             corda_config(cfg, method), progress=progress)
    seconds["build"] = time.perf_counter() - t0
    # several processes: all build and train; the main one evaluates and writes (on_main)
    on_main(lambda: save_corda(peft_model, out / "init", tokenizer=recipe.save_with, overwrite=True))
    initial = initial_factors(peft_model)
    record = build_record(peft_model)
    budget = record.budget["budget"] if record is not None and record.budget else None
    trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
    fingerprint = {"method": method, "rank": cfg["rank"], "budget": budget, "trainable": trainable}
    result = train(peft_model, recipe.rows, recipe.loss_fn, train_config(cfg), out, resume=resume,
                   fingerprint=fingerprint, progress=progress)
    seconds["train"] = result.seconds
    t0 = time.perf_counter()
    after = on_main(lambda: recipe.evaluate(peft_model))
    seconds["eval"] = time.perf_counter() - t0
    def save_trained():
        with atomic_dir(out / "adapter", overwrite=True) as tmp:
            peft_model.save_pretrained(tmp)
        export_lora(peft_model, out / "init" / "adapter", out / "lora", overwrite=True)

    on_main(save_trained)
    runs = [_run(recipe, method, trainable, budget, before, after, seconds)]
    for t in cfg.get("scales", []) if cfg.get("scale_sweep") else []:
        with adapter_scale(peft_model, initial, t):
            scores = on_main(lambda: recipe.evaluate(peft_model))
        runs.append(_run(recipe, method, trainable, budget, before, scores, {}, scale=t))
    def keep_runs():
        with atomic_file(done) as tmp:
            tmp.write_text(json.dumps([run_to_dict(r) for r in runs], indent=2))

    on_main(keep_runs)
    return runs


def print_plans(model, cfg: dict, store: CovarianceStore | None) -> None:
    """--dry-run: what each method would adapt (module, rank, covariance), nothing built."""
    from corda_vl.plan import plan

    for method in cfg["methods"]:
        print(f"\n== {method} ==\n{plan(model, corda_config(cfg, method), store)}")


def base_scores(evaluate: Callable[[Any], Scores], model, out_dir: Path, *, resume: bool) -> Scores:
    """The base model's scores, once for every method (kept in before.json for --resume)."""
    t0 = time.perf_counter()
    before = cached_scores(Path(out_dir) / "before.json", lambda: evaluate(model), resume=resume)
    print(f"base model ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{k} {metric} {value:.3g}" for k, (metric, value) in before.items()))
    return before


def compare_methods(recipe: Recipe, store: CovarianceStore | None, before: Scores, out_dir: Path, *,
                    calibrate_seconds: float = 0.0, resume: bool = False) -> list[Run]:
    """:func:`run_method` for every method of the config, then the report and a printed table."""
    runs = []
    for method in recipe.cfg["methods"]:
        print(f"\n== {method} ==")
        new = run_method(recipe, method, store, before, out_dir, calibrate_seconds=calibrate_seconds, resume=resume)
        print(", ".join(f"{stage} {s:.0f} s" for stage, s in new[0].seconds.items()))
        runs += new
    from corda_vl.lab.report import write_report

    if not is_main_process():
        return runs
    paths = write_report(out_dir, recipe.name, recipe.cfg["model"], runs)
    print("\n" + results_table(runs))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}; adapters under {out_dir}/<method>/")
    return runs


def results_table(runs: list[Run]) -> str:
    """A plain-text table of the runs: task before -> after, each retention before -> after."""
    from corda_vl.lab.report import format_score

    names = list(dict.fromkeys(k for r in runs for k in r.retention))
    head = ["method", "scale", "trainable", f"task ({runs[0].task_name})"] + names
    lines = [head]
    for r in runs:
        lines.append([r.label, "" if r.scale is None else f"{r.scale:g}", f"{r.trainable_params:,}",
                      format_score(r.task)] + [format_score(r.retention[n]) if n in r.retention else "" for n in names])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)
