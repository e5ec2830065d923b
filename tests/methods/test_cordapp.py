"""CorDA++ end to end: covariance selection, rank allocation, PEFT wiring, dry run, save / load."""

import json

import numpy as np
import pytest
import torch
from conftest import llava_batches, logits, text_batches, tiny_llama, tiny_llava
from peft import PeftModel
from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

from corda_vl import (
    CalibrationError,
    CordaConfig,
    CordaError,
    allocate_ranks,
    build_corda,
    build_record,
    collect_covariances,
    load_corda,
    plan,
    save_corda,
)


@pytest.fixture
def split_store(llama):
    return collect_covariances(llama, text_batches(6), splits=3, progress=False)


def adapter_ranks(peft_model):
    return {n: m.r["default"] for n, m in peft_model.get_base_model().named_modules()
            if hasattr(m, "lora_A") and m.lora_A}


METRIC_MODES = [("bound", "kpm"), ("bound", "ipm"), ("paper", "kpm"), ("heldout", "kpm"), ("heldout", "ipm")]


@pytest.mark.parametrize("metric, mode", METRIC_MODES)
def test_unchanged_at_init_within_budget_and_bounds(llama, split_store, metric, mode):
    batch = text_batches(1, seed=9)[0]
    ref = logits(llama, batch)
    config = CordaConfig(method="corda++", mode=mode, r=4, alpha=8, compactness=metric)
    peft_model = build_corda(llama, split_store, config, progress=False)
    torch.testing.assert_close(logits(peft_model, batch), ref, atol=2e-5, rtol=0)
    record = build_record(peft_model)
    ranks = adapter_ranks(peft_model)
    assert ranks == {n: i["rank"] for n, i in record.modules.items()}
    assert len(set(ranks.values())) > 1  # the allocation really moved rank
    widest = max(sum(i["shape"]) for i in record.modules.values())
    assert record.budget["budget"] == sum(4 * sum(i["shape"]) for i in record.modules.values())
    assert record.budget["budget"] <= record.budget["realised"] < record.budget["budget"] + widest
    for name, info in record.modules.items():
        assert 1 <= info["rank"] <= min(8, min(info["shape"]) - 1)
        layer = peft_model.get_base_model().get_submodule(name)
        assert layer.scaling["default"] == pytest.approx(2.0)  # alpha / r constant: alpha_pattern follows rank
        assert info["source"] in ("calib", "calib/split0", "calib/split1", "calib/split2")


@pytest.mark.parametrize("metric", ["bound", "paper", "heldout"])
def test_dry_run_equals_the_build(llama, split_store, metric):
    config = CordaConfig(method="corda++", r=4, rank_step=2, budget=3000, compactness=metric)
    dry = allocate_ranks(llama, split_store, config, progress=False)
    assert plan(llama, config, split_store).ranks == dry.ranks  # plan() delegates for corda++
    peft_model = build_corda(llama, split_store, config, progress=False)
    record = build_record(peft_model)
    assert dry.ranks == adapter_ranks(peft_model)
    assert dry.sources == {n: i["source"] for n, i in record.modules.items()}
    assert dry.budget == 3000 and dry.trainable == record.budget["realised"]
    hist = record.rank_histograms()
    for kind in ("group", "projection"):  # every layer counted once, at its rank
        assert sum(n for counts in hist[kind].values() for n in counts.values()) == len(record.modules)
    q_ranks = sorted(str(r) for n, r in dry.ranks.items() if n.endswith("q_proj"))
    assert sorted(r for r, n in hist["projection"]["q_proj"].items() for _ in range(n)) == q_ranks
    text = str(dry)
    assert "budget 3,000" in text and "calib/split" in text


def test_selection_matches_a_brute_force_computation(llama, split_store):
    """Independent numpy route: C from the store's sums, damping, full SVD, eigvalsh, the formula."""
    config = CordaConfig(method="corda++", r=4, damping=(1e-4,))
    weights = {n: m.weight.detach().double().numpy() for n, m in llama.named_modules() if n in split_store.inputs}
    peft_model = build_corda(llama, split_store, config, progress=False)
    record = build_record(peft_model).modules
    clear = 0
    for name, info in record.items():
        scores = {}
        for source in info["candidates"]:
            c = (split_store.sum(name, source).double() / split_store.count(name, source)).numpy()
            c = c + 1e-4 * np.mean(np.diag(c)) * np.eye(len(c))
            s = np.linalg.svd(weights[name] @ c, compute_uv=False)
            lam = np.linalg.eigvalsh(c)
            tail = np.sort(s)[:4].sum()  # KPM at the nominal rank: the 4 smallest go to the adapter
            scores[source] = 1 - np.sqrt(lam[-1] / lam[0]) * tail / s.sum()
        for source, value in scores.items():
            assert info["candidates"][source] == pytest.approx(value, rel=1e-3)
        ranked = sorted(scores.values(), reverse=True)
        if ranked[0] - ranked[1] > 1e-3 * ranked[0]:
            assert info["source"] == max(scores, key=scores.get)
            clear += 1
    assert clear >= 5  # enough layers with a clear winner for the check to mean something


