"""The one report every recipe writes: ``results.json``, ``report.md`` and ``plot.png``.

One writer for all recipes means every comparison (CorDA KPM vs IPM vs LoRA vs PiSSA ..., CLIP,
LLaVA or LLaMA) can be read by the same scripts and looks the same to a reader.

``results.json`` schema (fixed keys; :func:`load_results` refuses anything else)::

    {
      "recipe": str,                      # which recipe produced the file
      "model": str,                       # base model name or path
      "runs": [
        {
          "method": str,                  # "corda", "corda++", "lora", "pissa", ...
          "mode": str | null,             # "kpm" / "ipm"; null where it does not apply
          "rank": int | null,             # exactly one of "rank" and "budget": "budget" when the
          "budget": int,                  #   ranks were allocated under a parameter budget
          "trainable_params": int,
          "task": {"name": str, "metric": str, "before": float | null, "after": float | null},
          "retention": {NAME: {"metric": str, "before": float | null, "after": float | null}},
          "seconds": {STAGE: float},      # e.g. {"calibrate": 3.1, "build": 0.4, "train": 55.0}
          "scale": float,                 # only on adapter-scale sweep points (WiSE-style: the
                                          #   same trained adapter evaluated at scale 0 ... 1)
          "seed": int, "lr": float, "weight_decay": float,   # optional: the run's training settings
          "update": {"fro": float, "relative": float},     # optional: ||ΔW||_F against the original base
          "losses": [float],              # optional: training loss per step
          "task_curve": {STEP: float}     # optional: task score every task_eval_every steps
        }
      ]
    }

``before`` / ``after`` are null only where the value was not finite (a diverged perplexity);
they load back as NaN. Metrics named in :data:`corda_vl.lab.eval.metrics.LOWER_IS_BETTER` (or whose last ``_``/``-``/``/``
separated word is) are lower-is-better; every other metric is higher-is-better.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corda_vl.config import help_field
from corda_vl.atomic import atomic_file
from corda_vl.errors import CordaError
from corda_vl.lab.plots import Point, plot_retention
from corda_vl.lab.eval.metrics import average_retention, lower_is_better, relative_retention as metric_retention

RUN_KEYS = ("method", "mode", "trainable_params", "task", "retention", "seconds")
OPTIONAL_RUN_KEYS = ("seed", "lr", "weight_decay", "update", "losses", "task_curve", "ranks")
TASK_KEYS = ("name", "metric", "before", "after")
SCORE_KEYS = ("metric", "before", "after")



def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class Score:
    """One metric measured before and after adaptation (same evaluator, same data)."""

    metric: str = help_field("Metric name, e.g. 'acc1', 'em', 'perplexity' (sets the better direction).")
    before: float = help_field("Value of the base model (adapter at init or absent).")
    after: float = help_field("Value after training the adapter (at ``Run.scale`` for sweep points).")

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise CordaError(f"Score.metric must be a non-empty metric name, got {self.metric!r}.")
        for name in ("before", "after"):
            value = getattr(self, name)
            if not _is_number(value):
                raise CordaError(f"Score.{name} of {self.metric!r} must be a number, got {value!r}.")
            setattr(self, name, float(value))


@dataclass
class Run:
    """One adapted model: how it was built, its task score and what it kept of the rest."""

    method: str = help_field("Adapter method ('corda', 'corda++', 'lora', 'pissa', 'milora', ...).")
    mode: str | None = help_field("'kpm' or 'ipm' for CorDA methods; None where it does not apply.")
    rank: int | None = help_field("Adapter rank (uniform ranks); None when a budget is given instead.")
    budget: int | None = help_field("Trainable-parameter budget the ranks were allocated under (corda++).")
    trainable_params: int = help_field("Number of trainable adapter parameters.")
    task_name: str = help_field("The task the adapter was trained on, e.g. 'digits' or 'easy-vqa'.")
    task: Score = help_field("Task metric before and after training.")
    retention: dict[str, Score] = help_field("{benchmark: Score} of the knowledge to keep (zero-shot, QA, ppl).")
    seconds: dict[str, float] = help_field("{stage: wall-clock seconds}, e.g. calibrate, build, train, eval.")
    scale: float | None = help_field(
        "Adapter scale of a WiSE-style sweep point (the same trained adapter evaluated at scale "
        "0 ... 1); None for an ordinary run.",
        default=None,
    )
    seed: int | None = help_field("Seed of the run (training order, random init, calibration sample).", default=None)
    lr: float | None = help_field("Peak learning rate the adapter was trained with.", default=None)
    weight_decay: float | None = help_field("AdamW weight decay the adapter was trained with.", default=None)
    update: dict[str, float] | None = help_field(
        "{'fro': ||ΔW||_F, 'relative': ||ΔW||_F / ||W||_F} over the adapted layers, trained against the "
        "original base (corda_vl.lab.interpolation.update_size).", default=None)
    losses: list[float] | None = help_field("Training loss of every step.", default=None)
    task_curve: dict[int, float] | None = help_field(
        "{step: task score} measured during training (task_eval_every); the last entry is the final score.",
        default=None)
    ranks: dict[str, dict[str, dict[str, int]]] | None = help_field(
        "Allocated ranks (corda++): BuildRecord.rank_histograms(), layers per rank per group and per "
        "projection type.", default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise CordaError(f"Run.method must be a non-empty string, got {self.method!r}.")
        if self.mode is not None and not isinstance(self.mode, str):
            raise CordaError(f"Run.mode must be a string or None, got {self.mode!r}.")
        if self.rank is not None and self.budget is not None:
            raise CordaError(f"{self.method}: give Run.rank or Run.budget, not both (budget for allocated ranks).")
        for name in ("rank", "budget"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise CordaError(f"{self.method}: Run.{name} must be a non-negative int or None, got {value!r}.")
        if not _is_int(self.trainable_params) or self.trainable_params < 0:
            raise CordaError(f"{self.method}: Run.trainable_params must be a non-negative int, "
                             f"got {self.trainable_params!r}.")
        if not isinstance(self.task_name, str) or not self.task_name:
            raise CordaError(f"{self.method}: Run.task_name must be a non-empty string, got {self.task_name!r}.")
        if not isinstance(self.retention, dict) or not isinstance(self.seconds, dict):
            raise CordaError(f"{self.method}: Run.retention and Run.seconds must be dicts keyed by name.")
        if not isinstance(self.task, Score) or not all(isinstance(s, Score) for s in self.retention.values()):
            raise CordaError(f"{self.method}: Run.task and the values of Run.retention must be Score objects.")
        bad = {k: v for k, v in self.seconds.items() if not _is_number(v) or not math.isfinite(v)}
        if bad:
            raise CordaError(f"{self.method}: Run.seconds must map stage names to finite numbers, got {bad!r}.")
        self.seconds = {str(k): float(v) for k, v in self.seconds.items()}
        if self.scale is not None:
            if not _is_number(self.scale) or not math.isfinite(self.scale):
                raise CordaError(f"{self.method}: Run.scale must be a finite number or None, got {self.scale!r}.")
            self.scale = float(self.scale)
        if self.seed is not None and not _is_int(self.seed):
            raise CordaError(f"{self.method}: Run.seed must be an int or None, got {self.seed!r}.")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise CordaError(f"{self.method}: Run.{name} must be a non-negative number or None, got {value!r}.")

    @property
    def label(self) -> str:
        """Short name of the configuration, e.g. 'corda kpm r16' or 'corda++ kpm budget 120,000'."""
        parts = [self.method] + ([self.mode] if self.mode else [])
        if self.budget is not None or self.rank is not None:
            parts.append(_size(self))
        return " ".join(parts)

    @property
    def arm(self) -> str:
        """The configuration without the seed: label, learning rate and weight decay, e.g.
        'lora r8 lr 0.001 wd 0.1'. Runs of one arm differ only by seed."""
        parts = [self.label]
        if self.lr is not None:
            parts.append(f"lr {self.lr:g}")
        if self.weight_decay:
            parts.append(f"wd {self.weight_decay:g}")
        return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Metric direction, retention and gain


def relative_retention(score: Score) -> float:
    """How much of the base value was kept (see :func:`corda_vl.lab.eval.metrics.relative_retention`)."""
    return metric_retention(score.metric, score.before, score.after)


def task_gain(score: Score) -> float:
    """Improvement on the task in metric units: after - before (before - after if lower-is-better)."""
    gain = score.after - score.before
    return -gain if lower_is_better(score.metric) else gain


def mean_retention(run: Run) -> float:
    """Mean relative retention over the run's retention benchmarks with a defined ratio (NaN if none)."""
    return average_retention(map(relative_retention, run.retention.values()))


