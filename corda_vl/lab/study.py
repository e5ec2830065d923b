"""The study: every run of a recipe's grid read back item by item and turned into claims with
intervals (``study.json``, ``study.md``, ``tradeoff.png``, ``update.png``).

* **Arms.** Runs that differ only by seed form an arm (method, mode, rank, lr, weight decay,
  adapter scale). An arm's metric is the mean over its seeds, with a 95 % interval from a
  bootstrap over seeds and items (``corda_vl.lab.stats``).
* **Paired differences.** Every method against LoRA at the same learning rate, and CorDA++,
  CorDA variants and PEFT's CorDA against CorDA: the same seeds and the same items in every replicate, so the interval is that
  of the difference itself, not of two noisy means.
* **Trade-off.** Each method's arms (learning rates, adapter scales) are points of task score
  (x) against mean relative retention (y, after / before, averaged over the retention
  benchmarks). The Pareto frontier through them, and the retention one method keeps more than
  another at the highest task score both reach ("retention at matched task score"; that score is
  found again in every bootstrap replicate), with its interval, is the comparison that does not
  depend on one learning rate.
* **Convergence.** The steps a method needs to reach LoRA's final smoothed training loss (and,
  with ``task_eval_every``, LoRA's final task score), as LoRA's steps over the method's: the
  IPM claim "converges N x faster".
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from corda_vl.atomic import atomic_file
from corda_vl.errors import CordaError
from corda_vl.lab.eval.metrics import lower_is_better, relative_retention
from corda_vl.lab.eval.scores import ItemScores, read_items
from corda_vl.lab.report import Run, run_from_dict
from corda_vl.lab.stats import (Interval, Resample, aggregate, format_interval, interpolate_frontier,
                                matched_task_score, pareto_frontier)

N_BOOT = 1000
SMOOTHING = 0.1
"""Moving-average window of the loss curves, as a share of the steps."""


@dataclass
class Arm:
    """The runs of one configuration, one per seed, with their items ({benchmark: ItemScores})."""

    key: str
    method: str
    runs: list[Run]
    items: list[dict[str, ItemScores]]

    @property
    def first(self) -> Run:
        return self.runs[0]


CORDA_RIVALS = ("corda++", "corda:", "peft-corda")  # methods also paired with plain CorDA


def _method_key(run: Run) -> str:
    """The curve a run belongs to: its method, and its weight decay when it is not 0 (LoRA + wd is
    its own baseline)."""
    return run.label + (f" wd {run.weight_decay:g}" if run.weight_decay else "")


def load_arms(out_dir: Path) -> tuple[dict[str, ItemScores], list[Arm]]:
    """(base items, arms) of a recipe's output folder; arms keep only the seeds common to all."""
    out_dir = Path(out_dir)
    before_path = out_dir / "before_items.jsonl"
    if not before_path.is_file():
        raise CordaError(f"{before_path} is missing; run the recipe (it scores the base model first).")
    before = read_items(before_path)
    found: dict[str, list[tuple[Run, dict[str, ItemScores]]]] = defaultdict(list)
    for runs_file in sorted(out_dir.glob("runs/*/*/seed*/runs.json")):
        for d in json.loads(runs_file.read_text()):
            run = run_from_dict(d, str(runs_file))
            if run.scale in (0.0, 1.0):  # the base model and the run itself: no new point
                continue
            name = "items.jsonl" if run.scale is None else f"items_scale{run.scale:g}.jsonl"
            items = read_items(runs_file.parent / name) if run.scale != 0 else before
            key = run.arm + ("" if run.scale is None else f" @ scale {run.scale:g}")
            found[key].append((run, items))
    if not found:
        raise CordaError(f"no finished runs under {out_dir}/runs; run the recipe first.")
    common = set.intersection(*({r.seed for r, _ in v} for v in found.values()))
    arms = []
    for key, pairs in found.items():
        pairs = sorted((p for p in pairs if p[0].seed in common), key=lambda p: p[0].seed)
        if pairs:
            arms.append(Arm(key, _method_key(pairs[0][0]), [r for r, _ in pairs], [i for _, i in pairs]))
    return before, arms


