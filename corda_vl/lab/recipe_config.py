"""The typed settings of the retention recipes (``recipes/*_kpm.py``).

A recipe's YAML (``recipes/configs/<name>.yaml``) holds the values; the dataclasses here say which
keys exist, what type each has and what it does. :class:`RecipeConfig` holds the keys every recipe
shares (model, methods, targets, calibration, training, output); one subclass per recipe adds that
recipe's own data sizes and prompts. The same fields give the recipes their command-line flags
(:func:`add_flags`): ``--calib-samples 64`` overrides ``calib_samples``.

Keys whose value is the recipe's choice (model, task, data sizes, prompts) have no default, so the
YAML is the one place they are set; knobs with a library-wide meaning (rank, damping, the training
loop's) default to the library's values.
"""

from __future__ import annotations

import argparse
import difflib
import math
import types
from dataclasses import MISSING, asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from corda_vl.config import COMPACTNESS, CordaConfig, help_field
from corda_vl.errors import CordaError
from corda_vl.lab.baselines import BASELINES
from corda_vl.lab.resources import merge_overrides
from corda_vl.lab.training import TrainConfig
from corda_vl.methods import get_method, method_names

C = TypeVar("C", bound="RecipeConfig")

SMOKE = "smoke"
"""The YAML section merged over the rest under ``--smoke``: the same flow at tiny sizes."""


def _train_field(name: str, text: str | None = None) -> Any:
    """``name``'s default (and help text) taken from TrainConfig, so the recipe settings and the
    training loop cannot disagree about them."""
    source = next(f for f in fields(TrainConfig) if f.name == name)
    return help_field(text or source.metadata["help"], default=source.default)


_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_AT_LEAST_0 = (lambda v: v >= 0, "0 or more")
_POSITIVE = (lambda v: v > 0, "a finite number above 0")
NUMBER_RULES = {
    **dict.fromkeys(("rank", "budget", "group_ranks", "task_train_rows", "task_eval_rows", "calib_samples",
                     "calib_splits", "calib_batch_size", "steps", "batch_size", "grad_accum", "keep_checkpoints",
                     "eval_batch_size", "threads", "capital_questions", "general_texts", "fact_texts",
                     "retention_images", "vqa_questions", "vqa_new_tokens"), _AT_LEAST_1),
    **dict.fromkeys(("warmup_steps", "checkpoint_every", "seed", "seeds", "task_eval_every", "capital_shots",
                     "weight_decay", "lora_weight_decays", "grad_clip_norm"), _AT_LEAST_0),
    **dict.fromkeys(("alpha", "lr", "lrs", "logit_scale"), _POSITIVE),
    "scales": (lambda v: 0 <= v <= 1, "between 0 (the base model) and 1 (the adapter as trained)"),
}
"""What each number of a recipe config may be (NaN and infinity never)."""


