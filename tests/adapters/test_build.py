"""build_corda: exactness at init for every method, PEFT wiring, bad input."""

import pytest
import torch
from conftest import logits, module_inputs, tiny_llama

from corda_vl import CordaConfig, CordaError, DecompositionError, TargetError, build_corda, build_record, collect_covariances
from corda_vl.decomposition.cosvd import damp_covariance


@pytest.fixture
def store(llama, batches):
    return collect_covariances(llama, batches, progress=False)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_logits_unchanged_at_init_fp32(llama, batches, store, mode):
    ref = logits(llama, batches[0])
    model = build_corda(llama, store, CordaConfig(r=4, mode=mode, alpha=8), progress=False)
    torch.testing.assert_close(logits(model, batches[0]), ref, atol=2e-5, rtol=0)
    # the adapter is really there and non-trivial
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.shape == (4, 32)
    assert layer.lora_B["default"].weight.abs().sum() > 0
    assert layer.scaling["default"] == 2.0


@pytest.mark.parametrize("method", ["corda", "corda++"])
def test_norm_balanced_factors_keep_the_model_and_the_subspaces(batches, method):
    """factor_balance='norm' only moves each component's scale between A and B: outputs unchanged at
    init, same B A, same row space of A, and ||A_i|| = ||B_i||."""
    built = {}
    for balance in ("sigma", "norm"):
        model = tiny_llama()
        store = collect_covariances(model, batches, splits=2, progress=False)
        ref = logits(model, batches[0])
        built[balance] = build_corda(model, store, CordaConfig(method=method, r=4, factor_balance=balance), progress=False)
        torch.testing.assert_close(logits(built[balance], batches[0]), ref, atol=2e-5, rtol=0)
    name = "model.layers.1.self_attn.q_proj"
    sigma, norm = (built[b].get_base_model().get_submodule(name) for b in ("sigma", "norm"))
    (A1, B1), (A2, B2) = ((m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double()) for m in (sigma, norm))
    torch.testing.assert_close(B2 @ A2, B1 @ A1, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(A2.norm(dim=1), B2.norm(dim=0), atol=1e-6, rtol=1e-4)
    assert not torch.allclose(A1.norm(dim=1), B1.norm(dim=0), rtol=1e-2)  # the paper's split is unbalanced
    torch.testing.assert_close(A2 / A2.norm(dim=1, keepdim=True), A1 / A1.norm(dim=1, keepdim=True), atol=1e-5, rtol=0)
    with pytest.raises(CordaError, match="factor_balance"):
        CordaConfig(factor_balance="mean")


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_logits_unchanged_at_init_bf16(batches, mode):
    model = tiny_llama(dtype=torch.bfloat16)
    store = collect_covariances(model, batches, progress=False)
    ref = logits(model, batches[0])
    peft_model = build_corda(model, store, CordaConfig(r=4, mode=mode), progress=False)
    out = logits(peft_model, batches[0])
    assert (out - ref).abs().max() <= 0.02 * ref.abs().max()


@pytest.mark.parametrize("method", ["milora", "pissa"])
def test_baselines_unchanged_at_init(llama, batches, method):
    ref = logits(llama, batches[0])
    model = build_corda(llama, None, CordaConfig(method=method, r=4), progress=False)
    torch.testing.assert_close(logits(model, batches[0]), ref, atol=2e-5, rtol=0)


def test_lora_baseline_is_plain_peft(llama, batches):
    ref = logits(llama, batches[0])
    model = build_corda(llama, None, CordaConfig(method="lora", r=4), progress=False)
    torch.testing.assert_close(logits(model, batches[0]), ref)  # B = 0
    layer = model.get_base_model().model.layers[1].mlp.up_proj
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.equal(layer.base_layer.weight, tiny_llama().model.layers[1].mlp.up_proj.weight)


def test_milora_takes_the_smallest_plain_svd_components(llama):
    W = llama.model.layers[0].mlp.gate_proj.weight.detach().double().clone()
    model = build_corda(llama, None, CordaConfig(method="milora", r=3), progress=False)
    layer = model.get_base_model().model.layers[0].mlp.gate_proj
    BA = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(BA, U[:, -3:] @ torch.diag(S[-3:]) @ Vh[-3:], atol=1e-5, rtol=0)


def test_rank_and_alpha_patterns_reach_peft(llama, batches, store):
    config = CordaConfig(r=4, rank_pattern={"q_proj": 2}, alpha_pattern={"down_proj": 16})
    ref = logits(llama, batches[0])
    model = build_corda(llama, store, config, progress=False)
    base = model.get_base_model().model.layers[1]
    assert base.self_attn.q_proj.r["default"] == 2 and base.self_attn.k_proj.r["default"] == 4
    assert base.mlp.down_proj.scaling["default"] == 4.0 and base.mlp.up_proj.scaling["default"] == 1.0
    torch.testing.assert_close(logits(model, batches[0]), ref, atol=2e-5, rtol=0)
    record = build_record(model)
    assert record.modules["model.layers.1.self_attn.q_proj"]["rank"] == 2
    assert record.modules["model.layers.1.self_attn.q_proj"]["input"] == "model.layers.1.self_attn.q_proj"
    assert record.modules["model.layers.1.self_attn.k_proj"]["input"] == "model.layers.1.self_attn.q_proj"


def test_targets_narrow_the_adapter(llama, store):
    model = build_corda(llama, store, CordaConfig(r=2, target_modules=["v_proj", "down_proj"]), progress=False)
    adapted = sorted(n for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A") and m.lora_A)
    assert adapted == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.v_proj",
                       "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.v_proj"]


def untouched(model, reference):
    return (not any("lora" in n for n, _ in model.named_modules())
            and all(torch.equal(p, reference.state_dict()[k]) for k, p in model.state_dict().items()))


def test_rank_too_large_is_refused(llama, store):
    with pytest.raises(TargetError, match=r"k_proj.*rank 16.*min\(d_in, d_out\) = 16"):
        build_corda(llama, store, CordaConfig(r=16), progress=False)
    assert untouched(llama, tiny_llama())


def test_targets_matching_nothing(llama, store):
    with pytest.raises(TargetError, match="matches no nn.Linear.*module names there look like"):
        build_corda(llama, store, CordaConfig(target_modules=["qkv"]), progress=False)
    with pytest.raises(TargetError, match="group.*vision.*do not exist.*language"):
        build_corda(llama, store, CordaConfig(groups=["vision"]), progress=False)


def test_non_float_weights_are_refused(llama, store):
    layer = llama.model.layers[0].self_attn.o_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TargetError, match="o_proj.*int8.*floating point"):
        build_corda(llama, store, CordaConfig(r=2), progress=False)


