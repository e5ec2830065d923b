"""Build a CorDA adapter for a LLaMA-style model, offline, and say what was done.

    python recipes/build_corda.py                         # SmolLM2-135M, KPM, r=16
    python recipes/build_corda.py --mode ipm --rank 32 --model /path/to/llama --output-dir out/x
    python recipes/build_corda.py --method corda++        # ranks allocated per layer, same budget

KPM calibrates on the knowledge to keep (here: questions about country capitals and the fact
paragraphs that answer them), so the adapter is built from the components that carry the least
of it. The script checks that the
model's outputs are unchanged at init and saves residual/ + adapter/ (stock PEFT) to disk.
"""

import argparse
import os
import time
from collections import defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from corda_vl import CordaConfig, build_corda, build_record, collect_covariances, save_corda
from corda_vl.lab.data import capital_questions, country_fact_texts, padded_batches
from corda_vl.lab.models import load_llama

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default="smollm2-135m-instruct", help="embedded alias, hub id or local folder")
parser.add_argument("--method", default="corda", choices=["corda", "corda++"])
parser.add_argument("--mode", default="kpm", choices=["kpm", "ipm"])
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--calib-samples", type=int, default=128, help="countries whose question + facts calibrate")
parser.add_argument("--output-dir", default="out/build_corda")
parser.add_argument("--overwrite", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
t0 = time.perf_counter()
model, tokenizer = load_llama(args.model)
print(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, "
      f"loaded in {time.perf_counter() - t0:.1f} s)")

n = args.calib_samples
texts = [q for q, _ in capital_questions()[:n]] + country_fact_texts()[:n]
batches = padded_batches(tokenizer, texts, batch_size=16)
t0 = time.perf_counter()
store = collect_covariances(model, batches)
calib_s = time.perf_counter() - t0
tokens = next(iter(store.counts.values()))
print(f"calibrated on {n} capital questions + {n} fact paragraphs ({tokens} tokens) in {calib_s:.1f} s: "
      f"{len(store.modules)} modules share {len(store.sums)} covariances ({store.nbytes() / 2**20:.0f} MiB)")

probe = padded_batches(tokenizer, ["The capital of Japan is", "Water boils at"], batch_size=2)[0]
with torch.no_grad():
    before = model(**probe).logits
t0 = time.perf_counter()
peft_model = build_corda(model, store, CordaConfig(method=args.method, r=args.rank, mode=args.mode))
build_s = time.perf_counter() - t0
with torch.no_grad():
    after = peft_model(**probe).logits
drift = (after - before)[probe["attention_mask"].bool()].abs().max().item()

by_type = defaultdict(list)
for name, info in build_record(peft_model).modules.items():
    by_type[name.rsplit(".", 1)[-1]].append(info)
label = "CorDA" if args.method == "corda" else "CorDA++"
print(f"\n{label}-{args.mode.upper()} r={args.rank}, built in {build_s:.1f} s")
print(f"{'module':<11}{'count':>6}{'shape':>11}{'rank':>9}{'damping used':>16}{'context share (median)':>24}")
for kind, infos in by_type.items():
    damp = sorted({i["damping"] for i in infos})
    shape = "x".join(map(str, infos[0]["shape"]))
    share = sorted(i["context_share"] for i in infos)[len(infos) // 2]
    ranks = sorted(i["rank"] for i in infos)
    rank = f"{ranks[0]}" if ranks[0] == ranks[-1] else f"{ranks[0]}-{ranks[-1]}"
    print(f"{kind:<11}{len(infos):>6}{shape:>11}{rank:>9}{', '.join(f'{d:g}' for d in damp):>16}"
          f"{share:>24.2e}")
trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
paths = sorted({i["svd"] for infos in by_type.values() for i in infos})
print(f"decomposition paths: {paths}; context share = ||W C' V_r|| / ||W C'||, the part of the "
      f"calibration context the adapter's components carry ({'small' if args.mode == 'kpm' else 'large'} is the point)")
print(f"trainable parameters: {trainable:,}; max |logits(init) - logits(original)| = {drift:.2e}")

budget = build_record(peft_model).budget
if budget:  # corda++: the ranks were allocated under the budget of uniform rank r
    print(f"budget {budget['budget']:,} parameters (uniform r={args.rank}), realised {budget['realised']:,}; "
          f"ranks per module and the covariance each chose are in corda_vl.json")
out = save_corda(peft_model, args.output_dir, tokenizer=tokenizer, overwrite=args.overwrite)
print(f"saved: {out}/residual (base, from_pretrained), {out}/adapter (stock PEFT), {out}/corda_vl.json")
