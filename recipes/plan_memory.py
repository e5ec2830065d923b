"""How much memory calibration and decomposition need, from configs alone (no weights, offline).

    python recipes/plan_memory.py                          # LLaMA-2-7B, LLaVA-1.5-7B, CLIP ViT-L/14
    python recipes/plan_memory.py --config path/to/config.json --tokens 131072
    python recipes/plan_memory.py --config llava/ --groups vision,projector,language   # as CordaConfig.groups

The three built-in configs are written here from their published sizes (nothing downloaded):
LLaMA-2-7B (hidden 4096, MLP 11008, 32 layers, 32 heads, vocabulary 32000); LLaVA-1.5-7B (that
language model with vocabulary 32064, a CLIP ViT-L/14-336 vision tower: hidden 1024, MLP 4096,
24 layers, 16 heads, 336 px, patch 14, and a 1024 -> 4096 -> 4096 MLP projector); CLIP ViT-L/14
(that vision tower at 224 px; text hidden 768, MLP 3072, 12 layers, 12 heads; projection 768).

Calibration size (defaults): the LLMs 256 sequences x 2048 tokens = 524,288 tokens (LLaVA: image
tokens included) and 256 images; CLIP 256 images and 256 captions x 77 tokens. Weights and
hidden-state cache in bfloat16 unless the config declares a dtype. LLaVA is planned with its
vision, projector and language groups.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from transformers import CLIPConfig, CLIPVisionConfig, LlamaConfig, LlavaConfig

from corda_vl.scaleout.memory import plan_memory

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--config", help="a local config.json or model folder to plan instead of the built-in three")
parser.add_argument("--tokens", type=int, help="calibration tokens through the text / language layers")
parser.add_argument("--images", type=int, default=256, help="calibration images through a vision tower")
parser.add_argument("--groups", help="comma-separated groups (default: the family's; LLaVA: vision,projector,language)")
parser.add_argument("--dtype", help="weight dtype (default: the config's, else bfloat16)")
parser.add_argument("--cache-dtype", help="dtype of the cached hidden states, layer-sequential (default: --dtype)")
args = parser.parse_args()


def llama_2_7b(vocab: int = 32000) -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=vocab, max_position_embeddings=4096)


vit_l14 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, patch_size=14)
llava_15_7b = LlavaConfig(vision_config=CLIPVisionConfig(**vit_l14, image_size=336, projection_dim=768),
                          text_config=llama_2_7b(vocab=32064), image_token_index=32000, vision_feature_layer=-2,
                          vision_feature_select_strategy="default", projector_hidden_act="gelu")
clip_vit_l14 = CLIPConfig(
    vision_config=dict(**vit_l14, image_size=224),
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    projection_dim=768)

groups = args.groups.split(",") if args.groups else None
if args.config:
    jobs = [(args.config, args.config, groups, args.tokens or 256 * 2048)]
else:
    jobs = [("LLaMA-2-7B", llama_2_7b(), groups, args.tokens or 256 * 2048),
            ("LLaVA-1.5-7B", llava_15_7b, groups or ["vision", "projector", "language"], args.tokens or 256 * 2048),
            ("CLIP ViT-L/14", clip_vit_l14, groups, args.tokens or 256 * 77)]

for title, config, job_groups, tokens in jobs:
    plan = plan_memory(config, groups=job_groups, tokens=tokens, images=args.images,
                       weight_dtype=args.dtype and getattr(torch, args.dtype),
                       cache_dtype=args.cache_dtype and getattr(torch, args.cache_dtype))
    print(f"== {title}")
    print(plan, end="\n\n")
print("float32 / float64: the dtype of the covariance sums and of the decomposition. Peak: weights + covariances\n"
      "kept + the largest module's decomposition workspace (+ the block's cache); one batch's activations on top.")