def make_replicates(n_seeds: int, sizes: dict[str, int], n_boot: int = N_BOOT,
                    seed: int = 0) -> list[dict[str, Resample]]:
    """Bootstrap replicates shared by every arm: per replicate one draw of seeds (the same for all
    benchmarks) and one draw of items per benchmark."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int)
        out.append({b: Resample(seeds, rng.integers(0, n, n)) for b, n in sizes.items()})
    return out


def _matrix(arm: Arm, benchmark: str) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    scores = [items[benchmark] for items in arm.items]
    values = np.array([s.values for s in scores])
    weights = np.array([s.weights for s in scores]) if scores[0].weights is not None else None
    return values, weights, scores[0].transform


def _before_matrix(before: dict[str, ItemScores], benchmark: str):
    s = before[benchmark]
    return np.array([s.values]), (np.array([s.weights]) if s.weights is not None else None), s.transform


class Study:
    """Every statistic of one output folder, each computed on the original data (replicate None)
    or on one bootstrap replicate."""

    def __init__(self, out_dir: Path, n_boot: int = N_BOOT):
        self.before, self.arms = load_arms(out_dir)
        first = self.arms[0].first
        self.task = first.task_name
        self.retention = [b for b in self.before if b != self.task]
        self.n_seeds = len(self.arms[0].runs)
        sizes = {b: len(s.values) for b, s in self.before.items()}
        self.replicates = make_replicates(self.n_seeds, sizes, n_boot)

    def score(self, arm: Arm, benchmark: str, rep: dict[str, Resample] | None = None) -> float:
        values, weights, transform = _matrix(arm, benchmark)
        return aggregate(values, weights, transform, None if rep is None else rep[benchmark])

    def base(self, benchmark: str, rep: dict[str, Resample] | None = None) -> float:
        values, weights, transform = _before_matrix(self.before, benchmark)
        resample = None if rep is None else Resample(np.zeros(1, dtype=int), rep[benchmark].items)
        return aggregate(values, weights, transform, resample)

    def retention_of(self, arm: Arm, rep: dict[str, Resample] | None = None) -> float:
        """Mean relative retention (after / before) over the retention benchmarks."""
        ratios = [relative_retention(self.before[b].metric, self.base(b, rep), self.score(arm, b, rep))
                  for b in self.retention]
        return float(np.mean(ratios)) if ratios else math.nan

    def interval(self, fn) -> Interval:
        """Percentile interval of ``fn(rep)`` over the replicates, estimate ``fn(None)``."""
        samples = np.array([fn(rep) for rep in self.replicates])
        samples = samples[np.isfinite(samples)]
        if len(samples) < len(self.replicates) / 2:
            return Interval(fn(None), math.nan, math.nan)
        return Interval(fn(None), float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5)))

    def points(self, method: str, rep=None, lrs: set[float] | None = None) -> list[tuple[float, float]]:
        """(task, retention) of every arm of ``method``, only at ``lrs`` when given."""
        return [(self.score(a, self.task, rep), self.retention_of(a, rep)) for a in self.arms
                if a.method == method and (lrs is None or a.first.lr in lrs)]

    def lrs(self, method: str) -> set[float]:
        return {a.first.lr for a in self.arms if a.method == method}


def _plain(arms: list[Arm]) -> list[Arm]:
    return [a for a in arms if a.first.scale is None]


def _pairs(arms: list[Arm]) -> list[tuple[Arm, Arm]]:
    """(arm, reference): every plain arm against lora at its lr (weight decay 0); corda++ and
    peft-corda also against corda."""
    plain = _plain(arms)
    by = {(a.first.method, a.first.lr, a.first.weight_decay or 0.0): a for a in plain}
    out = []
    for a in plain:
        r = a.first
        if r.method != "lora" or r.weight_decay:
            ref = by.get(("lora", r.lr, 0.0))
            if ref is not None and ref is not a:
                out.append((a, ref))
        # CorDA++, CorDA variants (corda:<field>=<value>) and PEFT's CorDA are each also judged
        # against this library's plain CorDA
        if r.method.startswith(CORDA_RIVALS) and ("corda", r.lr, r.weight_decay or 0.0) in by:
            out.append((a, by[("corda", r.lr, r.weight_decay or 0.0)]))
    return out


def _steps_to(curve: list[float], target: float, lower: bool) -> float:
    """First step (1-based) at which ``curve`` reaches ``target``; NaN if it never does."""
    for i, v in enumerate(curve, 1):
        if (v <= target) if lower else (v >= target):
            return float(i)
    return math.nan


def smoothed(losses: list[float]) -> list[float]:
    window = max(1, int(len(losses) * SMOOTHING))
    return [float(np.mean(losses[max(0, i + 1 - window):i + 1])) for i in range(len(losses))]


def convergence(arm: Arm, ref: Arm) -> dict[str, Any]:
    """Per seed, LoRA's steps over the method's steps to reach LoRA's final smoothed loss (and final
    task score where task curves exist); the mean ratio with a bootstrap interval over seeds."""
    out: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for what in ("loss", "task"):
        ratios = []
        for run, lora in zip(arm.runs, ref.runs):
            if what == "loss" and run.losses and lora.losses:
                target = smoothed(lora.losses)[-1]
                mine, theirs = _steps_to(smoothed(run.losses), target, True), len(lora.losses)
            elif what == "task" and run.task_curve and lora.task_curve:
                steps = sorted(lora.task_curve)
                target = lora.task_curve[steps[-1]]
                lower = lower_is_better(run.task.metric)
                theirs = next(s for s in steps if (lora.task_curve[s] <= target if lower else lora.task_curve[s] >= target))
                hit = [s for s in sorted(run.task_curve)
                       if (run.task_curve[s] <= target if lower else run.task_curve[s] >= target)]
                mine = float(hit[0]) if hit else math.nan
            else:
                continue
            ratios.append(theirs / mine if mine == mine and mine > 0 else math.nan)
        finite = np.array([r for r in ratios if math.isfinite(r)])
        if len(finite):
            boots = [float(np.mean(rng.choice(finite, len(finite)))) for _ in range(N_BOOT)]
            out[what] = {"ratio": Interval(float(np.mean(finite)), float(np.percentile(boots, 2.5)),
                                           float(np.percentile(boots, 97.5))).__dict__,
                         "seeds": len(ratios), "reached": len(finite)}
    return out


def compute(out_dir: Path, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Every number of study.json (see the module docstring)."""
    st = Study(out_dir, n_boot)
    benchmarks = [st.task, *st.retention]
    result: dict[str, Any] = {
        "task": st.task, "retention": st.retention, "seeds": sorted(r.seed for r in st.arms[0].runs),
        "items": {b: len(st.before[b].values) for b in benchmarks},
        "metrics": {b: st.before[b].metric for b in benchmarks},
        "base": {b: st.base(b) for b in benchmarks}, "arms": {}, "paired": [], "matched": [], "convergence": []}
    for arm in st.arms:
        row = {b: st.interval(lambda rep, b=b: st.score(arm, b, rep)).__dict__ for b in benchmarks}
        row["retention"] = st.interval(lambda rep: st.retention_of(arm, rep)).__dict__
        updates = [r.update["relative"] for r in arm.runs if r.update]
        result["arms"][arm.key] = {"method": arm.method, "lr": arm.first.lr, "weight_decay": arm.first.weight_decay,
                                   "scale": arm.first.scale, "seeds": len(arm.runs), "scores": row,
                                   "update_relative": float(np.mean(updates)) if updates else None}
    sized = [(a["update_relative"], a["scores"]["retention"]["estimate"]) for a in result["arms"].values()
             if a["update_relative"] is not None and a["scale"] is None]
    result["update_correlation"] = (float(np.corrcoef(*zip(*sized))[0, 1])
                                    if len(sized) > 2 and np.std([x for x, _ in sized]) > 0 else None)
    result["half_width"] = {b: max((Interval(**a["scores"][b]).half_width for a in result["arms"].values()),
                                   default=math.nan) for b in [*benchmarks, "retention"]}
    for arm, ref in _pairs(st.arms):
        diff = {b: st.interval(lambda rep, b=b: st.score(arm, b, rep) - st.score(ref, b, rep)).__dict__
                for b in benchmarks}
        diff["retention"] = st.interval(lambda rep: st.retention_of(arm, rep) - st.retention_of(ref, rep)).__dict__
        result["paired"].append({"arm": arm.key, "reference": ref.key, "difference": diff})
        conv = convergence(arm, ref) if ref.first.method == "lora" else {}
        if conv:
            result["convergence"].append({"arm": arm.key, "reference": ref.key, **conv})
    methods = list(dict.fromkeys(a.method for a in st.arms))
    result["frontiers"] = {m: {"points": st.points(m), "frontier": pareto_frontier(st.points(m))} for m in methods}
    lora = next((m for m in methods if m.startswith("lora") and " wd " not in m), None)
    corda = next((m for m in methods if m.startswith("corda ")), None)
    pairs = [(m, lora) for m in methods if lora and m != lora]
    pairs += [(m, corda) for m in methods if corda and m.startswith(CORDA_RIVALS)]
    for m, ref in pairs:
        # Only the learning rates both methods ran: a reference swept over more of them has a richer
        # frontier, and would win against a single-lr method for that reason alone.
        shared = st.lrs(m) & st.lrs(ref)

        def gap(rep, m=m, ref=ref, shared=shared):
            # x* is recomputed in every replicate: a fixed x* at the frontier's end would be out of
            # reach in about half of them
            a, b = st.points(m, rep, shared), st.points(ref, rep, shared)
            x = matched_task_score(a, b)
            return interpolate_frontier(a, x) - interpolate_frontier(b, x)

        result["matched"].append({"method": m, "reference": ref, "lrs": sorted(shared),
                                  "task_score": matched_task_score(st.points(m, None, shared),
                                                                   st.points(ref, None, shared)),
                                  "difference": st.interval(gap).__dict__})
    return result


