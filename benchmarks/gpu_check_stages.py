"""The stages of benchmarks/gpu_check.py: models from configs, their batches, and what each stage
measures. Every function takes the sizes as parameters, so ``--tiny`` runs this very code on CPU.

Figures that only a CUDA device gives (``torch.cuda.max_memory_allocated``, the fraction of the
bf16 peak) read ``NO_CUDA`` elsewhere.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sequential_memory import compare  # noqa: E402
from vs_peft import PROJECTIONS, run_floor, run_ours, run_peft, unique_input_dims  # noqa: E402

NO_CUDA = "skipped: no CUDA"
GIB = 2**30
PEAK_BF16_TFLOPS = 790.0
"""Dense bf16 matrix products on one H100 / H200 SXM as measured on this project's machines
(8192^3 products); the XᵀX sums are rated against it (the script also measures its own card)."""


@dataclass(frozen=True)
class Sizes:
    """Every size the stages use. The defaults are the GPU run: LLaMA-7B-shaped layers (hidden
    4096, MLP 11008, 32 heads), ``layers`` of the real model's ``full_layers`` built (per-layer
    costs are the same at any depth, so the figures scale by full_layers / layers), and a
    LLaVA-1.5-7B-shaped model (CLIP ViT-L/14-336 vision layers + those LLaMA layers)."""

    vocab: int = 32000
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    kv_heads: int = 32
    layers: int = 2
    full_layers: int = 32
    seqs: int = 64
    seq_len: int = 2048
    batch_size: int = 4
    rank: int = 64
    modes: tuple[str, ...] = ("kpm", "ipm")
    dtype: str = "bfloat16"
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_heads: int = 16
    vision_layers: int = 6
    vision_full_layers: int = 24
    image_size: int = 336
    patch_size: int = 14
    projection_dim: int = 768
    llava_layers: int = 2
    images: int = 20
    llava_seq_len: int = 2048  # 20 x 2048: more image (11,520) and text tokens than the widest input (11,008)
    train_steps: int = 3


TINY = Sizes(vocab=96, hidden=64, intermediate=96, heads=4, kv_heads=2, layers=2, full_layers=2, seqs=8, seq_len=32,
             batch_size=4, rank=4, dtype="float32", vision_hidden=32, vision_intermediate=48, vision_heads=4,
             vision_layers=2, vision_full_layers=2, image_size=16, patch_size=4, projection_dim=24, llava_layers=2,
             images=4, llava_seq_len=32, train_steps=3)
"""CPU-sized: the same stages in seconds. The exactness stage always uses these sizes."""


# ---------------------------------------------------------------------------------------------
# Devices, clocks, memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """perf_counter after the device's queued work: CUDA kernels run asynchronously."""
    sync(device)
    return time.perf_counter()


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Meter:
    """GPU memory of one job: the peak and what it added to what was allocated at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            sync(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    def read(self) -> dict:
        if self.device.type != "cuda":
            return {"peak_gib": NO_CUDA, "added_gib": NO_CUDA}
        sync(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        return {"peak_gib": peak / GIB, "added_gib": (peak - self.base) / GIB, "base_gib": self.base / GIB}


def build(model_class, config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A model with seeded random weights, created on ``device`` in ``dtype`` (no fp32 CPU copy
    first: a 7B model would take minutes to initialise there). Same seed, same weights."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------
# Configs and batches


def llama_config(s: Sizes, layers: int | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                       num_hidden_layers=layers or s.layers, num_attention_heads=s.heads,
                       num_key_value_heads=s.kv_heads, max_position_embeddings=max(2048, s.seq_len, s.llava_seq_len),
                       pad_token_id=0)


def vision_config(s: Sizes):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=s.vision_hidden, intermediate_size=s.vision_intermediate,
                            num_hidden_layers=s.vision_layers, num_attention_heads=s.vision_heads,
                            image_size=s.image_size, patch_size=s.patch_size, projection_dim=s.projection_dim)


def llava_config(s: Sizes):
    from transformers import LlavaConfig

    # LLaVA-1.5: features of the second-to-last vision layer, class token dropped
    return LlavaConfig(vision_config=vision_config(s), text_config=llama_config(s, s.llava_layers),
                       image_token_index=s.vocab - 1, vision_feature_layer=-2,
                       vision_feature_select_strategy="default")


def clip_config(s: Sizes):
    from transformers import CLIPConfig

    text = dict(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return CLIPConfig(text_config=text, vision_config=vision_config(s).to_dict(), projection_dim=s.projection_dim)


def token_batches(s: Sizes, device: torch.device, seed: int = 0) -> list[dict]:
    """``seqs`` random sequences of ``seq_len`` ids in batches of ``batch_size``, on ``device``
    once (no copy inside the timed loops)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, s.vocab, (s.seqs, s.seq_len), generator=g).to(device)
    return [{"input_ids": ids[i:i + s.batch_size]} for i in range(0, s.seqs, s.batch_size)]


