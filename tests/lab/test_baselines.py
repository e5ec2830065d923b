"""PEFT's own baselines (peft-corda, eva, mica): lora's targets/ranks, exact at init, data handling, errors."""

import copy

import pytest
import torch
from conftest import clip_batches, llava_batches, logits, text_batches, tiny_clip, tiny_llama, tiny_llava
from peft import PeftModel
from peft.tuners.lora.layer import LoraLayer

from corda_vl import CordaConfig, CordaError, build_corda
from corda_vl.lab import baselines
from corda_vl.lab.baselines import BASELINES, available_baselines, build_baseline, is_baseline

LORA = dict(method="lora", r=4, alpha=8)


def adapters(peft_model):
    """{module name: (rank, scaling)} of every LoRA layer."""
    return {n: (m.r["default"], m.scaling["default"]) for n, m in peft_model.get_base_model().named_modules()
            if isinstance(m, LoraLayer)}


def lora_AB(peft_model, name="model.layers.1.mlp.down_proj"):
    layer = peft_model.get_base_model().get_submodule(name)
    return layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()


def test_installed_peft_has_every_baseline():
    assert BASELINES == ("peft-corda", "eva", "mica")
    assert available_baselines() == BASELINES
    assert is_baseline("eva") and not is_baseline("lora") and not is_baseline("corda")


@pytest.mark.parametrize("method, mode",
                         [("peft-corda", "kpm"), ("peft-corda", "ipm"), ("eva", "kpm"), ("mica", "kpm")])
def test_unchanged_at_init_with_lora_targets(batches, method, mode):
    reference = adapters(build_corda(tiny_llama(), None, CordaConfig(**LORA), progress=False))
    model = tiny_llama()
    ref = logits(model, batches[0])
    peft_model = build_baseline(model, method, CordaConfig(**LORA), batches, mode=mode, progress=False)
    assert isinstance(peft_model, PeftModel)
    assert (logits(peft_model, batches[0]) - ref).abs().max() < 1e-4
    assert adapters(peft_model) == reference  # same modules, ranks and scalings as lora
    A, B = lora_AB(peft_model)
    lora_A, _ = lora_AB(build_corda(tiny_llama(), None, CordaConfig(**LORA), progress=False))
    if method == "peft-corda":
        assert B.abs().sum() > 0 and not torch.allclose(A, lora_A)
        # a data-driven init that already ran must reload as plain LoRA weights
        assert peft_model.peft_config["default"].init_lora_weights is True
    elif method == "eva":
        assert torch.count_nonzero(B) == 0 and not torch.allclose(A, lora_A)
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-4, rtol=0)  # principal directions
        assert peft_model.peft_config["default"].init_lora_weights is True
    else:  # MiCA: A = 0, B = the minor left singular vectors, frozen
        assert torch.count_nonzero(A) == 0
        torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-4, rtol=0)
        layer = peft_model.get_base_model().model.layers[1].mlp.down_proj
        assert not layer.lora_B["default"].weight.requires_grad and layer.lora_A["default"].weight.requires_grad


@pytest.mark.parametrize("method", BASELINES)
def test_per_module_ranks_and_alphas_match_lora(batches, method):
    config = CordaConfig(method="lora", r=4, alpha=8, rank_pattern={"q_proj": 2, "down_proj": 6},
                         alpha_pattern={"up_proj": 3})
    reference = adapters(build_corda(tiny_llama(), None, config, progress=False))
    assert len(set(reference.values())) == 4  # the pattern really varies rank and scaling
    # EVA on its own would move rank between q/k/v (one shared input, unequal ranks)
    assert adapters(build_baseline(tiny_llama(), method, config, batches, progress=False)) == reference


def test_eva_takes_the_principal_directions_of_the_unpadded_inputs(batches):
    model, name = tiny_llama(), "model.layers.1.mlp.down_proj"
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    X = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]).double()
    principal = torch.linalg.svd(X - X.mean(0), full_matrices=False)[2][:2]
    A, _ = lora_AB(build_baseline(model, "eva", CordaConfig(**LORA), batches, progress=False), name)
    assert torch.linalg.svdvals(A.double() @ principal.T).min() > 0.95


@pytest.mark.parametrize("method", ["peft-corda", "eva"])
def test_padding_never_reaches_the_statistics(method):
    """Garbage in the padded positions changes nothing: each row is cut (peft-corda) or masked (eva)."""
    clean = text_batches()
    noisy = [dict(b, input_ids=torch.where(b["attention_mask"].bool(), b["input_ids"], 7)) for b in clean]
    assert any(not torch.equal(c["input_ids"], n["input_ids"]) for c, n in zip(clean, noisy))
    built = [lora_AB(build_baseline(tiny_llama(), method, CordaConfig(**LORA), b, progress=False))
             for b in (clean, noisy)]
    for x, y in zip(*built):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", BASELINES)