def test_fixed_ranks_and_one_source_reproduce_corda(llama, batches):
    """corda++ whose bounds pin every rank and whose only candidate is the store's source = corda."""
    store = collect_covariances(llama, batches, progress=False)
    plain = build_corda(tiny_llama(), store, CordaConfig(r=4), progress=False)
    pinned = build_corda(llama, store, CordaConfig(method="corda++", r=4, rank_min=4, rank_max=4), progress=False)
    a, b = plain.state_dict(), pinned.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-7, rtol=0)


@pytest.mark.parametrize("metric", ["bound", "paper", "heldout"])
def test_save_loads_in_stock_peft_with_rank_pattern(llama, split_store, tmp_path, metric):
    batch = text_batches(1, seed=9)[0]
    peft_model = build_corda(llama, split_store, CordaConfig(method="corda++", r=4, compactness=metric),
                             progress=False)
    ref = logits(peft_model, batch)
    out = save_corda(peft_model, tmp_path / "pp")
    stock = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(out / "residual"), out / "adapter")
    torch.testing.assert_close(logits(stock, batch), ref, atol=1e-6, rtol=0)
    assert adapter_ranks(stock) == adapter_ranks(peft_model)
    loaded = load_corda(out)
    torch.testing.assert_close(logits(loaded, batch), ref, atol=1e-6, rtol=0)
    assert build_record(loaded).modules == build_record(peft_model).modules
    assert build_record(loaded).budget == build_record(peft_model).budget
    meta = json.loads((out / "corda_vl.json").read_text())["build"]
    assert {n: i["source"] for n, i in meta["modules"].items()} == {
        n: i["source"] for n, i in build_record(peft_model).modules.items()}
    assert meta["budget"]["realised"] >= meta["budget"]["budget"]


