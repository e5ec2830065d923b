"""Build the offline default CLIP ("corda-vl-clip") into the user cache and say what was built.

    python recipes/build_default_clip.py            # build once (later runs only report the cached one)
    python recipes/build_default_clip.py --force    # rebuild from assets/models/default_clip.json

No CLIP weights exist offline, so the default is trained here: a small transformers CLIPModel
(ViT 4x128, patch 8 on 32x32 images; text 3x128 over OpenAI CLIP's BPE vocabulary), trained
contrastively on the train splits of scikit-learn digits and easy-VQA with captions made from
their labels, then scored zero-shot on the held-out test splits. Every recipe that is given no
CLIP loads this one; the default LLaVA reuses its vision tower.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from corda_vl.lab.models.default_clip import ALIASES, BUILD_RECORD, default_clip_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--name", default="corda-vl-clip", choices=sorted(ALIASES), help="which embedded CLIP")
parser.add_argument("--force", action="store_true", help="rebuild even if the cache holds it")
args = parser.parse_args()

started = time.time()
target = default_clip_dir(args.name, rebuild=args.force)
record = json.loads((target / BUILD_RECORD).read_text())
fresh = (target / BUILD_RECORD).stat().st_mtime >= started

model, train = record["recipe"]["model"], record["recipe"]["train"]
vision, text = model["vision_config"], model["text_config"]
params = record["parameters"]
print(f"\n{record['name']} in {target} ({'built now' if fresh else 'cached'})")
print(f"vision: ViT {vision['num_hidden_layers']}x{vision['hidden_size']}, patch {vision['patch_size']} on "
      f"{vision['image_size']}x{vision['image_size']} ({params['vision'] / 1e6:.2f} M params); text: "
      f"{text['num_hidden_layers']}x{text['hidden_size']}, {text['max_position_embeddings']} tokens, BPE vocabulary "
      f"{text['vocab_size']} ({params['text'] / 1e6:.2f} M params); total {params['total'] / 1e6:.2f} M")
print(f"trained {train['steps']} steps x {train['batch_size']} on {record['data']['train']} train images "
      f"(loss {record['loss']['first']:.2f} -> {record['loss']['last']:.2f})")
seconds = record["seconds"]
print(f"build: {seconds['total']:.0f} s (data {seconds['data']:.0f} s, training {seconds['train']:.0f} s, "
      f"evaluation {seconds['eval']:.0f} s) with {record['environment']['threads']} threads")
print(f"\n{'zero-shot (test split)':<24}{'images':>8}{'acc1':>9}{'chance':>9}{'per-class recall':>18}")
for name, score in record["scores"].items():
    print(f"{name:<24}{score['n']:>8}{score['acc1']:>9.1%}{score['chance']:>9.1%}"
          f"{score['mean_per_class_recall']:>18.1%}")