def retention_points(runs: list[Run]) -> list[Point]:
    """Every run as a Point (undefined coordinates are NaN; the plot leaves those out)."""
    return [Point(run.label, task_gain(run.task), mean_retention(run), run.scale) for run in runs]


# ---------------------------------------------------------------------------------------------
# results.json


def _number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _score_dict(score: Score) -> dict[str, Any]:
    return {"metric": score.metric, "before": _number(score.before), "after": _number(score.after)}


def run_to_dict(run: Run) -> dict[str, Any]:
    """The JSON form of one run (module docstring): exactly one of "rank" / "budget"."""
    out: dict[str, Any] = {"method": run.method, "mode": run.mode}
    if run.budget is not None:
        out["budget"] = run.budget
    else:
        out["rank"] = run.rank
    out["trainable_params"] = run.trainable_params
    out["task"] = {"name": run.task_name, **_score_dict(run.task)}
    out["retention"] = {name: _score_dict(score) for name, score in run.retention.items()}
    out["seconds"] = dict(run.seconds)
    if run.scale is not None:
        out["scale"] = run.scale
    for key in OPTIONAL_RUN_KEYS:
        value = getattr(run, key)
        if value is not None:
            out[key] = {str(k): v for k, v in value.items()} if key == "task_curve" else value
    return out