def test_rank_plot_is_a_png(llama, split_store, tmp_path):
    dry = allocate_ranks(llama, split_store, CordaConfig(method="corda++", r=4), progress=False)
    dry.plot(tmp_path / "ranks.png")
    data = (tmp_path / "ranks.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_splits_add_up_to_the_whole(llama):
    batches = text_batches(7)
    whole = collect_covariances(llama, batches, progress=False)
    split = collect_covariances(tiny_llama(), batches, splits=3, progress=False)
    name = "model.layers.1.mlp.down_proj"
    assert split.sources == ["calib", "calib/split0", "calib/split1", "calib/split2"]
    assert [split.count(name, f"calib/split{i}") > 0 for i in range(3)] == [True] * 3
    assert split.count(name, "calib") == whole.count(name, "calib")
    torch.testing.assert_close(split.sum(name, "calib"), whole.sum(name, "calib"), rtol=1e-5, atol=1e-4)
    again = collect_covariances(tiny_llama(), batches, splits=3, progress=False)
    assert {k: v for k, v in again.counts.items()} == split.counts  # the deal is seeded
    with pytest.raises(CalibrationError, match="splits"):
        collect_covariances(tiny_llama(), batches, splits=0, progress=False)


def test_llava_vision_projector_language(tmp_path):
    groups = ["vision", "projector", "language"]
    model, batches = tiny_llava(), llava_batches()
    store = collect_covariances(model, batches, groups=groups, progress=False)
    batch = batches[0]
    with torch.no_grad():
        ref = model(**batch).logits
    config = CordaConfig(method="corda++", r=4, groups=groups)
    dry = allocate_ranks(model, store, config, progress=False)
    peft_model = build_corda(model, store, config, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, ref, atol=3e-5, rtol=0)
    assert dry.ranks == adapter_ranks(peft_model) and set(dry.group_totals()) == set(groups)
    record = build_record(peft_model).modules
    language = [i for n, i in record.items() if i["group"] == "language"]
    assert all(set(i["candidates"]) == {"calib", "calib/image", "calib/text"} for i in language)
    assert all(set(i["candidates"]) == {"calib"} for i in record.values() if i["group"] != "language")
    assert {dry.sources[n] for n, i in record.items() if i["group"] == "language"} - {"calib"}  # selection acted
    out = save_corda(peft_model, tmp_path / "llava")
    stock = PeftModel.from_pretrained(LlavaForConditionalGeneration.from_pretrained(out / "residual"), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(stock(**batch).logits, peft_model(**batch).logits, atol=1e-6, rtol=0)
    assert adapter_ranks(stock) == dry.ranks


def test_llava_splits_keep_the_modality_wholes():
    groups = ["vision", "projector", "language"]
    model, batches = tiny_llava(), llava_batches(4)
    store = collect_covariances(model, batches, groups=groups, splits=2, progress=False)
    name = "model.language_model.layers.0.mlp.down_proj"
    assert {"calib", "calib/image", "calib/text", "calib/image/split0", "calib/text/split1"} <= set(store.sources_for(name))
    whole = collect_covariances(tiny_llava(), batches, groups=groups, progress=False)
    for source in ("calib", "calib/image", "calib/text"):
        torch.testing.assert_close(store.sum(name, source), whole.sum(name, source), rtol=1e-5, atol=1e-4)
    peft_model = build_corda(model, store, CordaConfig(method="corda++", r=4, groups=groups,
                                                       candidates=["calib", "calib/image", "calib/text"]), progress=False)
    record = build_record(peft_model).modules
    assert set(record[name]["candidates"]) == {"calib", "calib/image", "calib/text"}


def test_odd_layers_and_bounds(llama, batches):
    store = collect_covariances(llama, batches, progress=False)
    batch = batches[0]
    ref = logits(llama, batch)
    # nominal ranks at or above min(d_in, d_out) (k/v are 16x32) are capped, not a crash
    peft_model = build_corda(llama, store, CordaConfig(method="corda++", r=20, rank_max=40), progress=False)
    torch.testing.assert_close(logits(peft_model, batch), ref, atol=2e-5, rtol=0)
    record = build_record(peft_model).modules
    assert all(i["rank"] < min(i["shape"]) for i in record.values())
    with pytest.raises(CordaError, match="rank_min 6 is above rank_max 3"):
        CordaConfig(method="corda++", rank_min=6, rank_max=3)
    with pytest.raises(CordaError, match="group 'vision'"):
        CordaConfig(method="corda++", rank_min={"vision": 6}, rank_max={"vision": 3})
    with pytest.warns(UserWarning, match="rank_max names groups \['vision'\]"):
        allocate_ranks(tiny_llama(), store, CordaConfig(method="corda++", r=4, rank_max={"vision": 8}), progress=False)
    with pytest.warns(UserWarning, match="caps allow only"):
        allocate_ranks(tiny_llama(), store, CordaConfig(method="corda++", r=4, rank_max=4, budget=10**6), progress=False)


def test_a_zero_layer_keeps_its_floor(batches):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    store = collect_covariances(model, batches, progress=False)
    with pytest.warns(UserWarning, match="o_proj: W C' = 0"):
        plan = allocate_ranks(model, store, CordaConfig(method="corda++", r=4), progress=False)
    assert plan.ranks["model.layers.1.self_attn.o_proj"] == 1


def test_bad_configs_are_explained(llama, split_store):
    with pytest.raises(CordaError, match="lowrank"):
        CordaConfig(method="corda++", mode="ipm", svd="lowrank")
    with pytest.raises(CordaError, match="budget"):
        CordaConfig(method="corda++", budget=0)
    with pytest.raises(CordaError, match="rank_min"):
        CordaConfig(method="corda++", rank_min={"language": 0})
    with pytest.raises(CordaError, match="floors"):
        build_corda(llama, split_store, CordaConfig(method="corda++", r=4, budget=100), progress=False)
    with pytest.raises(CordaError, match="candidate"):
        build_corda(llama, split_store, CordaConfig(method="corda++", candidates=["nq"]), progress=False)
    with pytest.raises(CordaError, match="method='corda\\+\\+'"):
        allocate_ranks(llama, split_store, CordaConfig(), progress=False)
    assert not any("lora" in n for n, _ in llama.named_modules())  # failures left the model alone


def test_heldout_scores_every_candidate_on_a_split_none_of_them_saw(llama, split_store):
    """splits 0-2: split2 is held out, so 'calib' is built from splits 0 and 1, 'calib/split2' is
    no candidate, and the scores equal a direct computation on split2's covariance."""
    from corda_vl.decomposition.compactness import component_energies, heldout_rank_scores, output_energy
    from corda_vl.decomposition.cosvd import co_svd, components, damp_covariance

    config = CordaConfig(method="corda++", r=4, compactness="heldout", damping=(1e-4,))
    name = "model.layers.0.self_attn.q_proj"
    weight = llama.get_submodule(name).weight.detach().clone()  # the build leaves the residual in its place
    info = build_record(build_corda(llama, split_store, config, progress=False)).modules[name]
    assert set(info["candidates"]) == {"calib", "calib/split0", "calib/split1"} and info["heldout_split"] == "split2"
    assert info["tokens"] == split_store.count(name, info["source"], "split2")  # built without split2
    held = split_store.covariance(name, "calib/split2")
    for source in ("calib", "calib/split0"):
        cov = split_store.covariance(name, source, split="split2")
        damped = damp_covariance(cov, (1e-4,))
        rank_max = 8
        parts = components(co_svd(weight, damped, rank_max, "kpm", svd="full"), damped)
        expected = heldout_rank_scores(component_energies(parts.S, parts.VhCinv, held), output_energy(weight, held),
                                       "kpm", min(weight.shape))[4]
        assert info["candidates"][source] == pytest.approx(float(expected), rel=1e-4)


def test_heldout_needs_splits_and_paper_needs_kpm(llama, batches):
    store = collect_covariances(llama, batches, progress=False)
    with pytest.raises(CordaError, match="splits=2"):
        build_corda(llama, store, CordaConfig(method="corda++", r=4, compactness="heldout"), progress=False)
    with pytest.raises(CordaError, match="KPM"):
        CordaConfig(method="corda++", mode="ipm", compactness="paper")
    with pytest.raises(CordaError, match="compactness="):
        CordaConfig(method="corda++", compactness="best")