def _pct(metric: str) -> float:
    """Accuracies and exact match are shown in %, perplexity and cross-entropy as they are."""
    return 1.0 if lower_is_better(metric) else 100.0


def _digits(metric: str) -> int:
    return 2 if lower_is_better(metric) else 1


def _fmt(d: dict, metric: str) -> str:
    return format_interval(Interval(d["estimate"], d["low"], d["high"]), _pct(metric), _digits(metric))


def render(result: dict[str, Any], title: str) -> str:
    """study.md: the arms with intervals, the paired differences, retention at matched task score."""
    benchmarks = [result["task"], *result["retention"]]
    metric = result["metrics"]
    lines = [f"# {title}", "",
             f"Mean over seeds {result['seeds']} with a 95 % bootstrap interval over seeds and items "
             f"(items: {', '.join(f'{b} {n}' for b, n in result['items'].items())}). Accuracies in %. "
             "Retention: mean over the retention benchmarks of after / before (before / after where lower is "
             "better), so 1.00 keeps everything.", ""]
    head = ["arm", "seeds", *[f"{b} ({metric[b]})" for b in benchmarks], "retention", "‖ΔW‖/‖W‖"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| base model | – | " + " | ".join(
        f"{result['base'][b] * _pct(metric[b]):.{_digits(metric[b])}f}" for b in benchmarks) + " | 1.00 | 0 |")
    for key, arm in result["arms"].items():
        cells = [_fmt(arm["scores"][b], metric[b]) for b in benchmarks]
        upd = "–" if arm["update_relative"] is None else f"{arm['update_relative']:.3f}"
        lines.append(f"| {key} | {arm['seeds']} | " + " | ".join(cells)
                     + f" | {format_interval(Interval(**arm['scores']['retention']), 1.0, 3)} | {upd} |")
    lines += ["", "Widest interval half-width over the arms: " + ", ".join(
        f"{b} ±{result['half_width'][b] * (_pct(metric[b]) if b in metric else 1):.{_digits(metric[b]) if b in metric else 3}f}"
        for b in result["half_width"]) + ".",
              "", "## Paired differences (arm − reference, same seeds and items)", "",
              "| arm | reference | " + " | ".join(benchmarks) + " | retention |", "|" + "---|" * (len(benchmarks) + 3)]
    for p in result["paired"]:
        d = p["difference"]
        lines.append(f"| {p['arm']} | {p['reference']} | " + " | ".join(
            _mark(d[b], _pct(metric[b]), _digits(metric[b])) for b in benchmarks) + f" | {_mark(d['retention'], 1.0, 3)} |")
    if result["matched"]:
        lines += ["", "## Retention at matched task score", "",
                  "On each method's Pareto frontier over learning rates (and adapter scales), interpolated at the "
                  "highest task score both methods reach, using only the learning rates both methods ran.", "",
                  "| method | reference | learning rates | task score | retention difference |", "|---|---|---|---|---|"]
        for m in result["matched"]:
            lrs = ", ".join(f"{lr:g}" for lr in m.get("lrs", [])) or "all"
            if not math.isfinite(m["task_score"]):
                lines.append(f"| {m['method']} | {m['reference']} | {lrs} | – | the frontiers do not overlap: no task score "
                             "at which both were measured (add learning rates or --scale-sweep) |")
                continue
            lines.append(f"| {m['method']} | {m['reference']} | {lrs} | {m['task_score'] * _pct(metric[result['task']]):.1f} "
                         f"| {_mark(m['difference'], 1.0, 3)} |")
    if result["convergence"]:
        lines += ["", "## Convergence against LoRA", "",
                  "LoRA's steps over the method's steps to reach LoRA's final smoothed training loss (loss) and LoRA's "
                  "final task score (task); > 1 is faster.", "", "| arm | loss | task |", "|---|---|---|"]
        for c in result["convergence"]:
            cell = {w: (f"{format_interval(Interval(**c[w]['ratio']), 1.0, 2)} ({c[w]['reached']}/{c[w]['seeds']} seeds "
                        "reached)") if w in c else "–" for w in ("loss", "task")}
            lines.append(f"| {c['arm']} | {cell['loss']} | {cell['task']} |")
    if result.get("update_correlation") is not None:
        lines += ["", f"Correlation of retention with the relative update size over the trained arms: "
                      f"r = {result['update_correlation']:.2f} ({len([a for a in result['arms'].values() if a['scale'] is None])} arms)."]
    lines += ["", "Differences marked * have an interval that excludes 0.", "",
              "![trade-off](tradeoff.png)", "", "![update size](update.png)", ""]
    return "\n".join(lines)


