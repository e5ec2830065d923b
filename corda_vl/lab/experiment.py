"""What the retention recipes (``recipes/*_kpm.py``) share: their flags (the fields of their typed
config, ``corda_vl.lab.recipe_config``), the calibration cache per seed, the grid of runs, and one
run from build to report rows.

A recipe owns what differs per model family (model loader, task and retention data, the loss,
the benchmarks, the calibration batches of a seed); this module owns the order of the steps, so
every method and every recipe is compared the same way. The grid is seeds x methods x learning
rates (``seeds``, ``methods``, ``lrs``, ``lr_methods``, ``lora_weight_decays``); each run:

    seeded build -> save init -> train (same rows; order from the seed) -> update size ->
    evaluate item by item -> save adapter, exported LoRA -> optional scale sweep -> report rows

Each run lives in ``out_dir/runs/<method>/lr<lr>_wd<wd>/seed<seed>/`` and is skipped under
``--resume`` once its ``runs.json`` exists, so a study can stop and go on in several sittings.
The base model is evaluated once, before any run: every method starts from outputs equal to the
base model's (pinned by the tests), so "before" is the same for all of them and every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from corda_vl.adapters import build_corda, build_record
from corda_vl.atomic import atomic_dir, atomic_file
from corda_vl.methods import get_method
from corda_vl.calibration.store import CovarianceStore
from corda_vl.errors import CordaError
from corda_vl.scaleout.distributed import init_from_launcher, is_main_process, on_main, process_device
from corda_vl.lab.baselines import build_baseline, is_baseline
from corda_vl.lab.eval.scores import ItemScores, read_items, write_items
from corda_vl.lab.interpolation import adapter_scale, initial_factors, update_size
from corda_vl.lab.report import Run, Score, run_from_dict, run_to_dict
from corda_vl.lab.identity import claim_output_dir
from corda_vl.lab.recipe_config import RecipeConfig, add_flags, flag_values, split_method
from corda_vl.saving import export_lora, save_corda
from corda_vl.lab.training import train, trainable_parameters

C = TypeVar("C", bound=RecipeConfig)
Scores = dict[str, ItemScores]
"""{benchmark: per-item scores} as a recipe's benchmarks give them; the task is one entry."""


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
    return not is_baseline(method) and get_method(split_method(method)[0]).needs_store


def _needs_batches(method: str) -> bool:
    """PEFT's data-driven baselines calibrate themselves on the recipe's batches."""
    return method in ("peft-corda", "eva")