def test_saved_adapter_reloads_on_its_base(batches, method, tmp_path):
    peft_model = build_baseline(tiny_llama(), method, CordaConfig(**LORA), batches, progress=False)
    out = logits(peft_model, batches[0])
    peft_model.save_pretrained(tmp_path)
    base = copy.deepcopy(peft_model).unload()  # the residual base for peft-corda (PEFT rewrote the weights)
    reloaded = PeftModel.from_pretrained(base, tmp_path)
    assert adapters(reloaded) == adapters(peft_model)
    torch.testing.assert_close(logits(reloaded, batches[0]), out, atol=1e-5, rtol=0)


def test_errors(batches):
    with pytest.raises(CordaError, match="peft-corda.*eva.*mica"):
        build_baseline(tiny_llama(), "loftq", CordaConfig(**LORA))
    for method in ("peft-corda", "eva"):
        for missing in (None, []):
            with pytest.raises(CordaError, match=f"{method} calibrates on data"):
                build_baseline(tiny_llama(), method, CordaConfig(**LORA), missing)
    with pytest.raises(CordaError, match="'kpm' and 'ipm'"):
        build_baseline(tiny_llama(), "peft-corda", CordaConfig(**LORA), batches, mode="both")


def test_missing_peft_feature_is_reported(monkeypatch):
    monkeypatch.delattr(LoraLayer, "mica_init")
    assert available_baselines() == ("peft-corda", "eva")
    with pytest.raises(CordaError, match="has no mica.*upgrade peft"):
        build_baseline(tiny_llama(), "mica", CordaConfig(**LORA))


def test_eva_that_never_settles_stops(batches, monkeypatch):
    monkeypatch.setattr(baselines, "EVA_MAX_PASSES", 0)
    with pytest.raises(CordaError, match="did not settle"):
        build_baseline(tiny_llama(), "eva", CordaConfig(**LORA), batches, progress=False)


def clip_features(model, batches):
    with torch.no_grad():
        return (model.get_image_features(pixel_values=batches[0]["pixel_values"]).pooler_output,
                model.get_text_features(**batches[1]).pooler_output)


@pytest.mark.parametrize("method", BASELINES)
def test_clip_unchanged_at_init(method):
    """Alternating image / text batches, and a recipe-style batch with more images than texts."""
    model, batches = tiny_clip(), clip_batches()
    batches.append({"pixel_values": batches[0]["pixel_values"], **{k: v[:3] for k, v in batches[1].items()}})
    config = CordaConfig(method="lora", r=4)
    ref = clip_features(model, batches)
    reference = adapters(build_corda(tiny_clip(), None, config, progress=False))
    peft_model = build_baseline(model, method, config, batches, progress=False)
    assert adapters(peft_model) == reference
    assert {name.split(".")[0] for name in reference} == {"vision_model", "text_model"}
    for out, expected in zip(clip_features(peft_model, batches), ref):
        assert (out - expected).abs().max() < 1e-4
    if method != "mica":
        A, B = lora_AB(peft_model, "vision_model.encoder.layers.0.mlp.fc1")
        assert (B if method == "peft-corda" else A).abs().sum() > 0


def test_clip_peft_corda_refuses_what_it_cannot_calibrate():
    with pytest.raises(CordaError, match="one vector per example"):
        build_baseline(tiny_clip(), "peft-corda", CordaConfig(method="lora", r=4, groups=["text", "projection"]),
                       clip_batches(), progress=False)
    texts_only = [b for b in clip_batches() if "input_ids" in b]
    with pytest.raises(CordaError, match="no calibration batch reaches.*vision_model"):
        build_baseline(tiny_clip(), "peft-corda", CordaConfig(method="lora", r=4), texts_only, progress=False)


def test_eva_calibrates_clip_projections():
    config = CordaConfig(method="lora", r=4, groups=["text", "projection"])
    peft_model = build_baseline(tiny_clip(), "eva", config, clip_batches(), progress=False)
    assert adapters(peft_model) == adapters(build_corda(tiny_clip(), None, config, progress=False))
    assert lora_AB(peft_model, "visual_projection")[0].abs().sum() > 0


@pytest.mark.parametrize("method", BASELINES)
def test_llava_unchanged_at_init(method):
    model, batches = tiny_llava(), llava_batches()
    config = CordaConfig(method="lora", r=4, groups=["language", "vision", "projector"])
    with torch.no_grad():
        ref = model(**batches[0]).logits
    peft_model = build_baseline(model, method, config, batches, progress=False)
    assert adapters(peft_model) == adapters(build_corda(tiny_llava(), None, config, progress=False))
    with torch.no_grad():
        assert (peft_model(**batches[0]).logits - ref).abs().max() < 1e-4