@dataclass(kw_only=True)
class RecipeConfig:
    """The settings every retention recipe shares; a recipe's own keys live in its subclass."""

    RETENTION: ClassVar[tuple[str, ...] | None] = None
    """The retention benchmarks the recipe knows (None: the recipe checks its own)."""

    recipe: str = help_field("Name of the recipe; titles results.json, report.md and the plot.")
    model: str = help_field("Model to load: an embedded alias, a hub id or a local folder.")
    device: str = help_field("'auto' (cuda when a GPU is visible, else cpu) or a torch device such as 'cuda:1'.",
                             default="auto")
    methods: list[str] = help_field(
        "Methods to compare, in this order (any of corda_vl.methods.method_names(), the PEFT baselines, "
        "corda++:<metric> for CorDA++ with compactness bound, paper or heldout, or a CorDA variant such as "
        "corda:damping=0.01 or corda:factor_balance=norm; see split_method).",
        default_factory=lambda: ["lora", "corda", "corda++"])
    mode: Literal["kpm", "ipm"] = help_field(
        "'kpm': calibrate on the knowledge to keep, so the adapter starts in the directions that carry least of "
        "it; 'ipm': calibrate on the task, so it starts in the directions the task uses most.", default="kpm")
    rank: int = help_field("Adapter rank of every adapted module.", default=16)
    alpha: float | None = help_field(
        "LoRA alpha: the adapter output is scaled by alpha / rank. None: alpha = rank (scale 1) for every method.",
        default=None)
    budget: int | None = help_field(
        "corda++: trainable-parameter budget shared by all adapted modules. None: the parameters of uniform rank.",
        default=None)
    groups: list[str] | None = help_field(
        "Module groups to adapt, as the model family names them (LLaMA: language, head; CLIP: vision, text, "
        "projection; LLaVA: vision, projector, language, head). None: the family's default groups.", default=None)
    target_modules: list[str] | str | None = help_field(
        "Modules to adapt inside the groups: name suffixes (e.g. q_proj,v_proj) or, in the YAML, one regex "
        "matching the full module name. None: every Linear of the groups.", default=None)
    exclude_modules: list[str] | str | None = help_field(
        "Modules to leave alone, written like target_modules.", default=None)
    group_ranks: dict[str, int] = help_field(
        "{group: rank} replacing rank for whole groups, e.g. {vision: 8, language: 32}.", default_factory=dict)
    corda: dict[str, Any] = help_field(
        "Extra CordaConfig fields for every method (the covariance ones matter to corda and corda++), "
        "e.g. {damping: [0.01, 0.1, 1.0]}.", default_factory=dict)
    cordapp: dict[str, Any] = help_field(
        "Extra CordaConfig fields for corda++ only, e.g. {rank_max: 32, candidates: [calib]}.",
        default_factory=dict)

    task: str = help_field("The task to learn (each recipe lists its tasks).")
    task_train_rows: int = help_field("Rows of the task to train on.")
    task_eval_rows: int = help_field("Held-out rows of the task to score.")
    retention: list[str] = help_field("Benchmarks of what the model should keep, scored before and after.")
    calib_samples: int = help_field(
        "Calibration rows: KPM, the knowledge to keep; IPM, rows of the task.", default=128)
    calib_splits: int = help_field(
        "corda++: N > 1 also keeps N random splits of the calibration set, which each layer may choose "
        "instead of the whole (1: the whole set only).", default=1)
    calib_batch_size: int = help_field("Rows per calibration batch.", default=16)
    calib_sample_scale: Literal["none", "max"] = help_field(
        "'none': every token counts the same; 'max': each sample is first divided by its largest activation, "
        "as PEFT's preprocess_corda does.", default="none")

    steps: int = _train_field("steps")
    batch_size: int = _train_field("batch_size")
    grad_accum: int = _train_field("grad_accum")
    lr: float = _train_field("lr")
    weight_decay: float = _train_field("weight_decay")
    warmup_steps: int = _train_field("warmup_steps")
    grad_clip_norm: float | None = _train_field("grad_clip_norm")
    checkpoint_every: int = _train_field("checkpoint_every")
    keep_checkpoints: int = _train_field("keep_checkpoints")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _train_field("mixed_precision")
    seed: int = _train_field(
        "seed", "Seeds the generated data and the evaluation subsamples (the same items for every run), and is the "
        "run seed when seeds is None.")
    seeds: list[int] | None = help_field(
        "Run every method once per seed: each changes the training order, the random parts of the init and the "
        "calibration sample; the evaluation items stay the same, so methods are compared item by item. "
        "None: [seed].", default=None)
    lrs: list[float] | None = help_field(
        "Learning rates of the trade-off curve: every method of lr_methods runs at each (the others at lr). "
        "None: [lr].", default=None)
    lr_methods: list[str] | None = help_field(
        "Methods that run at every rate of lrs. None: every method.", default=None)
    lora_weight_decays: list[float] = help_field(
        "lora also runs, at lr, with each of these AdamW weight decays: the 'LoRA + weight decay' baseline.",
        default_factory=list)
    save_adapters: bool = help_field(
        "Save each run's adapter at init, trained, and exported as plain LoRA (a study of many runs may turn "
        "this off to save disk).", default=True)
    task_eval_every: int = help_field(
        "Also score the task every N training steps (0: only at the end); the study's convergence steps read "
        "these scores.", default=0)
    eval_batch_size: int = help_field("Rows per evaluation batch.", default=32)
    threads: int | None = help_field(
        "torch CPU threads. None: torch's default (all cores); 1 avoids OpenMP spin-waits for small models "
        "on a busy CPU.", default=None)

    scale_sweep: bool = help_field(
        "Also evaluate every trained adapter at each of scales (0: the base model, 1: as trained).", default=False)
    scales: list[float] = help_field("Adapter scales of the sweep.",
                                     default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    output_dir: str = help_field("Where results, report, plot, adapters and checkpoints go.")

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                raise CordaError(f"{f.name} must be {_describe(hints[f.name])}, got {value!r}; fix it in the YAML "
                                 f"or with {_flag(f.name)}.")
        if not self.methods:
            raise CordaError("methods is empty: name at least one, e.g. --methods lora,corda.")
        named = list(dict.fromkeys([*self.methods, *(self.lr_methods or [])]))
        # split_method raises on a malformed variant, naming what it accepts
        unknown = [m for m in named if split_method(m)[0] not in (*method_names(), *BASELINES)]
        if unknown:
            raise CordaError(f"unknown method(s) {unknown}: choose one or more of "
                             f"{', '.join((*method_names(), *BASELINES))} (e.g. --methods lora,corda,corda++; "
                             "corda++:<metric> or corda:<field>=<value> for a variant), or register a new one "
                             "with corda_vl.methods.register_method.")
        for m in (m for m in named if ":" in m):
            self.corda_config(m)  # a variant's value is checked now, before any model is loaded
        self._check_numbers()
        if self.RETENTION is not None:
            unknown = [name for name in self.retention if name not in self.RETENTION]
            if unknown:
                raise CordaError(f"unknown retention benchmark(s) {unknown} for {self.recipe}: choose from "
                                 f"{', '.join(self.RETENTION)} (YAML 'retention' or --retention).")
        if len(set(self.seeds or [])) != len(self.seeds or []) or len(set(self.lrs or [])) != len(self.lrs or []):
            raise CordaError(f"seeds {self.seeds} and lrs {self.lrs} must not repeat a value.")
        known = {f.name for f in fields(CordaConfig)}
        for key in ("corda", "cordapp"):
            bad = sorted(set(getattr(self, key)) - known)
            if bad:
                raise CordaError(f"{key}: {bad} are not CordaConfig fields; use any of {sorted(known)}.")

    @classmethod
    def from_yaml(cls: type[C], path: str | Path, *, smoke: bool = False, overrides: dict | None = None) -> C:
        """The YAML at ``path``; under ``smoke`` its ``smoke:`` section is merged over the rest, then
        ``overrides`` (the flags given) over both."""
        values = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(values, dict):
            raise CordaError(f"{path}: a recipe config is a YAML mapping of key: value, got {type(values).__name__}.")
        smoke_part = values.pop(SMOKE, None) or {}
        _refuse_unknown(cls, smoke_part, f"{path} ({SMOKE}:)")  # checked even when not used
        if smoke:
            values = merge_overrides(values, smoke_part)
        return cls.from_dict(merge_overrides(values, overrides or {}), source=str(path))

    @classmethod
    def from_dict(cls: type[C], values: dict[str, Any], *, source: str = "recipe config") -> C:
        """The config of ``values``; errors name ``source`` (the YAML's path) and the key."""
        _refuse_unknown(cls, values, source)
        missing = [f.name for f in fields(cls) if f.name not in values and _required(f)]
        if missing:
            raise CordaError(f"{source}: missing key(s) {missing}; add them to the YAML.")
        try:
            return cls(**values)
        except CordaError as err:
            raise CordaError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Every key and its value (plain lists and dicts), as the YAML would write it."""
        return asdict(self)

    def train_config(self) -> TrainConfig:
        """The training loop's settings: the same for every method."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in fields(TrainConfig)})

    def _check_numbers(self) -> None:
        """Counts, rates and scales a run can use: caught here, before any model is loaded."""
        problems = []
        for f in fields(self):
            value, rule = getattr(self, f.name), NUMBER_RULES.get(f.name)
            if rule is None or value is None:
                continue
            values = value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
            test, text = rule
            bad = [v for v in values if not (isinstance(v, (int, float)) and math.isfinite(v) and test(v))]
            if bad:
                problems.append(f"{f.name}={value!r} must be {text} ({_flag(f.name)})")
        if problems:
            raise CordaError("; ".join(problems) + ".")

    def corda_config(self, method: str) -> CordaConfig:
        """The CordaConfig of ``method``: the same targets, rank and scaling for every method, so
        only the initialisation differs. A PEFT baseline (peft-corda, eva, mica) gets lora's."""
        if method in BASELINES:
            method = "lora"
        method, variant = split_method(method)
        kwargs: dict[str, Any] = dict(
            method=method, r=self.rank, alpha=self.alpha, groups=self.groups, target_modules=self.target_modules,
            exclude_modules=self.exclude_modules, group_ranks=dict(self.group_ranks))
        kwargs.update(self.corda)  # e.g. covariance_normalization, damping
        if get_method(method).needs_store:
            kwargs["mode"] = self.mode
        if method == "corda++":
            kwargs.update(budget=self.budget, **self.cordapp)
        kwargs.update(variant)  # the variant's field wins over the YAML's
        return CordaConfig(**kwargs)


# corda:<field>=<value>: a variant of a covariance method that differs in one CordaConfig field,
# run beside the plain method in the same grid so the two are compared on the same seeds and items.
# corda:damping=<lam>: lam first, then the larger steps of this ladder (a fixed ladder, so a variant
# means the same whatever the engine's default is)
DAMPING_LADDER = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
VARIANT_FIELDS = ("damping", "factor_balance", "covariance_normalization", "compactness", "compactness_spectrum")


def split_method(name: str) -> tuple[str, dict[str, Any]]:
    """A recipe method name as (method, CordaConfig fields it sets):

    * ``"corda"`` -> ``("corda", {})``;
    * ``"corda++:heldout"`` -> ``("corda++", {"compactness": "heldout"})`` (a compactness metric);
    * ``"corda:damping=0.01"`` -> ``("corda", {"damping": (0.01, 0.1, 1.0)})``: damping names the
      smallest lam of the schedule, the engine's larger steps follow;
    * ``"corda:factor_balance=norm"`` -> ``("corda", {"factor_balance": "norm"})``.
    """
    method, sep, variant = name.partition(":")
    if not sep:
        return name, {}
    if method == "corda++" and variant in COMPACTNESS:
        return method, {"compactness": variant}
    field, eq, value = variant.partition("=")
    if method not in ("corda", "corda++") or not eq or field not in VARIANT_FIELDS or not value:
        raise CordaError(f"method {name!r}: a variant is corda++:<{'|'.join(COMPACTNESS)}> or "
                         f"corda[++]:<field>=<value> with field one of {', '.join(VARIANT_FIELDS)} "
                         "(e.g. corda:damping=0.01).")
    if field != "damping":
        return method, {field: value}
    try:
        lam = float(value)
    except ValueError:
        raise CordaError(f"method {name!r}: damping must be a number, e.g. corda:damping=0.01.") from None
    return method, {"damping": (lam, *(d for d in DAMPING_LADDER if d > lam))}


@dataclass(kw_only=True)
class LanguageRecipeConfig(RecipeConfig):
    """What the recipes with a language model keep: capitals asked few-shot, and the general-text
    cross-entropy (the forgetting metric of PEFT's own benchmark)."""

    capital_questions: int = help_field("Held-out countries whose capital is asked (retention 'capitals').")
    capital_shots: int = help_field("Solved capital questions shown before each one.")
    knowledge_fields: list[str] = help_field(
        "Country facts asked of the held-out countries besides the capital (retention 'knowledge'), e.g. "
        "[region]; each field is shown its own solved examples.", default_factory=list)
    general_texts: int = help_field(
        "Paragraphs of general text scored by cross-entropy (retention 'general'); never used to calibrate.",
        default=200)
    general_text_file: str | None = help_field(
        "A text file of your own for 'general' (paragraphs separated by blank lines). None: English prose of "
        "the Python language reference, which ships with Python (corda_vl.lab.data.general_texts).", default=None)


@dataclass(kw_only=True)
class LlamaRecipeConfig(LanguageRecipeConfig):
    """``recipes/llama_kpm.py``: a generated skill to learn; capitals, fact texts and general text to keep."""

    RETENTION: ClassVar[tuple[str, ...]] = ("capitals", "knowledge", "facts", "general")

    fact_texts: int = help_field("Fact paragraphs of the held-out countries scored by perplexity ('facts').")


@dataclass(kw_only=True)
class ClipRecipeConfig(RecipeConfig):
    """``recipes/clip_kpm.py``: a generated image set to learn; zero-shot accuracy on others to keep."""

    task_templates: str = help_field(
        "Prompt templates the task is scored with: a key of assets/templates/zero_shot.json.")
    train_template: str = help_field(
        "The one prompt per class that the training loss uses; {} stands for the class name.")
    retention_images: int = help_field("Test images per retention set (a seeded subsample).")
    logit_scale: float | None = help_field(
        "Temperature of the zero-shot softmax. None: the model's learned one.", default=None)


@dataclass(kw_only=True)
class LlavaRecipeConfig(LanguageRecipeConfig):
    """``recipes/llava_kpm.py``: a visual question type to learn; easy-VQA, capitals and general text
    (text only, through the same model) to keep."""

    RETENTION: ClassVar[tuple[str, ...]] = ("easy_vqa", "capitals", "general")

    template: str = help_field("The model's prompt format; {question} stands for the question.")
    vqa_questions: int = help_field("Held-out easy-VQA questions (retention 'easy_vqa').")
    vqa_new_tokens: int = help_field("Most tokens generated per VQA answer.")


# --- command-line flags: one per field ----------------------------------------------------------

ALIASES = {"methods": ("--method",)}
"""Extra spellings: ``--method pissa`` reads better for one method."""
NO_FLAG = ("recipe",)
"""Fields that name the recipe rather than change how it runs."""


def add_flags(parser: argparse.ArgumentParser, config_type: type[RecipeConfig]) -> None:
    """A flag per field of ``config_type`` (``calib_samples`` -> ``--calib-samples``), its help the
    field's. A flag not given leaves the namespace without the field (SUPPRESS), so "not given" and
    "set to none" differ."""
    group = parser.add_argument_group(
        "settings", "Each overrides the YAML key of the same name. Lists are comma-separated, mappings are\n"
        "YAML (merged into the YAML's), and 'none' clears an optional value.")
    hints = _hints(config_type)
    for f in fields(config_type):
        if f.name in NO_FLAG:
            continue
        names = [_flag(f.name), *ALIASES.get(f.name, ())]
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata["help"].replace("%", "%%"))
        if hints[f.name] is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(*names, type=_flag_type(hints[f.name]), metavar=_metavar(hints[f.name]), **common)


