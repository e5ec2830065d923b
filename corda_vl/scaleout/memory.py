"""Memory planner: what calibration and decomposition need, from a config alone (no weights).

:func:`plan_memory` builds the model on the meta device (a 7B config costs nothing), resolves the
targets like ``collect_covariances`` does, and sizes every mode:

* **all at once**: one ``d_in x d_in`` sum per (input key, source), exactly what the
  ``CovarianceStore`` holds, with shared inputs deduped; and without dedupe (one matrix per
  module, as PEFT's CorDA keeps).
* **layer-sequential**: one *block* at a time. Blocks are the repeated layers: the children of
  any ``nn.ModuleList`` of two or more modules of one class (the outermost such list wins, so the
  experts inside a MoE layer stay in their layer); a target outside every such list (LLaVA's
  projector, CLIP's projections, the LM head) is a block of its own. Plus the block's cached
  input and output hidden states for the calibration tokens.
* **decomposition workspace** of the largest module (an estimate, see :func:`_workspace`).

Shared inputs are *detected* as calibration detects them: ``collect_covariances`` runs one
probe batch through a shrunk copy of the config (widths 32, same layers, same module names),
and its store says which modules share an input key and which sources (LLaVA: image / text
tokens) each key gets. When that is impossible, the plan assumes no sharing and says so.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from corda_vl.calibration.loop import collect_covariances
from corda_vl.deprecation import renamed_arguments
from corda_vl.errors import CordaError
from corda_vl.families import detect_family
from corda_vl.families.base import image_tokens
from corda_vl.layers import is_adaptable, linear_weight
from corda_vl.scaleout.blocks import blocks_of
from corda_vl.targets import Target, resolve_targets

GIB = 2**30


@dataclass(frozen=True)
class BlockMemory:
    name: str
    """Block name (``model.layers.3``) or, outside the layer stacks, the module's name."""
    covariance_elements: int
    """Sum of d_in^2 over the block's stored matrices (shared inputs deduped)."""
    cache_bytes: int
    """Hidden states cached for the block: tokens x width x cache dtype (one generation: each
    batch's block output replaces its input; a lone module: max(d_in, d_out) wide)."""
    workspace_elements: int
    """Decomposition workspace of the block's largest module, in elements of the decompose dtype."""
    workspace_module: str
    """That module."""


