"""collect_covariances: exact sums, masks, shared inputs, hooks, bad input."""

import warnings

import pytest
import torch
from conftest import llava_batches, module_inputs, text_batches, tiny_llama, tiny_llava

from corda_vl import CalibrationError, collect_covariances
from corda_vl.calibration import collector
from corda_vl.calibration.gram import GramSum


def direct_inputs(model, batch, module_name):
    """The non-padding inputs of one module, captured by a hook the test installs itself."""
    (x,) = module_inputs(model, module_name, lambda m, b: m(**b), [batch])
    return x[batch["attention_mask"].bool()]


def test_covariance_equals_direct_computation(llama, batches):
    store = collect_covariances(llama, batches, progress=False)
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        xs = torch.cat([direct_inputs(llama, b, name) for b in batches])
        torch.testing.assert_close(store.sum(name), xs.T @ xs, rtol=1e-5, atol=1e-4)
        assert store.count(name) == xs.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
        torch.testing.assert_close(store.covariance(name, dtype=torch.float32), xs.T @ xs / xs.shape[0],
                                   rtol=1e-5, atol=1e-6)


def test_max_sample_scale_weights_each_sample_like_peft(llama):
    """PEFT's hook divides each (batch size 1) sample's input by |max| of it; padded batches of 4 give
    the same store, padding excluded from the max as from the sums."""
    padded = text_batches(n_batches=1, batch_size=4, pad=True)[0]
    store = collect_covariances(llama, [padded], sample_scale="max", progress=False)
    name = "model.layers.1.mlp.down_proj"
    (x,) = module_inputs(llama, name, lambda m, b: m(**b), [padded])
    expected = 0
    for row in range(4):
        xi = x[row][padded["attention_mask"][row].bool()]
        xi = xi / xi.max().abs()
        expected = expected + xi.T @ xi
    torch.testing.assert_close(store.sum(name), expected, rtol=1e-5, atol=1e-6)
    plain = collect_covariances(llama, [padded], progress=False)
    assert store.counts == plain.counts and not torch.allclose(store.sum(name), plain.sum(name))
    with pytest.raises(CalibrationError, match="sample_scale"):
        collect_covariances(llama, [padded], sample_scale="l2", progress=False)


def test_batch_size_one_equals_padded_batch_of_four(llama):
    padded = text_batches(n_batches=1, batch_size=4, pad=True)[0]
    singles = []
    for row in range(4):
        keep = padded["attention_mask"][row].bool()
        ids = padded["input_ids"][row][keep][None]
        singles.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    a = collect_covariances(llama, [padded], progress=False)
    b = collect_covariances(llama, singles, progress=False)
    assert a.counts == b.counts
    for key in a.sums:
        torch.testing.assert_close(a.sums[key], b.sums[key], rtol=1e-5, atol=1e-4)


def test_shared_inputs_are_stored_once(llama, batches):
    store = collect_covariances(llama, batches, progress=False)
    assert len(store.modules) == 14  # 7 projections x 2 layers
    assert len(store.sums) == 8  # per layer: {q,k,v}, o, {gate,up}, down
    assert store.inputs["model.layers.0.self_attn.v_proj"] == "model.layers.0.self_attn.q_proj"
    assert store.inputs["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert store.inputs["model.layers.1.mlp.down_proj"] == "model.layers.1.mlp.down_proj"


def test_cpu_sums_are_allocated_before_each_forward_never_inside_it(llama, batches, monkeypatch):
    """Sums opened inside the forward pin the heap holes of freed activations (calibration/collector.py);
    on CPU every sum is reserved in ``start_batch``, and the unused reservations are dropped."""
    in_forward, opened = [], []

    class Spy(GramSum):
        def __init__(self, *args, **kwargs):
            opened.append(bool(in_forward))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(collector, "GramSum", Spy)
    llama.register_forward_pre_hook(lambda module, args: in_forward.append(True))
    llama.register_forward_hook(lambda module, args, out: in_forward.clear(), always_call=True)
    store = collect_covariances(llama, batches, progress=False)
    assert len(opened) == 14  # the first batch reserves one per module, before the sharing is known
    assert not any(opened)
    assert len(store.sums) == 8 and all(store.counts.values())  # shared readers' reservations dropped


def test_a_modality_no_token_reached_leaves_no_covariance():
    text_only = llava_batches()[-1]
    assert "pixel_values" not in text_only
    with pytest.warns(UserWarning, match="fewer tokens"):  # 20 text tokens for d_in=48
        store = collect_covariances(tiny_llava(), [text_only], groups=["language"], progress=False)
    assert "calib/text" in store.sources and "calib/image" not in store.sources
    assert all(source == "calib/text" for _, source in store.sums)


def test_targets_and_early_stop(llama, batches):
    full = collect_covariances(llama, batches, stop_early=False, progress=False)
    only_v = collect_covariances(llama, batches, target_modules=["v_proj"], progress=False)
    assert only_v.modules == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    for name in only_v.modules:
        torch.testing.assert_close(only_v.sum(name), full.sum(name))


def test_float64_and_offload_options(llama, batches):
    ref = collect_covariances(llama, batches, progress=False)
    f64 = collect_covariances(llama, batches, dtype=torch.float64, offload=True, progress=False)
    for key, value in ref.sums.items():
        assert f64.sums[key].dtype == torch.float64 and f64.sums[key].device.type == "cpu"
        torch.testing.assert_close(f64.sums[key].float(), value, rtol=1e-5, atol=1e-4)


def test_no_state_left_on_modules(llama, batches):
    before = {n: set(vars(m)) for n, m in llama.named_modules()}
    collect_covariances(llama, batches, progress=False)
    for name, module in llama.named_modules():
        assert set(vars(module)) == before[name]
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_nan_activations_name_the_module_and_remove_hooks(llama, batches):
    with torch.no_grad():
        llama.model.embed_tokens.weight[batches[1]["input_ids"][0, 0]] = float("nan")
    with pytest.raises(CalibrationError, match=r"model\.layers\.0\.self_attn\.q_proj.*NaN/Inf.*batch 1"):
        collect_covariances(llama, batches, progress=False)
    assert all(not m._forward_pre_hooks for m in llama.modules())


def test_few_tokens_warn_with_count_and_d_in():
    model = tiny_llama()
    short = [{"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}]
    with pytest.warns(UserWarning, match=r"8 covariance\(s\).*only 3 calibration tokens for d_in=48.*at least 48") as seen:
        collect_covariances(model, short, progress=False)
    assert {w.filename for w in seen} == {__file__}  # attributed to the caller, not to corda_vl's frames


def test_unreached_targets_warn_at_the_caller():
    import dataclasses

    from corda_vl.families import detect_family

    model = tiny_llama()
    decoder_only = dataclasses.replace(detect_family(model), forward=lambda m, batch: m.model(**batch))  # no lm_head
    with pytest.warns(UserWarning, match="never called during calibration") as seen:
        collect_covariances(model, [{"input_ids": torch.tensor([[5, 6, 7] * 20])}], groups=["language", "head"],
                            stop_early=False, progress=False, family=decoder_only)
    assert __file__ in {w.filename for w in seen if "never called" in str(w.message)}


def test_empty_calibration_is_an_error(llama):
    with pytest.raises(CalibrationError, match="no data"):
        collect_covariances(llama, [], progress=False)


def test_mask_shape_mismatch_is_explained(llama, batches):
    bad = dict(batches[0])
    bad["attention_mask"] = bad["attention_mask"][:, :-2]
    with pytest.raises(Exception):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            collect_covariances(llama, [bad], progress=False)
    assert all(not m._forward_pre_hooks for m in llama.modules())
