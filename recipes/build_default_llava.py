"""Build (once) the embedded default LLaVA and say what it is and how well it does.

    python recipes/build_default_llava.py            # builds the default CLIP first if it is not cached
    python recipes/build_default_llava.py --force    # rebuild

The default LLaVA is assembled here from real parts, offline: the default CLIP's ViT as vision
tower, SmolLM2-135M-Instruct as language model (frozen) and a two-layer MLP projector trained on
easy-VQA questions (LLaVA's stage 1). Recipe: assets/models/default_llava.json.
"""

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from corda_vl.lab.models.default_llava import BUILD_RECORD, DEFAULT_LLAVA, default_llava_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--name", default=DEFAULT_LLAVA, help="embedded alias (corda-vl-llava or corda-vl-llava-tiny)")
parser.add_argument("--force", action="store_true", help="rebuild even if cached")
args = parser.parse_args()

path = default_llava_dir(args.name, rebuild=args.force)
record = json.loads((path / BUILD_RECORD).read_text())
vqa, capitals = record["scores"]["vqa"], record["scores"]["capitals"]
print(f"\n{record['name']}: {record['parameters']['total'] / 1e6:.1f} M parameters, "
      f"{record['parameters']['projector'] / 1e3:.0f} k of them trained (the projector), in {path}")
print(f"vision tower: {record['clip']}; language model: {record['language_model']} (frozen)")
print(f"built in {record['seconds']['total']:.0f} s (projector training {record['seconds']['train']:.0f} s, "
      f"loss {record['loss']['first']:.2f} -> {record['loss']['last']:.2f})")
print(f"easy-VQA held-out accuracy: {vqa['accuracy']:.1%} on {vqa['n']} questions "
      f"(always answering the commonest answer: {vqa['commonest_answer_accuracy']:.1%})")
print(f"capital questions through its language model (3-shot exact match; SmolLM2's own answers, the LM is frozen): {capitals['exact_match']:.1%} "
      f"on {capitals['n']}")