@dataclass(frozen=True)
class MemoryPlan:
    """Memory each calibration / decomposition mode needs. Bytes via methods (dtype-dependent)."""

    model: str
    """Model class name."""
    family: str
    groups: tuple[str, ...]
    parameters: int
    weight_bytes: int
    weight_dtype: str
    modules: int
    """Target modules."""
    inputs: int
    """Unique input keys after shared-input dedupe (== len(set(store.inputs.values())))."""
    matrices: int
    """Covariance matrices stored all at once (== len(store.sums)): input keys x sources."""
    elements: int
    """Sum of d_in^2 over those matrices (dedupe)."""
    elements_per_module: int
    """The same with one matrix per module and source (no dedupe)."""
    sharing: str
    """How sharing was established (or why it was not)."""
    blocks: tuple[BlockMemory, ...]
    tokens: int
    images: int
    image_tokens: int
    """Tokens per image in the vision layers (0: no vision tower among the targets)."""
    cache_dtype: str
    notes: tuple[str, ...] = ()
    """Caveats printed under the table."""

    def covariance_bytes(self, dtype: torch.dtype = torch.float32, dedupe: bool = True) -> int:
        """All-at-once store size with sums accumulated in ``dtype``."""
        return (self.elements if dedupe else self.elements_per_module) * _size(dtype)

    def largest_block(self) -> BlockMemory:
        return max(self.blocks, key=lambda b: b.covariance_elements)

    def sequential_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """Covariances of the largest block (what layer-sequential calibration keeps at a time)."""
        return self.largest_block().covariance_elements * _size(dtype)

    def cache_bytes(self) -> int:
        return max(b.cache_bytes for b in self.blocks)

    def workspace_bytes(self, dtype: torch.dtype = torch.float64) -> int:
        """Decomposition workspace of the largest module with ``decompose_dtype = dtype``."""
        return max(b.workspace_elements for b in self.blocks) * _size(dtype)

    def peak_bytes(self, dtype: torch.dtype, sequential: bool, cache_on_device: bool = True) -> int:
        """Weights + covariances kept + cache + workspace (all in ``dtype``; sequential: the worst
        block). One calibration batch's activations and, sequentially, its masks come on top."""
        e = _size(dtype)
        if not sequential:
            return self.weight_bytes + self.elements * e + self.workspace_bytes(dtype)
        return self.weight_bytes + max(b.covariance_elements * e + b.workspace_elements * e
                                       + b.cache_bytes * cache_on_device for b in self.blocks)

    def format(self) -> str:
        """The table: one row per figure, GiB, columns = accumulation / decomposition dtype."""
        def both(bytes_of) -> tuple[int, int]:
            return bytes_of(torch.float32), bytes_of(torch.float64)

        block, work = self.largest_block(), max(self.blocks, key=lambda b: b.workspace_elements)
        rows = [
            (f"model weights ({self.weight_dtype})", self.weight_bytes, None),
            ("covariances, all at once, shared inputs deduped", *both(self.covariance_bytes)),
            ("covariances, all at once, no dedupe (one per module)", *both(lambda t: self.covariance_bytes(t, False))),
            (f"covariances, layer-sequential ({block.name})", *both(self.sequential_bytes)),
            (f"cached hidden states, one block's input ({self.cache_dtype})", self.cache_bytes(), None),
            (f"decomposition workspace ({work.workspace_module})", *both(self.workspace_bytes)),
            ("peak, all at once", *both(lambda t: self.peak_bytes(t, False))),
            ("peak, layer-sequential, cache on device", *both(lambda t: self.peak_bytes(t, True))),
            ("peak, layer-sequential, cache offloaded", *both(lambda t: self.peak_bytes(t, True, False))),
        ]
        width = max(len(r[0]) for r in rows) + 2
        size = f"{self.parameters / 1e9:.2f} B" if self.parameters >= 1e8 else f"{self.parameters:,}"
        pictures = f", {self.images:,} images x {self.image_tokens} tokens" if self.image_tokens else ""
        lines = [
            f"{self.model} (family {self.family}, groups {', '.join(self.groups)}): {size} parameters, "
            f"{self.modules} target modules in {len(self.blocks)} blocks",
            f"shared inputs: {self.sharing}",
            f"{self.modules} modules read {self.inputs} inputs -> {self.matrices} covariance matrices; "
            f"calibration: {self.tokens:,} tokens{pictures}",
            "",
            f"{'GiB':<{width}}{'float32':>9}{'float64':>9}",
        ]
        for label, a, b in rows:
            lines.append(f"{label:<{width}}{a / GIB:>9.2f}" + (f"{b / GIB:>9.2f}" if b is not None else ""))
        return "\n".join(lines + [f"note: {note}" for note in self.notes])

    __str__ = format


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _workspace(d_in: int, d_out: int) -> int:
    """Peak elements (decompose dtype) while one module is decomposed with svd='full'.

    Damping: C in the decompose dtype, its damped copy and the Cholesky factor (3 d^2). SVD:
    C' and its factor (2 d^2), W cast and W C' (2 o d), U and V^T (k (o + d)), LAPACK's copy of
    its input and gesdd work space (o d + 4 k^2, approximate). An estimate: on CPU (float64,
    2048x1024 and 1024x2048 weights) the measured peak was close to it (docs/scale-out.md);
    svd='auto' needs less, GPU solvers have their own work spaces.
    """
    d, o = d_in, d_out
    k = min(d, o)
    return max(3 * d * d, 2 * d * d + 3 * o * d + k * (o + d) + 4 * k * k)


def _load_config(source):
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, (str, os.PathLike)):
        if not os.path.exists(source):
            raise CordaError(f"plan_memory: {source!r} is not a config.json or model folder on disk.")
        return AutoConfig.from_pretrained(source)
    if isinstance(source, (PretrainedConfig, nn.Module)):
        return source
    raise CordaError(f"plan_memory takes a transformers config, a path to a config.json / model folder, or an "
                     f"nn.Module; got {type(source).__name__}.")