def test_tied_weights_are_refused():
    model = tiny_llama(tie=True)
    with pytest.raises(TargetError, match="lm_head.*tied"):
        build_corda(model, None, CordaConfig(method="milora", r=2, groups=["head"]), progress=False)


def test_store_from_another_model_is_refused(llama, batches):
    store = collect_covariances(tiny_llama(seed=7), batches, progress=False)
    with pytest.raises(CordaError, match="another model"):
        build_corda(llama, store, CordaConfig(r=2), progress=False)
    assert untouched(llama, tiny_llama())


def test_corda_needs_a_store(llama):
    with pytest.raises(CordaError, match="collect_covariances"):
        build_corda(llama, None, CordaConfig(r=2), progress=False)


def test_singular_covariance_leaves_the_model_untouched(llama, store):
    key = ("model.layers.1.mlp.down_proj", "calib")
    store.sums[key][0, :] = 0
    store.sums[key][:, 0] = 0
    with pytest.raises(DecompositionError, match=r"model\.layers\.1\.mlp\.down_proj.*not positive definite"):
        build_corda(llama, store, CordaConfig(r=2, damping=(0.0,)), progress=False)
    assert untouched(llama, tiny_llama())


def test_recorded_damping_is_the_one_used(llama, store):
    model = build_corda(llama, store, CordaConfig(r=2), progress=False)
    name = "model.layers.0.mlp.gate_proj"
    expected = damp_covariance(store.covariance(name), CordaConfig().damping).damping
    assert build_record(model).modules[name]["damping"] == expected
    assert build_record(model).modules[name]["tokens"] == store.count(name)


def test_config_validation():
    for bad in ({"mode": "x"}, {"method": "dora"}, {"r": 0}, {"damping": (1.0, 0.1)},
                {"svd": "lowrank", "mode": "kpm"}, {"covariance_normalization": "max"}):
        with pytest.raises(CordaError):
            CordaConfig(**bad)
    assert CordaConfig.from_dict(CordaConfig(r=3).to_dict()) == CordaConfig(r=3)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_built_adapter_matches_an_independent_co_svd(batches, mode):
    """End to end: hooks of our own -> C -> numpy SVD of W C'; compare with the PEFT layer."""
    import numpy as np

    model, name, r = tiny_llama(), "model.layers.1.self_attn.o_proj", 3
    W = model.get_submodule(name).weight.detach().double().numpy().copy()
    seen = module_inputs(model, name, lambda m, b: m(**b), batches)
    X = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]).double().numpy()
    C = X.T @ X / X.shape[0]
    store = collect_covariances(model, batches, dtype=torch.float64, progress=False)
    peft_model = build_corda(model, store, CordaConfig(r=r, mode=mode, alpha=2 * r, svd="full"), progress=False)
    lam = build_record(peft_model).modules[name]["damping"]
    Cd = C + lam * np.mean(np.diag(C)) * np.eye(len(C))
    Cd /= np.mean(np.diag(Cd))
    U, S, Vt = np.linalg.svd(W @ Cd)
    keep = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    layer = peft_model.get_base_model().get_submodule(name)
    A = layer.lora_A["default"].weight.detach().double().numpy()
    B = layer.lora_B["default"].weight.detach().double().numpy()
    expected = U[:, keep] @ np.diag(S[keep]) @ Vt[keep] @ np.linalg.inv(Cd)
    # A and B are stored in float32: compare relative to the size of the product's terms
    assert np.abs(2.0 * B @ A - expected).max() < 1e-5 * np.abs(2.0 * B).max() * np.abs(A).max()
    W_res = layer.base_layer.weight.detach().double().numpy()
    np.testing.assert_allclose(W_res + 2.0 * B @ A, W, atol=1e-6)


@pytest.mark.parametrize("name, matches", [
    ("transformer.resblocks.0.attn.out_proj", True),
    ("visual.transformer.resblocks.0.attn.out_proj", False),  # ends with the key: PEFT's rule alone would match
    ("base_model.model.transformer.resblocks.0.attn.out_proj", True),  # EVA matches the wrapped name
    ("base_model.model.visual.transformer.resblocks.0.attn.out_proj", False),
])
def test_an_exact_key_matches_its_module_alone_under_pefts_rule(name, matches):
    from peft.utils.other import get_pattern_key

    from corda_vl.adapters.build import exact_key

    key = exact_key("transformer.resblocks.0.attn.out_proj")
    assert (get_pattern_key([key], name) == key) is matches