def _check_keys(obj: Any, required: tuple[str, ...], optional: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CordaError(f"{where} must be a JSON object, got {type(obj).__name__}.")
    missing = [k for k in required if k not in obj]
    unknown = [k for k in obj if k not in required and k not in optional]
    if missing or unknown:
        raise CordaError(f"{where}: missing keys {missing}, unknown keys {unknown}; "
                         f"expected {list(required)} (optional {list(optional)}).")
    return obj


def _value(obj: dict[str, Any], key: str, where: str) -> float:
    value = obj[key]
    if value is None:
        return math.nan
    if not _is_number(value):
        raise CordaError(f"{where}.{key} must be a number or null, got {value!r}.")
    return float(value)


def _score_from_dict(obj: Any, where: str, keys: tuple[str, ...] = SCORE_KEYS) -> Score:
    obj = _check_keys(obj, keys, (), where)
    before, after = _value(obj, "before", where), _value(obj, "after", where)
    try:
        return Score(obj["metric"], before, after)
    except CordaError as exc:
        raise CordaError(f"{where}: {exc}") from None


def run_from_dict(obj: Any, where: str = "run") -> Run:
    """Parse and validate one run of results.json; CordaError naming ``where`` if malformed."""
    obj = _check_keys(obj, RUN_KEYS, ("rank", "budget", "scale", *OPTIONAL_RUN_KEYS), where)
    if ("rank" in obj) == ("budget" in obj):
        raise CordaError(f"{where}: needs exactly one of 'rank' and 'budget'.")
    task_score = _score_from_dict(obj["task"], f"{where}.task", TASK_KEYS)  # checks the keys too
    retention = obj["retention"]
    for key in ("retention", "seconds"):
        if not isinstance(obj[key], dict):
            raise CordaError(f"{where}.{key} must be a JSON object, got {type(obj[key]).__name__}.")
    scores = {name: _score_from_dict(s, f"{where}.retention.{name}") for name, s in retention.items()}
    try:
        return Run(method=obj["method"], mode=obj["mode"], rank=obj.get("rank"), budget=obj.get("budget"),
                   trainable_params=obj["trainable_params"], task_name=obj["task"]["name"], task=task_score,
                   retention=scores, seconds=obj["seconds"], scale=obj.get("scale"), seed=obj.get("seed"),
                   lr=obj.get("lr"), weight_decay=obj.get("weight_decay"), update=obj.get("update"),
                   losses=obj.get("losses"), ranks=obj.get("ranks"),
                   task_curve={int(k): v for k, v in obj["task_curve"].items()} if obj.get("task_curve") else None)
    except CordaError as exc:
        raise CordaError(f"{where}: {exc}") from None


def load_results(path: str | os.PathLike) -> tuple[str, str, list[Run]]:
    """Read a results.json written by :func:`write_report` back into ``(recipe, model, runs)``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CordaError(f"{path} does not exist; run the recipe (it writes results.json) first.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CordaError(f"{path} is not valid JSON ({exc}); rerun the recipe to write it again.") from None
    try:
        return _results_from_dict(data, str(path))
    except CordaError as exc:
        raise CordaError(f"{exc} The file must follow the schema in corda_vl.lab.report's docstring; "
                         f"write it with corda_vl.write_report.") from None


def _results_from_dict(data: Any, where: str) -> tuple[str, str, list[Run]]:
    _check_keys(data, ("recipe", "model", "runs"), (), where)
    for key in ("recipe", "model"):
        if not isinstance(data[key], str):
            raise CordaError(f"{where}: {key!r} must be a string, got {data[key]!r}.")
    if not isinstance(data["runs"], list):
        raise CordaError(f"{where}: 'runs' must be a list of runs.")
    runs = [run_from_dict(run, f"{where}: runs[{i}]") for i, run in enumerate(data["runs"])]
    return data["recipe"], data["model"], runs


# ---------------------------------------------------------------------------------------------
# report.md


def _is_fraction(score: Score) -> bool:
    return (not lower_is_better(score.metric)
            and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (score.before, score.after)))


def _format_value(value: float, percent: bool) -> str:
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if percent:
        return f"{100 * value:.1f}%"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_score(score: Score) -> str:
    """'71.2% → 65.0%' for accuracies / EM in [0, 1], '12.31 → 12.90' for perplexity and the rest."""
    percent = _is_fraction(score)
    return f"{_format_value(score.before, percent)} → {_format_value(score.after, percent)}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _metrics_of(scores: list[Score]) -> str:
    return "/".join(dict.fromkeys(s.metric for s in scores))


def _size(run: Run) -> str:
    if run.budget is not None:
        return f"budget {run.budget:,}"
    return f"r{run.rank}" if run.rank is not None else "–"


def _table(runs: list[Run], benchmarks: list[str], with_scale: bool) -> list[str]:
    task_header = ", ".join(dict.fromkeys(r.task_name for r in runs))
    header = ["method", "mode", "rank / budget"] + (["scale"] if with_scale else []) + [
        "trainable params", f"task: {task_header} ({_metrics_of([r.task for r in runs])})"]
    for name in benchmarks:
        header.append(f"{name} ({_metrics_of([r.retention[name] for r in runs if name in r.retention])})")
    header.append("seconds (total)")
    lines = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    for run in runs:
        row = [run.method, run.mode or "–", _size(run)] + ([f"{run.scale:g}"] if with_scale else [])
        row += [f"{run.trainable_params:,}", format_score(run.task)]
        row += [format_score(run.retention[name]) if name in run.retention else "–" for name in benchmarks]
        row.append(f"{sum(run.seconds.values()):,.1f}")
        lines.append("| " + " | ".join(map(_cell, row)) + " |")
    return lines


def render_markdown(recipe: str, model: str, runs: list[Run]) -> str:
    """report.md: one row per run (sweep points in a second table), one column per benchmark."""
    benchmarks = list(dict.fromkeys(name for run in runs for name in run.retention))
    plain = [r for r in runs if r.scale is None]
    sweep = sorted((r for r in runs if r.scale is not None), key=lambda r: (r.label, r.scale))
    lower = sorted({s.metric for r in runs for s in [r.task, *r.retention.values()] if lower_is_better(s.metric)})
    lines = [f"# {recipe}: {model}", "",
             "Scores are before → after adaptation; accuracies / EM in [0, 1] are shown as percentages."]
    if lower:
        lines.append(f"Lower is better for {', '.join(lower)}.")
    if plain:
        lines += ["", "## Methods", "", *_table(plain, benchmarks, with_scale=False)]
    if sweep:
        lines += ["", "## Adapter-scale sweeps", "",
                  "The same trained adapter evaluated at each scale (0 = base model, 1 = as trained).", "",
                  *_table(sweep, benchmarks, with_scale=True)]
    allocated = [r for r in plain if r.ranks]
    if allocated:
        lines += ["", "## Allocated ranks", "", "Layers per rank (rank×layers), per group and per projection type.", ""]
        for run in allocated:
            where = ", ".join(f"{k} {v:g}" for k, v in (("seed", run.seed), ("lr", run.lr)) if v is not None)
            lines.append(f"* {run.label}{f' ({where})' if where else ''}: " + "; ".join(
                f"{key}: " + " ".join(f"{rank}×{n}" for rank, n in counts.items())
                for kind in ("group", "projection") for key, counts in run.ranks.get(kind, {}).items()))
    lines += ["", "![task gain vs retention](plot.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The writer


def write_report(out_dir: str | os.PathLike, recipe: str, model: str, runs: list[Run]) -> dict[str, Path]:
    """Write results.json, report.md and plot.png into ``out_dir``, each atomically.

    results.json is written first, so the numbers survive even if plotting fails. Returns
    ``{"results": ..., "report": ..., "plot": ...}`` paths.
    """

    if not runs:
        raise CordaError(f"{recipe}: no runs to report; evaluate at least one method before write_report.")
    bad = [r for r in runs if not isinstance(r, Run)]
    if bad:
        raise CordaError(f"{recipe}: write_report expects corda_vl.lab.report.Run objects, got {type(bad[0]).__name__}.")
    out = Path(out_dir)
    paths = {"results": out / "results.json", "report": out / "report.md", "plot": out / "plot.png"}
    data = {"recipe": recipe, "model": model, "runs": [run_to_dict(r) for r in runs]}
    with atomic_file(paths["results"]) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    with atomic_file(paths["report"]) as tmp:
        tmp.write_text(render_markdown(recipe, model, runs))
    with atomic_file(paths["plot"]) as tmp:
        plot_retention(retention_points(runs), tmp, title=f"{recipe}: {model}",
                       xlabel=_gain_label(runs), ylabel=_retention_label(runs))
    return paths


def _gain_label(runs: list[Run]) -> str:
    metrics = list(dict.fromkeys(r.task.metric for r in runs))
    flipped = [m for m in metrics if lower_is_better(m)]
    note = f"; before − after for {', '.join(flipped)}" if flipped else ""
    return f"task gain ({'/'.join(metrics)}: after − before{note})"


def _retention_label(runs: list[Run]) -> str:
    lower = sorted({s.metric for r in runs for s in r.retention.values() if lower_is_better(s.metric)})
    note = f"; before/after for {', '.join(lower)}" if lower else ""
    return f"mean relative retention (after/before{note})"
