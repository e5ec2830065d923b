"""What the retention recipes (``recipes/*_kpm.py``) share: their flags (the fields of their typed
config, ``corda_vl.lab.recipe_config``), the calibration cache, and one method's run from build to
report rows.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from corda_vl.adapters import build_corda, build_record
from corda_vl.atomic import atomic_dir, atomic_file
from corda_vl.methods import get_method
from corda_vl.calibration.store import CovarianceStore
from corda_vl.scaleout.distributed import init_from_launcher, is_main_process, on_main, process_device
from corda_vl.lab.interpolation import adapter_scale, initial_factors
from corda_vl.lab.report import Run, Score, run_from_dict, run_to_dict
from corda_vl.lab.recipe_config import RecipeConfig, add_flags, flag_values
from corda_vl.saving import export_lora, save_corda
from corda_vl.lab.training import train, trainable_parameters

C = TypeVar("C", bound=RecipeConfig)
Scores = dict[str, tuple[str, float]]
"""{benchmark: (metric, value)} as a recipe's evaluate(model) returns it; the task is one entry."""


def parse_recipe(doc: str, config_path: str | Path, argv: Sequence[str] | None = None, *,
                 config_type: type[C] = RecipeConfig) -> tuple[argparse.Namespace, C]:
    """Flags of every recipe; returns (args, config): the YAML as a ``config_type``, with the
    ``smoke:`` section merged in under ``--smoke`` and the flags given on top. There is a flag per
    config field (``--calib-samples``), plus ``--method`` for ``--methods``."""
    rank, _ = init_from_launcher()  # accelerate launch / torchrun: join the process group first
    if rank != 0:  # one copy of the printed progress: the main process's
        sys.stdout = open(os.devnull, "w")
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--config", default=str(config_path), help="YAML config (default: %(default)s)")
    run.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (for CI): the YAML's smoke: section")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    run.add_argument("--dry-run", action="store_true", help="print what each method would adapt, then exit")
    add_flags(parser, config_type)
    args = parser.parse_args(argv)
    cfg = config_type.from_yaml(args.config, smoke=args.smoke, overrides=flag_values(args, config_type))
    if cfg.threads:
        # Small models on few cores: one thread avoids OpenMP spin-waits that, on a busy 2-core
        # machine, made training steps 30x slower than with one thread.
        import torch

        torch.set_num_threads(cfg.threads)
    return args, cfg


def _needs_store(method: str) -> bool:
    return get_method(method).needs_store


def recipe_device(cfg: RecipeConfig) -> str:
    """The config's ``device``; "auto" (the default) is cuda when a GPU is visible, else cpu."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return str(process_device(device))  # several GPU processes: each its own GPU


def calibrated_store(path: Path, model, make_batches: Callable[[], Any], *, resume: bool,
                     cfg: RecipeConfig | None = None, **kwargs) -> tuple[CovarianceStore | None, float]:
    """(store, seconds): collect_covariances over ``make_batches()``, saved to ``path``; with
    ``resume`` an existing file is loaded instead (refused if it belongs to another model).
    ``cfg`` (a recipe config) limits the hooks to the modules the methods adapt (its groups,
    target_modules, exclude_modules) and sets the number of random splits (calib_splits) and the
    per-sample weighting (calib_sample_scale); when none of its methods reads covariances, nothing
    is calibrated and the store is None."""
    from corda_vl.calibration.loop import collect_covariances

    if cfg is not None and not any(_needs_store(m) for m in cfg.methods):
        return None, 0.0
    if cfg is not None:
        defaults = {"groups": cfg.groups, "target_modules": cfg.target_modules,
                    "exclude_modules": cfg.exclude_modules, "splits": cfg.calib_splits,
                    "sample_scale": cfg.calib_sample_scale}
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
    cfg: RecipeConfig
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
    return Run(method=method, mode=cfg.mode if _needs_store(method) else None,
               rank=None if budget is not None else cfg.rank, budget=budget, trainable_params=trainable,
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

    torch.manual_seed(cfg.seed)  # lora's random A
    seconds = {"calibrate": calibrate_seconds} if _needs_store(method) else {}
    t0 = time.perf_counter()
    peft_model = build_corda(recipe.load_model(), store if _needs_store(method) else None,
                             cfg.corda_config(method), progress=progress)
    seconds["build"] = time.perf_counter() - t0
    # several processes: all build and train; the main one evaluates and writes (on_main)
    on_main(lambda: save_corda(peft_model, out / "init", tokenizer=recipe.save_with, overwrite=True))
    initial = initial_factors(peft_model)
    record = build_record(peft_model)
    budget = record.budget["budget"] if record is not None and record.budget else None
    trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
    fingerprint = {"method": method, "rank": cfg.rank, "budget": budget, "trainable": trainable}
    result = train(peft_model, recipe.rows, recipe.loss_fn, cfg.train_config(), out, resume=resume,
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
    for t in cfg.scales if cfg.scale_sweep else []:
        with adapter_scale(peft_model, initial, t):
            scores = on_main(lambda: recipe.evaluate(peft_model))
        runs.append(_run(recipe, method, trainable, budget, before, scores, {}, scale=t))
    def keep_runs():
        with atomic_file(done) as tmp:
            tmp.write_text(json.dumps([run_to_dict(r) for r in runs], indent=2))

    on_main(keep_runs)
    return runs


def print_plans(model, cfg: RecipeConfig, store: CovarianceStore | None) -> None:
    """--dry-run: what each method would adapt (module, rank, covariance), nothing built."""
    from corda_vl.plan import plan

    for method in cfg.methods:
        print(f"\n== {method} ==\n{plan(model, cfg.corda_config(method), store)}")


def base_scores(evaluate: Callable[[Any], Scores], model, out_dir: Path, *, resume: bool) -> Scores:
    """The base model's scores, once for every method (kept in before.json for --resume)."""
    t0 = time.perf_counter()
    before = cached_scores(Path(out_dir) / "before.json", lambda: evaluate(model), resume=resume)
    print(f"base model ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{k} {metric} {value:.3g}" for k, (metric, value) in before.items()))
    return before


def compare_methods(recipe: Recipe, store: CovarianceStore | None, before: Scores, out_dir: Path, *,
                    calibrate_seconds: float = 0.0, resume: bool = False) -> list[Run]:
    """:func:`run_method` for every method of the config, then the report, config.json (the
    settings behind its numbers) and a printed table."""
    runs = []
    for method in recipe.cfg.methods:
        print(f"\n== {method} ==")
        new = run_method(recipe, method, store, before, out_dir, calibrate_seconds=calibrate_seconds, resume=resume)
        print(", ".join(f"{stage} {s:.0f} s" for stage, s in new[0].seconds.items()))
        runs += new
    from corda_vl.lab.report import write_report

    if not is_main_process():
        return runs
    paths = write_report(out_dir, recipe.name, recipe.cfg.model, runs)
    paths["config"] = Path(out_dir) / "config.json"
    with atomic_file(paths["config"]) as tmp:
        tmp.write_text(json.dumps(recipe.cfg.to_dict(), indent=2) + "\n")
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