def _meta_model(config) -> nn.Module:
    """The model a config describes, built on the meta device (no memory for weights)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel):
        try:
            with torch.device("meta"):
                return auto.from_config(config)
        except (ValueError, KeyError):  # "Unrecognized configuration class" for this auto class
            continue
    raise CordaError(f"plan_memory cannot build a model from {type(config).__name__}: no transformers auto "
                     f"class knows it. Build the model yourself under `with torch.device('meta'):` and pass it.")


def _shrunk(config):
    """Same architecture and module names, widths 32 (4 heads of 8), layer counts and sizes of
    images/vocabularies kept (so token ids and image-token counts stay valid)."""
    tiny = copy.deepcopy(config)
    for sub in [tiny, *(getattr(tiny, name, None) for name in getattr(tiny, "sub_configs", {}) or {})]:
        if sub is None:
            continue
        heads = getattr(sub, "num_attention_heads", None)
        if heads:
            kv = getattr(sub, "num_key_value_heads", None) or heads
            sub.num_attention_heads = 4
            if getattr(sub, "num_key_value_heads", None):
                sub.num_key_value_heads = 4 if kv == heads else (1 if kv == 1 else 2)
        for key, value in (("hidden_size", 32), ("intermediate_size", 48), ("projection_dim", 16), ("head_dim", 8)):
            if getattr(sub, key, None) is not None:
                setattr(sub, key, value)
    return tiny


def _probe_sharing(model, family, names, groups, target_modules, exclude_modules):
    """(module -> input key, input key -> sources, how) from calibrating a shrunk copy."""
    config = getattr(model, "config", None)
    if config is None:
        raise CordaError("the model has no transformers config to shrink")
    if family.probe_batch is None:  # before building the shrunk copy, which would be wasted
        raise CordaError(f"the {family.name} family gives no probe batch")
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        tiny = type(model)(_shrunk(config)).float().eval()
        store = collect_covariances(tiny, [family.probe_batch(tiny)], groups=groups, target_modules=target_modules,
                                    exclude_modules=exclude_modules, family=family, distributed=False,
                                    progress=False)
    tiny_names = [t.name for t in resolve_targets(tiny, family, groups, target_modules, exclude_modules)]
    if tiny_names != names:
        raise CordaError("the shrunk copy's target modules differ from the model's")
    sources: dict[str, list[str]] = {}
    for key, source in store.sums:
        sources.setdefault(key, []).append(source)
    unreached = [n for n in names if n not in store.inputs]
    how = f"detected by calibrating a shrunk copy (width 32, {len(names)} targets) on one probe batch"
    if unreached:
        how += f"; {len(unreached)} modules never reached (e.g. {unreached[0]}), planned as one matrix each"
    return {n: store.inputs.get(n, n) for n in names}, {**{n: ["?"] for n in unreached}, **sources}, how


def _block_memory(model: nn.Module, resolved: list[Target], inputs: dict[str, str], sources: dict[str, list[str]],
                  tokens: int, image_rows: int, cache_size: int, image_groups: tuple[str, ...]) -> tuple[BlockMemory, ...]:
    """Covariances (by input key), cache and workspace of every block, in model order."""
    by_name = {t.name: t for t in resolved}
    block_of = blocks_of(model, list(by_name))
    cov: dict[str, int] = {}
    for key in dict.fromkeys(inputs.values()):
        cov[block_of[key]] = cov.get(block_of[key], 0) + by_name[key].d_in ** 2 * len(sources[key])
    out = []
    for block in dict.fromkeys(block_of.values()):
        members = [t for t in resolved if block_of[t.name] == block]
        worst = max(members, key=lambda t: _workspace(t.d_in, t.d_out))
        d_out, d_in = linear_weight(next(m for m in model.get_submodule(block).modules() if is_adaptable(m))).shape
        width = max(d_in, d_out) if block in by_name else d_in
        rows = image_rows if members[0].group in image_groups else tokens
        out.append(BlockMemory(block, cov.get(block, 0), rows * width * cache_size,
                               _workspace(worst.d_in, worst.d_out), worst.name))
    return tuple(out)


@renamed_arguments(targets="target_modules", exclude="exclude_modules")
def plan_memory(
    model_or_config,
    *,
    groups: list[str] | None = None,
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
    tokens: int = 256 * 2048,
    images: int = 256,
    weight_dtype: torch.dtype | None = None,
    cache_dtype: torch.dtype | None = None,
) -> MemoryPlan:
    """Plan the memory of calibration + decomposition for a model, without its weights.

    Args:
        model_or_config: a transformers config (LlamaConfig, LlavaConfig, CLIPConfig...), a path to
            a config.json or model folder, or a model (on any device, meta included).
        groups, target_modules, exclude_modules: which modules, as in ``CordaConfig``.
        tokens: calibration tokens through the language / text layers (LLaVA: image tokens included).
        images: calibration images through the vision tower (the family's ``image_groups``), each counting
            (image_size / patch_size)^2 + 1 tokens.
        weight_dtype: dtype of the weights (default: the model's own; for a config, the dtype it
            declares, else bfloat16).
        cache_dtype: dtype of the cached hidden states in layer-sequential mode (default: weight_dtype).
    """
    source = _load_config(model_or_config)
    is_model = isinstance(source, nn.Module)
    model = source if is_model else _meta_model(source)
    family = detect_family(model)
    resolved = resolve_targets(model, family, groups, target_modules, exclude_modules)
    names = [t.name for t in resolved]
    by_name = {t.name: t for t in resolved}
    try:
        inputs, sources, sharing = _probe_sharing(model, family, names, groups, target_modules, exclude_modules)
    except Exception as exc:  # any failure: plan conservatively, and say why
        inputs, sources = {n: n for n in names}, {n: ["?"] for n in names}
        sharing = f"NOT detected ({type(exc).__name__}: {exc}); planned without dedupe, one source per module"
    if weight_dtype is None and not is_model:
        declared = getattr(source, "dtype", None)
        declared = str(declared or "bfloat16").removeprefix("torch.")
        weight_dtype = getattr(torch, declared)
    params = list(model.parameters())
    weight_bytes = sum(p.numel() * (_size(weight_dtype) if weight_dtype else p.element_size()) for p in params)
    weight_dtype = weight_dtype or params[0].dtype
    cache_dtype = cache_dtype or weight_dtype
    fed = {t.group for t in resolved} & set(family.image_groups)
    per_image = image_tokens(getattr(model, "config", None)) if fed else 0
    blocks = _block_memory(model, resolved, inputs, sources, tokens, images * per_image, _size(cache_dtype),
                           family.image_groups)
    stacks = {b.name.rsplit(".", 1)[0] for b in blocks if b.name not in by_name}
    alone = [b.name for b in blocks if b.name in by_name]
    notes = () if len(stacks) <= 1 and not alone else (
        f"the targets lie in {len(stacks)} stacks of layers{f' and {len(alone)} modules outside them' * bool(alone)}; "
        f"build_corda_sequential takes one stack at a time (narrow `groups`, e.g. LLaVA groups=['language']); "
        f"the sequential rows assume each part is run in turn.",)
    return MemoryPlan(
        model=type(model).__name__, family=family.name, groups=tuple(dict.fromkeys(t.group for t in resolved)),
        parameters=sum(p.numel() for p in params), weight_bytes=weight_bytes,
        weight_dtype=str(weight_dtype).removeprefix("torch."), modules=len(names),
        inputs=len(set(inputs.values())), matrices=sum(len(sources[k]) for k in set(inputs.values())),
        elements=sum(b.covariance_elements for b in blocks),
        elements_per_module=sum(by_name[n].d_in ** 2 * len(sources[inputs[n]]) for n in names),
        sharing=sharing, blocks=blocks, tokens=tokens, images=images, image_tokens=per_image,
        cache_dtype=str(cache_dtype).removeprefix("torch."), notes=notes,
    )
