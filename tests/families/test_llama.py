"""The LLaMA-style family over the decoder-only models people adapt (tiny configs, no downloads):
each one is detected by structure, adapted exact at init with CorDA and CorDA++ (non-uniform
ranks) and reloaded by stock PEFT with equal logits; Phi-3's fused projections are adapted whole."""

import pytest
import torch
import transformers
from conftest import logits, text_batches
from peft import PeftModel

from corda_vl import CordaConfig, build_corda, collect_covariances, save_corda
from corda_vl.families import detect_family

TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODERS = {  # name: (config class, model class, extra config)
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj
}


def decoder(name: str, seed: int = 0):
    config_cls, model_cls, extra = DECODERS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TEXT, **extra)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_each_decoder_is_adapted_exact_at_init_and_reloads_in_stock_peft(name, tmp_path):
    model, batches = decoder(name), text_batches()
    assert detect_family(model).name == "llama"
    reference = logits(model, batches[0])
    store = collect_covariances(model, batches, progress=False)
    built = build_corda(model, store, CordaConfig(method="corda++", r=4), progress=False)
    ranks = {m.r["default"] for m in built.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "r", {})}
    assert len(ranks) > 1  # CorDA++ allocated ranks unevenly: the rank pattern is exercised
    assert torch.allclose(logits(built, batches[0]), reference, atol=1e-4)
    out = save_corda(built, tmp_path / name)
    stock = PeftModel.from_pretrained(getattr(transformers, DECODERS[name][1]).from_pretrained(out / "residual"),
                                      out / "adapter")
    assert torch.allclose(logits(stock, batches[0]), reference, atol=1e-4)


def test_phi3_fused_projections_are_adapted_whole():
    model = decoder("phi3")
    store = collect_covariances(model, text_batches(), progress=False)
    built = build_corda(model, store, CordaConfig(r=2), progress=False)
    adapted = sorted({n.split(".")[-1] for n, m in built.named_modules() if hasattr(m, "lora_A")})
    assert adapted == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