def recipe_device(cfg: RecipeConfig) -> str:
    """The config's ``device``; "auto" (the default) is cuda when a GPU is visible, else cpu."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    return str(process_device(device))  # several GPU processes: each its own GPU


def calibrated_store(path: Path, model, make_batches: Callable[[], Any], *, resume: bool,
                     cfg: RecipeConfig | None = None, save: bool = True,
                     **kwargs) -> tuple[CovarianceStore | None, float]:
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
    def write():
        path.parent.mkdir(parents=True, exist_ok=True)
        store.save(path)

    if save:
        on_main(write)  # writes on the main process; the others wait and share any error
    return store, seconds


@dataclass
class Recipe:
    """What one recipe hands to the grid: how to get a fresh model, train it and score it.
    ``benchmarks[name](model)`` scores one benchmark item by item; ``task`` names the one that is
    the task. ``calibration(seed)`` gives the calibration batches of a seed (KPM: a seeded sample
    of the knowledge to keep; IPM: of the task)."""

    name: str
    cfg: RecipeConfig
    load_model: Callable[[], Any]
    rows: Sequence[Any]
    loss_fn: Callable[[Any, list[Any]], Any]
    benchmarks: dict[str, Callable[[Any], ItemScores]]
    task: str
    calibration: Callable[[int], Any] | None = None
    save_with: Any = None  # tokenizer / processor saved next to the residual
    store_name: str = "covariances"

    def evaluate(self, model) -> Scores:
        """Every benchmark, the task first."""
        return {name: score(model) for name, score in self.benchmarks.items()}


@dataclass(frozen=True)
class Setting:
    """One run of the grid: a method trained at one learning rate and weight decay with one seed."""

    method: str
    lr: float
    weight_decay: float
    seed: int

    @property
    def path(self) -> str:
        return f"{self.method.replace('+', 'p').replace(':', '-')}/lr{self.lr:g}_wd{self.weight_decay:g}/seed{self.seed}"


def run_seeds(cfg: RecipeConfig) -> list[int]:
    return list(cfg.seeds or [cfg.seed])


def settings(cfg: RecipeConfig) -> list[Setting]:
    """The grid, seed by seed (so a study stopped early has whole seeds of every method): each
    method at lr, or at every rate of lrs when it is one of lr_methods; lora also at each of
    lora_weight_decays."""
    out = []
    for seed in run_seeds(cfg):
        for method in cfg.methods:
            swept = cfg.lr_methods is None or method in cfg.lr_methods
            for lr in (cfg.lrs or [cfg.lr]) if swept else [cfg.lr]:
                out.append(Setting(method, lr, cfg.weight_decay, seed))
            if method == "lora":
                out += [Setting(method, cfg.lr, wd, seed) for wd in cfg.lora_weight_decays if wd != cfg.weight_decay]
    return out


def calibrate_seeds(recipe: Recipe, model, out_dir: Path, *, resume: bool) -> dict[int, tuple[Path, float]]:
    """{seed: (covariance file, seconds)}: the store of every seed, computed on the base model
    and saved (the runs load their seed's store onto their fresh model). Empty when no method
    reads covariances."""
    cfg = recipe.cfg
    on_main(lambda: claim_output_dir(cfg, resume, out_dir, model=model))
    if recipe.calibration is None or not any(_needs_store(m) for m in cfg.methods):
        return {}
    stores = {}
    for seed in run_seeds(cfg):
        path = Path(out_dir) / f"{recipe.store_name}_seed{seed}.safetensors"
        store, seconds = calibrated_store(path, model, lambda: recipe.calibration(seed), resume=resume, cfg=cfg)
        print(f"calibrated seed {seed} ({cfg.mode}) in {seconds:.1f} s: {len(store.modules)} modules, "
              f"sources {', '.join(store.sources)}")
        stores[seed] = (path, seconds)
        del store
    return stores


def cached_scores(path: Path, evaluate: Callable[[], Scores], *, resume: bool) -> Scores:
    """``evaluate()``, kept in ``path`` (JSON lines, item by item) so that ``--resume`` does not
    evaluate again."""
    if resume and path.is_file():
        return read_items(path)
    def evaluate_and_keep() -> Scores:
        scores = evaluate()
        write_items(path, scores)
        return scores

    return on_main(evaluate_and_keep)  # once, on the main process


def _build(recipe: Recipe, setting: Setting, stores: dict[int, tuple[Path, float]], progress: bool):
    """A fresh model with ``setting.method``'s adapter, seeded (lora's random A, eva's sample)."""
    import torch

    cfg, method = recipe.cfg, setting.method
    torch.manual_seed(setting.seed)
    model = recipe.load_model()
    if is_baseline(method):
        batches = recipe.calibration(setting.seed) if _needs_batches(method) else None
        return build_baseline(model, method, cfg.corda_config(method), batches, mode=cfg.mode, progress=progress)
    store = None
    if _needs_store(method):
        if setting.seed not in stores:
            raise CordaError(f"{method} needs the calibration of seed {setting.seed}; run calibrate_seeds first.")
        store = CovarianceStore.load(stores[setting.seed][0], model=model)
    return build_corda(model, store, cfg.corda_config(method), progress=progress)


def _score(before: Scores, after: Scores, name: str) -> Score:
    return Score(after[name].metric, before[name].value, after[name].value)


def run_method(recipe: Recipe, setting: Setting, stores: dict[int, tuple[Path, float]], before: Scores,
               out_dir: Path, *, resume: bool = False, progress: bool = True) -> list[Run]:
    """Build ``setting``'s adapter on a fresh model, train it, evaluate it, save it; returns its
    report rows (one, plus one per scale under ``scale_sweep``). Writes under
    ``out_dir/runs/<setting.path>``: ``items.jsonl`` (every benchmark item by item;
    ``items_scale<t>.jsonl`` per sweep point), ``train_log.jsonl``, ``checkpoints/``,
    ``runs.json`` (``resume`` reuses it) and, with ``save_adapters``, ``init/`` (save_corda at
    init), ``adapter/`` (trained, loads on ``init/residual``) and ``lora/`` (plain LoRA for the
    original base)."""
    cfg, method = recipe.cfg, setting.method
    out = Path(out_dir) / "runs" / setting.path
    done = out / "runs.json"
    if resume and done.is_file():
        return [run_from_dict(d) for d in json.loads(done.read_text())]
    seconds = {"calibrate": stores[setting.seed][1]} if _needs_store(method) else {}
    t0 = time.perf_counter()
    peft_model = _build(recipe, setting, stores, progress)
    seconds["build"] = time.perf_counter() - t0
    # several processes: all build and train; the main one evaluates and writes (on_main)
    if cfg.save_adapters:
        on_main(lambda: save_corda(peft_model, out / "init", tokenizer=recipe.save_with, overwrite=True))
    initial = initial_factors(peft_model)
    record = build_record(peft_model)
    budget = record.budget["budget"] if record is not None and record.budget else None
    trainable = sum(p.numel() for p in trainable_parameters(peft_model).values())
    fingerprint = {"method": method, "rank": cfg.rank, "budget": budget, "trainable": trainable}
    curve: dict[int, float] = {}

    def score_task(step: int) -> None:  # the convergence curve (task_eval_every)
        if cfg.task_eval_every and step % cfg.task_eval_every == 0 and step < cfg.steps:
            peft_model.eval()
            curve[step] = on_main(lambda: recipe.benchmarks[recipe.task](peft_model).value)
            peft_model.train()

    train_config = replace(cfg.train_config(), lr=setting.lr, weight_decay=setting.weight_decay, seed=setting.seed)
    result = train(peft_model, recipe.rows, recipe.loss_fn, train_config, out, resume=resume,
                   fingerprint=fingerprint, progress=progress, on_step=score_task)
    seconds["train"] = result.seconds
    update = update_size(peft_model, initial)
    t0 = time.perf_counter()
    after = on_main(lambda: recipe.evaluate(peft_model))
    seconds["eval"] = time.perf_counter() - t0
    if cfg.task_eval_every:
        curve[cfg.steps] = after[recipe.task].value

    def save_trained():
        write_items(out / "items.jsonl", after)
        if cfg.save_adapters:
            with atomic_dir(out / "adapter", overwrite=True) as tmp:
                peft_model.save_pretrained(tmp)
            export_lora(peft_model, out / "init" / "adapter", out / "lora", overwrite=True)

    on_main(save_trained)

    def row(scores: Scores, secs: dict, scale: float | None = None) -> Run:
        return Run(method=method, mode=cfg.mode if _needs_store(method) or method == "peft-corda" else None,
                   rank=None if budget is not None else cfg.rank, budget=budget, trainable_params=trainable,
                   task_name=recipe.task, task=_score(before, scores, recipe.task),
                   retention={k: _score(before, scores, k) for k in scores if k != recipe.task}, seconds=secs,
                   scale=scale, seed=setting.seed, lr=setting.lr, weight_decay=setting.weight_decay,
                   update=update if scale is None else None, losses=result.losses if scale is None else None,
                   task_curve=dict(curve) if curve and scale is None else None,
                   ranks=record.rank_histograms() if budget is not None and scale is None else None)

    runs = [row(after, seconds)]
    for t in cfg.scales if cfg.scale_sweep else []:
        if t == 0:  # scale 0 is the original model: its scores are the base model's
            scores = before
        else:
            with adapter_scale(peft_model, initial, t):
                scores = on_main(lambda: recipe.evaluate(peft_model))
        on_main(lambda: write_items(out / f"items_scale{t:g}.jsonl", scores))
        runs.append(row(scores, {}, scale=t))

    def keep_runs():
        with atomic_file(done) as tmp:
            tmp.write_text(json.dumps([run_to_dict(r) for r in runs], indent=2))

    on_main(keep_runs)
    if not cfg.save_adapters:  # a finished run needs no checkpoint to resume from
        on_main(lambda: shutil.rmtree(out / "checkpoints", ignore_errors=True))
    return runs


def print_plans(recipe: Recipe, model) -> None:
    """--dry-run: what each method would adapt (module, rank, covariance), nothing built; the
    covariances are those of the first seed (collected, not saved)."""
    from corda_vl.plan import plan

    cfg = recipe.cfg
    store = None
    if recipe.calibration is not None and any(_needs_store(m) for m in cfg.methods):
        store, _ = calibrated_store(Path(os.devnull), model, lambda: recipe.calibration(run_seeds(cfg)[0]),
                                    resume=False, cfg=cfg, save=False)
    for method in cfg.methods:
        print(f"\n== {method} ==\n{plan(model, cfg.corda_config(method), store if _needs_store(method) else None)}")


def base_scores(recipe: Recipe, model, out_dir: Path, *, resume: bool) -> Scores:
    """The base model's scores item by item, once for every run (kept in before_items.jsonl for
    --resume): no adapter, no seed, so they cannot differ between runs."""
    on_main(lambda: claim_output_dir(recipe.cfg, resume, out_dir, model=model))
    t0 = time.perf_counter()
    before = cached_scores(Path(out_dir) / "before_items.jsonl", lambda: recipe.evaluate(model), resume=resume)
    print(f"base model ({time.perf_counter() - t0:.0f} s): "
          + ", ".join(f"{k} {s.metric} {s.value:.3g} ({len(s.values)} items)" for k, s in before.items()))
    return before


def compare_methods(recipe: Recipe, stores: dict[int, tuple[Path, float]], before: Scores, out_dir: Path, *,
                    resume: bool = False) -> list[Run]:
    """:func:`run_method` for every setting of the grid, then the report (every run), the study
    (means over seeds with intervals, paired differences, trade-off frontiers), config.json (the
    settings behind the numbers) and a printed table."""
    config_path = Path(out_dir) / "config.json"
    on_main(lambda: claim_output_dir(recipe.cfg, resume, out_dir))

    def keep_config():  # first, so that a study stopped half-way still says what it ran
        with atomic_file(config_path) as tmp:
            tmp.write_text(json.dumps(recipe.cfg.to_dict(), indent=2) + "\n")

    on_main(keep_config)
    runs = []
    grid = settings(recipe.cfg)
    for i, setting in enumerate(grid, 1):
        print(f"\n== [{i}/{len(grid)}] {setting.method} lr {setting.lr:g} wd {setting.weight_decay:g} "
              f"seed {setting.seed} ==")
        new = run_method(recipe, setting, stores, before, out_dir, resume=resume)
        print(", ".join(f"{stage} {s:.0f} s" for stage, s in new[0].seconds.items()))
        runs += new
    from corda_vl.lab.report import write_report
    from corda_vl.lab.study import write_study

    if not is_main_process():
        return runs
    paths = write_report(out_dir, recipe.name, recipe.cfg.model, runs)
    paths["config"] = config_path
    paths.update(write_study(out_dir))
    print("\n" + results_table(runs))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}; runs under {out_dir}/runs/")
    return runs


def results_table(runs: list[Run]) -> str:
    """A plain-text table of the runs: task before -> after, each retention before -> after."""
    from corda_vl.lab.report import format_score

    names = list(dict.fromkeys(k for r in runs for k in r.retention))
    head = ["method", "seed", "scale", "trainable", f"task ({runs[0].task_name})"] + names
    lines = [head]
    for r in runs:
        lines.append([r.arm, "" if r.seed is None else r.seed, "" if r.scale is None else f"{r.scale:g}",
                      f"{r.trainable_params:,}",
                      format_score(r.task)] + [format_score(r.retention[n]) if n in r.retention else "" for n in names])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines)
