"""GPT-2: transformers Conv1D layers (weights stored transposed) through PEFT's own Conv1D LoRA
(fan_in_fan_out): covariances, exact at init for KPM / IPM / CorDA++, stock-PEFT reload, and a
clear error for a Conv1D + Linear mix."""

import pytest
import torch
from conftest import logits, module_inputs, text_batches, tiny_gpt2
from peft import PeftModel
from transformers import GPT2LMHeadModel

from corda_vl import CordaConfig, TargetError, build_corda, collect_covariances, plan, save_corda
from corda_vl.families import detect_family


def test_gpt2_is_detected_and_its_covariances_are_the_layer_inputs():
    model, batches = tiny_gpt2(), text_batches()
    assert detect_family(model).name == "gpt2"
    store = collect_covariances(model, batches, progress=False)
    assert len(store.modules) == 8 and "lm_head" not in store.modules
    name = "transformer.h.1.mlp.c_proj"  # 128 in, 32 out: a covariance of the 128-wide input
    seen = module_inputs(model, name, lambda m, b: m(**b), batches)
    xs = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)])
    assert store.sum(name).shape == (128, 128)
    torch.testing.assert_close(store.sum(name), xs.T @ xs, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("method, mode", [("corda", "kpm"), ("corda", "ipm"), ("corda++", "kpm")])
def test_exact_at_init_and_stock_peft_reloads_it(method, mode, tmp_path):
    model, batches = tiny_gpt2(), text_batches()
    reference = logits(model, batches[0])
    store = collect_covariances(model, batches, progress=False, splits=2 if method == "corda++" else 1)
    config = CordaConfig(method=method, mode=mode, r=4)
    dry = plan(model, config, store)
    built = build_corda(model, store, config, progress=False)
    adapted = sorted(n for n, m in built.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert sorted(dry.modules) == adapted and len(adapted) == 8
    torch.testing.assert_close(logits(built, batches[0]), reference, atol=5e-5, rtol=0)
    with torch.no_grad():  # the adapters do act: moving B changes the outputs
        for n, p in built.named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    trained = logits(built, batches[0])
    assert (trained - reference).abs().max() > 1e-3
    out = save_corda(built, tmp_path / "gpt2")
    stock = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(out / "residual"), out / "adapter")
    torch.testing.assert_close(logits(stock, batches[0]), trained, atol=5e-5, rtol=0)


def test_conv1d_and_linear_layers_in_one_adapter_are_refused():
    model, batches = tiny_gpt2(tie=False), text_batches()
    store = collect_covariances(model, batches, groups=["language", "head"], progress=False)
    with pytest.raises(TargetError, match="Conv1D layer.*nn.Linear.*separate adapters"):
        build_corda(model, store, CordaConfig(r=4, groups=["language", "head"]), progress=False)