def image_tokens(s: Sizes) -> int:
    return (s.image_size // s.patch_size) ** 2


def llava_batches(s: Sizes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """One image per row, announced by its image tokens after the first token; random text around."""
    g = torch.Generator().manual_seed(seed)
    image_token, n = s.vocab - 1, image_tokens(s)
    ids = torch.randint(1, image_token, (s.images, s.llava_seq_len), generator=g)
    ids[:, 1:1 + n] = image_token
    pixels = torch.randn(s.images, 3, s.image_size, s.image_size, generator=g)
    ids, pixels = ids.to(device), pixels.to(device, dtype)
    return [{"input_ids": ids[i:i + s.batch_size], "attention_mask": torch.ones_like(ids[i:i + s.batch_size]),
             "pixel_values": pixels[i:i + s.batch_size]} for i in range(0, s.images, s.batch_size)]


def clip_batches(s: Sizes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[dict]:
    """Image batches and text batches, alternating (the two towers see different data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max(1, s.seqs // s.batch_size)):
        out.append({"pixel_values": torch.randn(s.batch_size, 3, s.image_size, s.image_size, generator=g).to(device, dtype)})
        ids = torch.randint(3, s.vocab, (s.batch_size, 16), generator=g)
        ids[:, 0] = 1
        out.append({"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)})
    return out


# ---------------------------------------------------------------------------------------------
# Exactness on the device: LLaMA, CLIP, LLaVA in fp32 and bf16; save -> load; training steps


def _tiny_model(kind: str, device: torch.device, dtype: torch.dtype):
    """(model, calibration batches, probe inputs, CordaConfig groups) of one tiny family."""
    from transformers import CLIPModel, LlamaForCausalLM, LlavaForConditionalGeneration

    s = TINY
    if kind == "llama":
        batches = token_batches(s, device)
        return build(LlamaForCausalLM, llama_config(s), device, dtype), batches, batches[0], None
    if kind == "clip":
        batches = clip_batches(s, device, dtype)
        return build(CLIPModel, clip_config(s), device, dtype), batches, {**batches[0], **batches[1]}, None
    batches = llava_batches(s, device, dtype)
    model = build(LlavaForConditionalGeneration, llava_config(s), device, dtype)
    return model, batches, batches[0], ["vision", "projector", "language"]


def _logits(model, probe: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**probe)
    return out.logits_per_image if hasattr(out, "logits_per_image") else out.logits


def exact_one(kind: str, device: torch.device, dtype: torch.dtype, tmp: Path) -> dict:
    """max |logits after build - before| of CorDA (KPM) on one tiny model, and of save -> load."""
    from corda_vl import CordaConfig, build_corda, collect_covariances, load_corda, save_corda

    model, batches, probe, groups = _tiny_model(kind, device, dtype)
    before = _logits(model, probe)
    store = collect_covariances(model, batches, groups=groups, progress=False)
    built = build_corda(model, store, CordaConfig(r=TINY.rank, groups=groups), progress=False)
    after = _logits(built, probe)
    save_corda(built, tmp / f"{kind}-{dtype}")
    loaded = load_corda(tmp / f"{kind}-{dtype}", dtype=dtype, device=device)
    reloaded = _logits(loaded, probe)
    scale = float(before.float().abs().max())
    return {"max_abs_dlogits": max_diff(after, before), "rel_dlogits": max_diff(after, before) / scale,
            "roundtrip_max_abs_dlogits": max_diff(reloaded, after), "store_device": str(next(iter(store.sums.values())).device),
            "residual_dtype": str(next(built.parameters()).dtype).removeprefix("torch.")}


def train_steps(device: torch.device, tmp: Path) -> dict:
    """A few AdamW steps of a CorDA adapter on the tiny LLaMA with mixed_precision='auto'
    (bf16 autocast where CUDA supports it), through the lab's own loop."""
    from transformers import LlamaForCausalLM

    from corda_vl import CordaConfig, build_corda, collect_covariances
    from corda_vl.lab.training import TrainConfig, train

    s = TINY
    model = build(LlamaForCausalLM, llama_config(s), device, torch.float32)
    batches = token_batches(s, device)
    peft_model = build_corda(model, collect_covariances(model, batches, progress=False), CordaConfig(r=s.rank),
                             progress=False)
    rows = list(torch.cat([b["input_ids"] for b in batches]))
    lora_b = next(p for n, p in peft_model.named_parameters() if "lora_B" in n)
    start = lora_b.detach().clone()

    def loss_fn(m, chunk):
        ids = torch.stack(chunk)
        return m(input_ids=ids, labels=ids).loss

    config = TrainConfig(steps=s.train_steps, batch_size=s.batch_size, warmup_steps=1, checkpoint_every=0,
                         mixed_precision="auto")
    result = train(peft_model, rows, loss_fn, config, tmp / "train", progress=False)
    return {"precision": config.resolved_precision(), "losses": result.losses, "seconds": result.seconds,
            "finite": all(torch.isfinite(torch.tensor(result.losses)).tolist()),
            "adapter_moved": max_diff(lora_b.detach(), start)}


def stage_exactness(ctx) -> dict:
    out: dict = {"device": str(ctx.device), "cuda": "yes" if ctx.device.type == "cuda" else NO_CUDA}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("llama", "clip", "llava"):
            for dtype in (torch.float32, torch.bfloat16):
                name = f"{kind}_{str(dtype).removeprefix('torch.')}"
                out[name] = ctx.guard(lambda: exact_one(kind, ctx.device, dtype, Path(tmp)))
                free(ctx.device)
        out["train"] = ctx.guard(lambda: train_steps(ctx.device, Path(tmp)))
    return out


# ---------------------------------------------------------------------------------------------
# 7B-shaped timing: ours vs PEFT vs the floor, and the XᵀX throughput


def gram_flops(model, tokens: int) -> float:
    """Flops of one full XᵀX GEMM per unique input of every decoder layer over ``tokens`` rows."""
    return float(sum(2 * tokens * d * d for layer in model.model.layers for d in unique_input_dims(layer)))


def llama_side(ctx, side: str, mode: str, batches: list[dict]) -> dict:
    """One side on a fresh LLaMA-7B-shaped model: seconds, GPU memory, max |Δlogits| at init."""
    from transformers import LlamaForCausalLM

    s, device = ctx.sizes, ctx.device
    model = build(LlamaForCausalLM, llama_config(s), device, getattr(torch, s.dtype))
    probe = batches[0]["input_ids"][:2, :64]
    reference = _logits(model, {"input_ids": probe})
    meter = Meter(device)
    args = SimpleNamespace(rank=s.rank)
    start = clock(device)
    out: dict = {}
    if side == "floor":
        out["parts"] = run_floor(args, mode, model, batches)
        out["flops_xtx"] = gram_flops(model, s.seqs * s.seq_len)
    else:
        run = run_ours if side == "ours" else run_peft
        peft_model, calib_done = run(args, mode, model, batches)
        if calib_done is not None:
            out["parts"] = {"calibration": calib_done - start, "build": clock(device) - calib_done}
    out["seconds"] = clock(device) - start
    out["seconds_at_full_depth_est"] = out["seconds"] * s.full_layers / s.layers  # every layer costs the same
    out.update(meter.read())
    if side != "floor":
        out["max_abs_dlogits"] = max_diff(_logits(peft_model, {"input_ids": probe}), reference)
    return out


def xtx_throughput(ctx) -> dict:
    """TFLOP/s of one decoder layer's XᵀX sums over the calibration tokens, in calibration's
    batches: as ``GramSum`` does them (float32 sums, the library's path) and as plain GEMMs in the
    model dtype (what the card can do). Flops counted as full GEMMs (2 n d^2)."""
    from corda_vl.calibration.gram import GramSum

    s, device = ctx.sizes, ctx.device
    dtype = getattr(torch, s.dtype)
    rows, chunks = s.batch_size * s.seq_len, -(-s.seqs // s.batch_size)
    dims = [s.hidden, s.hidden, s.hidden, s.intermediate]  # q/k/v, o, gate/up, down (7B: o reads 32 x 128)
    x = {d: torch.randn(rows, d, device=device, dtype=dtype) for d in set(dims)}
    flops = 2.0 * rows * chunks * sum(d * d for d in dims)

    def gramsum():
        for d in dims:
            g = GramSum(d, torch.float32, device)
            for _ in range(chunks):
                g.add(x[d])
            g.result()

    def gemm():
        for d in dims:
            for _ in range(chunks):
                x[d].T @ x[d]

    out = {"rows_per_batch": rows, "batches": chunks, "dims": dims, "tflop": flops / 1e12}
    for name, fn in (("gramsum_fp32", gramsum), (f"gemm_{s.dtype}", gemm)):
        fn()  # warm-up: cuBLAS picks its kernels on the first call
        start = clock(device)
        fn()
        out[f"{name}_tflops"] = flops / (clock(device) - start) / 1e12
        out[f"{name}_fraction_of_peak"] = (out[f"{name}_tflops"] / PEAK_BF16_TFLOPS if device.type == "cuda"
                                           else NO_CUDA)
    out["peak_bf16_tflops_nominal"] = PEAK_BF16_TFLOPS
    out["matmul_tflops_measured"] = matmul_tflops(device, dtype)
    return out


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """This card's own large square product rate (8192^3 on a GPU, 256^3 on CPU)."""
    n = 8192 if device.type == "cuda" else 256
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    start = clock(device)
    for _ in range(10):
        a @ b
    return 10 * 2 * n**3 / (clock(device) - start) / 1e12


def _ratios(sides: dict) -> dict:
    """The acceptance figures of one mode, where both sides of a ratio ran."""
    ours, peft, floor = (sides.get(k) if isinstance(sides.get(k), dict) else {} for k in ("ours", "peft", "floor"))
    out = {}
    if "seconds" in ours and "seconds" in peft:
        out["speedup_vs_peft"] = peft["seconds"] / ours["seconds"]
    if "seconds" in ours and "seconds" in floor:
        out["ours_over_floor"] = ours["seconds"] / floor["seconds"]
    if isinstance(ours.get("added_gib"), float) and isinstance(peft.get("added_gib"), float):
        out["added_memory_vs_peft"] = ours["added_gib"] / max(peft["added_gib"], 1e-9)
    calibration, forward = ours.get("parts", {}).get("calibration"), floor.get("parts", {}).get("forward")
    if calibration and forward and calibration > forward:
        # the hooks' share of calibration: calibration minus a plain forward over the same batches
        out["calibration_xtx_tflops_est"] = floor["flops_xtx"] / (calibration - forward) / 1e12
    return out


def stage_timing(ctx) -> dict:
    s = ctx.sizes
    batches = token_batches(s, ctx.device)
    out: dict = {"model": f"LLaMA-7B-shaped ({s.hidden}/{s.intermediate}, {s.heads} heads), {s.layers} of "
                          f"{s.full_layers} layers, {s.dtype}, random weights",
                 "tokens": f"{s.seqs} x {s.seq_len}", "rank": s.rank, "our_batch_size": s.batch_size,
                 "peft_batch_size": 1, "depth_scale": s.full_layers / s.layers}
    out["xtx"] = ctx.guard(lambda: xtx_throughput(ctx))
    free(ctx.device)
    for mode in s.modes:
        sides: dict = {}
        for side in ("floor", "ours", "peft"):
            sides[side] = ctx.guard(lambda: llama_side(ctx, side, mode, batches), needs_budget=True)
            free(ctx.device)
        sides["ratios"] = _ratios(sides)
        out[mode] = sides
    return out


# ---------------------------------------------------------------------------------------------
# Layer-sequential vs all at once, against plan_memory


def _predicted(plan) -> dict:
    """plan_memory's peaks (weights included) in GiB: the float32 and float64 columns, and the
    mix the default build uses (float32 sums, float64 decomposition workspace)."""
    f32, f64 = torch.float32, torch.float64
    mixed_seq = plan.weight_bytes + max(b.covariance_elements * 4 + b.workspace_elements * 8 + b.cache_bytes
                                        for b in plan.blocks)
    return {"all_fp32": plan.peak_bytes(f32, False) / GIB, "all_fp64": plan.peak_bytes(f64, False) / GIB,
            "all_mixed": (plan.weight_bytes + plan.covariance_bytes(f32) + plan.workspace_bytes(f64)) / GIB,
            "sequential_fp32": plan.peak_bytes(f32, True) / GIB, "sequential_fp64": plan.peak_bytes(f64, True) / GIB,
            "sequential_mixed": mixed_seq / GIB, "covariances_all_gib": plan.covariance_bytes(f32) / GIB,
            "covariances_one_block_gib": plan.sequential_bytes(f32) / GIB, "cache_gib": plan.cache_bytes() / GIB,
            "weights_gib": plan.weight_bytes / GIB}


def _path(ctx, path: str, batches: list[dict]) -> tuple[dict, dict]:
    from transformers import LlamaForCausalLM

    from corda_vl import CordaConfig, build_corda, build_corda_sequential, build_record, collect_covariances

    s, device = ctx.sizes, ctx.device
    meter = Meter(device)  # before the model: the peak includes the weights, as the plan's does
    model = build(LlamaForCausalLM, llama_config(s), device, getattr(torch, s.dtype))
    probe = batches[0]["input_ids"][:2, :64]
    reference = _logits(model, {"input_ids": probe})
    config = CordaConfig(r=s.rank, mode="kpm", target_modules=PROJECTIONS)
    start = clock(device)
    if path == "all":
        built = build_corda(model, collect_covariances(model, batches, progress=False), config, progress=False)
    else:
        built = build_corda_sequential(model, batches, config, progress=False)
    out = {"seconds": clock(device) - start, **meter.read(),
           "max_abs_dlogits": max_diff(_logits(built, {"input_ids": probe}), reference)}
    if path == "sequential":
        calibration = build_record(built).calibration
        out["covariance_peak_gib"] = calibration["peak_covariance_bytes"] / GIB
        out["cache_gib"] = calibration["cache_bytes"] / GIB
    adapters = {n: p.detach().float().cpu() for n, p in built.named_parameters() if "lora_" in n}
    return out, adapters


def stage_sequential(ctx) -> dict:
    from corda_vl import plan_memory

    s = ctx.sizes
    batches = token_batches(s, ctx.device)
    out: dict = {"mode": "kpm"}
    plan = plan_memory(llama_config(s), target_modules=PROJECTIONS, tokens=s.seqs * s.seq_len,
                       weight_dtype=getattr(torch, s.dtype))
    out["predicted"] = _predicted(plan)
    adapters = {}
    for path in ("all", "sequential"):
        result = ctx.guard(lambda: _path(ctx, path, batches), needs_budget=True)
        if isinstance(result, tuple):  # ran: (figures, adapter tensors)
            result, adapters[path] = result
        out[path] = result
        free(ctx.device)
    if len(adapters) == 2:
        out["sequential_vs_all"] = compare(adapters["all"], adapters["sequential"])
    for path in ("all", "sequential"):
        if isinstance(out[path].get("peak_gib"), float):
            out[path]["peak_over_predicted_mixed"] = out[path]["peak_gib"] / out["predicted"][f"{path}_mixed"]
    if isinstance(out["all"].get("seconds"), float) and isinstance(out["sequential"].get("seconds"), float):
        out["sequential_time_over_all"] = out["sequential"]["seconds"] / out["all"]["seconds"]
    return out


# ---------------------------------------------------------------------------------------------
# LLaVA-7B-shaped: image / text covariances and the CorDA++ allocation across groups


def stage_llava(ctx) -> dict:
    from transformers import LlavaForConditionalGeneration

    from corda_vl import CordaConfig, allocate_ranks, collect_covariances
    from corda_vl.families import detect_family

    s, device = ctx.sizes, ctx.device
    dtype = getattr(torch, s.dtype)
    groups = ["vision", "projector", "language"]
    model = build(LlavaForConditionalGeneration, llava_config(s), device, dtype)
    batches = llava_batches(s, device, dtype)
    meter = Meter(device)
    start = clock(device)
    store = collect_covariances(model, batches, groups=groups, progress=False)
    calibrated = clock(device)
    plan = allocate_ranks(model, store, CordaConfig(method="corda++", groups=groups, r=s.rank), progress=False)
    done = clock(device)
    chosen = Counter(f"{row.group}: {row.source}" for row in plan.rows)
    family, tokens = detect_family(model), {}
    for (key, source), n in store.counts.items():  # every input of a group sees the same tokens
        label = f"{family.group_of(key)}: {source}"
        tokens[label] = max(tokens.get(label, 0), n)
    return {"model": f"LLaVA-7B-shaped: CLIP ViT ({s.vision_hidden}, {s.vision_layers} of {s.vision_full_layers} "
                     f"layers, {s.image_size}px/{s.patch_size}) + LLaMA ({s.hidden}, {s.llava_layers} of "
                     f"{s.full_layers} layers), {s.dtype}, random weights",
            "images": s.images, "tokens_per_sequence": s.llava_seq_len, "image_tokens_per_image": image_tokens(s),
            "calibration_seconds": calibrated - start, "allocation_seconds": done - calibrated, **meter.read(),
            "covariance_gib": store.nbytes() / GIB, "sources": sorted({src for _, src in store.sums}),
            "tokens_by_group_and_source": tokens, "chosen_source_counts": dict(chosen),
            "group_totals": plan.group_totals(), "budget": plan.budget, "trainable": plan.trainable}
