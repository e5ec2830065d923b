"""The retention dial: W + t (W_trained - W) for CorDA / PiSSA / LoRA, equal to PEFT's
rescale_adapter_scale on the exported plain LoRA, restored after the block."""

import pytest
import torch
from conftest import logits, text_batches, tiny_llama
from peft import PeftModel
from peft.helpers import rescale_adapter_scale

from corda_vl import CordaConfig, CordaError, build_corda, collect_covariances, export_lora, save_corda
from corda_vl.lab.interpolation import adapter_scale, initial_factors, update_size
from corda_vl.lab.training import trainable_parameters


def trained(method, tmp_path):
    """(peft model with perturbed adapter, its initial factors, initial adapter dir)."""
    model, batches = tiny_llama(), text_batches()
    store = collect_covariances(model, batches, progress=False) if method == "corda" else None
    torch.manual_seed(0)
    peft_model = build_corda(model, store, CordaConfig(method=method, r=3, alpha=6), progress=False)
    save_corda(peft_model, tmp_path / "init")
    initial = initial_factors(peft_model)
    with torch.no_grad():  # "training": move every adapter weight
        for p in trainable_parameters(peft_model).values():
            p.add_(0.05 * torch.randn_like(p))
    return peft_model, initial, tmp_path / "init" / "adapter"


@pytest.mark.parametrize("method", ["corda", "pissa", "lora"])
def test_scale_zero_is_the_original_model_and_one_the_trained_one(method, tmp_path):
    batch = text_batches()[0]
    original = logits(tiny_llama(), batch)
    model, initial, _ = trained(method, tmp_path)
    after = logits(model, batch)
    assert (after - original).abs().max() > 1e-3
    with adapter_scale(model, initial, 0.0):
        torch.testing.assert_close(logits(model, batch), original, atol=2e-5, rtol=0)
    with adapter_scale(model, initial, 1.0):
        torch.testing.assert_close(logits(model, batch), after, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits(model, batch), after, atol=0, rtol=0)  # restored exactly


@pytest.mark.parametrize("method", ["corda", "pissa"])
def test_intermediate_scale_equals_peft_rescaling_of_the_exported_lora(method, tmp_path):
    batch = text_batches()[0]
    model, initial, init_dir = trained(method, tmp_path)
    export_lora(model, init_dir, tmp_path / "lora")
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    for t in (0.3, 0.7):
        with adapter_scale(model, initial, t), rescale_adapter_scale(plain, t):
            torch.testing.assert_close(logits(model, batch), logits(plain, batch), atol=2e-5, rtol=0)


def test_weights_are_restored_on_error_and_missing_factors_are_refused(tmp_path):
    batch = text_batches()[0]
    model, initial, _ = trained("corda", tmp_path)
    after = logits(model, batch)
    with pytest.raises(RuntimeError):
        with adapter_scale(model, initial, 0.5):
            raise RuntimeError("boom")
    torch.testing.assert_close(logits(model, batch), after, atol=0, rtol=0)
    with pytest.raises(CordaError, match="initial factors"):
        with adapter_scale(model, {}, 0.5):
            pass
    with pytest.raises(CordaError, match="LoRA layers"):
        initial_factors(tiny_llama())


@pytest.mark.parametrize("method", ["corda", "pissa", "lora"])
def test_update_size_is_zero_at_init_and_the_norm_of_the_merged_change_after(method, tmp_path):
    model, batches = tiny_llama(), text_batches()
    original = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("proj.weight")}
    store = collect_covariances(model, batches, progress=False) if method == "corda" else None
    torch.manual_seed(0)
    peft_model = build_corda(model, store, CordaConfig(method=method, r=3, alpha=6), progress=False)
    initial = initial_factors(peft_model)
    at_init = update_size(peft_model, initial)
    assert at_init["fro"] == 0.0 and at_init["relative"] == 0.0
    with torch.no_grad():
        for p in trainable_parameters(peft_model).values():
            p.add_(0.05 * torch.randn_like(p))
    size = update_size(peft_model, initial)
    # the same number from the merged model: sum over adapted layers of ||W_merged - W_original||^2
    merged = peft_model.merge_and_unload()
    delta = sum(float((p.double() - original[n].double()).square().sum()) for n, p in merged.named_parameters()
                if n in original)
    assert len(initial) == len(original)  # every projection is adapted
    base = sum(float(w.double().square().sum()) for w in original.values())
    assert size["fro"] == pytest.approx(delta ** 0.5, rel=1e-5)
    assert size["relative"] == pytest.approx(delta ** 0.5 / base ** 0.5, rel=1e-5)