def _mark(d: dict, scale: float, digits: int) -> str:
    iv = Interval(**d)
    star = "*" if math.isfinite(iv.low) and (iv.low > 0 or iv.high < 0) else ""
    return format_interval(iv, scale, digits) + star


def write_study(out_dir: str | Path, n_boot: int = N_BOOT) -> dict[str, Path]:
    """study.json, study.md, tradeoff.png and update.png in ``out_dir`` (from its runs/ folder)."""
    from corda_vl.lab.plots import plot_frontiers, plot_update_size

    out = Path(out_dir)
    result = compute(out, n_boot)
    paths = {name: out / name for name in ("study.json", "study.md", "tradeoff.png", "update.png")}
    title = out.name
    if (out / "config.json").is_file():  # the recipe and its mode: clip_kpm runs both KPM and IPM studies
        cfg = json.loads((out / "config.json").read_text())
        title = f"{cfg['recipe']} ({cfg['mode'].upper()}), {out.name}"
    with atomic_file(paths["study.json"]) as tmp:
        tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    with atomic_file(paths["study.md"]) as tmp:
        tmp.write_text(render(result, title))
    with atomic_file(paths["tradeoff.png"]) as tmp:
        plot_frontiers(result, tmp, title=title)
    with atomic_file(paths["update.png"]) as tmp:
        plot_update_size(result, tmp, title=title)
    return paths