def flag_values(args: argparse.Namespace, config_type: type[RecipeConfig]) -> dict[str, Any]:
    """The fields whose flag was given, as overrides for :meth:`RecipeConfig.from_yaml`."""
    return {f.name: getattr(args, f.name) for f in fields(config_type) if hasattr(args, f.name)}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_type(hint: Any):
    """argparse ``type=`` for a field of type ``hint``: flags are text."""
    options = _members(hint)
    nullable = type(None) in options
    options = [o for o in options if o is not type(None)]
    main = next((o for o in options if get_origin(o) in (list, dict)), options[0])  # a list beats a regex str

    def convert(text: str) -> Any:
        if nullable and text.strip().lower() in ("none", "null"):
            return None
        return _from_text(text, main)

    convert.__name__ = _describe(hint)  # argparse's "invalid <name> value" message
    return convert


def _from_text(text: str, hint: Any) -> Any:
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return [_from_text(part.strip(), item) for part in text.split(",") if part.strip()]
    if get_origin(hint) is dict:
        value = yaml.safe_load(text)
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"expected a YAML mapping such as '{{damping: 0.1}}', got {text!r}")
        return value
    if hint in (int, float):
        return hint(text)
    return text  # str and Literal: the config checks the value


def _metavar(hint: Any) -> str:
    main = [o for o in _members(hint) if o is not type(None)][0]
    if get_origin(main) is Literal:
        return "{" + ",".join(map(str, get_args(main))) + "}"
    if get_origin(main) is list:
        return "A,B"
    if get_origin(main) is dict:
        return "YAML"
    return {str: "TEXT"}.get(main, main.__name__.upper())


# --- loose type checks --------------------------------------------------------------------------

@cache
def _hints(config_type: type) -> dict[str, Any]:
    return get_type_hints(config_type)


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _members(hint: Any) -> list[Any]:
    return list(get_args(hint)) if get_origin(hint) in (Union, types.UnionType) else [hint]


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint`` (unions, Literal, list[...], dict[...], scalars; an int is a
    float, a bool is not an int)."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1])
                                               for k, v in value.items())
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    if hint is type(None):
        return "none"
    if hint is Any:
        return "anything"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_describe(a) for a in args)}]"
    return hint.__name__


def _refuse_unknown(config_type: type[RecipeConfig], values: dict, source: str) -> None:
    known = [f.name for f in fields(config_type)]
    unknown = [str(k) for k in values if k not in known]
    if not unknown:
        return
    close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
    guesses = "".join(f" ({k}: did you mean {c[0]}?)" for k, c in close.items() if c)
    raise CordaError(f"{source}: unknown key(s) {unknown}{guesses}; fix the spelling or remove them. "
                     f"{config_type.__name__} knows: {', '.join(known)}.")
