"""The method registry: every method is one registered object, the config accepts exactly the
registered names, and a method added from outside goes through build, plan and save unchanged."""

import pytest
import torch
from conftest import logits, text_batches, tiny_llama

from corda_vl import CordaConfig, CordaError, build_corda, build_record, collect_covariances, plan
from corda_vl.methods import Decomposition, Method, get_method, method_names, register_method
from corda_vl.methods import registry
from corda_vl.methods.base import factor_dtype, module_record


def test_the_built_in_methods_and_what_they_need():
    assert set(method_names()) >= {"lora", "pissa", "milora", "corda", "corda++"}
    needs = {name: get_method(name).needs_store for name in ("lora", "pissa", "milora", "corda", "corda++")}
    assert needs == {"lora": False, "pissa": False, "milora": False, "corda": True, "corda++": True}
    assert not get_method("lora").rewrites_base and get_method("corda").rewrites_base
    assert get_method("corda++").allocates_ranks and not get_method("corda").allocates_ranks


def test_the_config_checks_the_method_against_the_registry():
    with pytest.raises(CordaError, match="not one of .*corda\\+\\+.*register_method"):
        CordaConfig(method="dora")


@pytest.mark.parametrize("method, svd, mode, match", [
    ("corda", "lowrank", "kpm", "KPM needs the smallest"),
    ("corda++", "lowrank", "ipm", "every singular value"),
    ("milora", "lowrank", "kpm", "milora needs the smallest"),
])
def test_each_method_validates_its_own_settings(method, svd, mode, match):
    with pytest.raises(CordaError, match=match):
        CordaConfig(method=method, svd=svd, mode=mode)


def test_a_group_mode_of_kpm_is_checked_too():
    with pytest.raises(CordaError, match="KPM needs the smallest"):
        CordaConfig(method="corda", mode="ipm", svd="lowrank", group_modes={"language": "kpm"})


class HalfCorda(Method):
    """A toy method from outside the package: B = W's top rows, A = a slice of the identity."""

    name = "toy"
    summary = "test only"

    def covariance_label(self, family, target, store, source, config):
        return "toy label"

    def analyse(self, targets, store, config, source, progress):
        out = {}
        for t in targets:
            r = config.rank_for(t.name, t.group)
            A = torch.eye(t.d_in)[:r].to(factor_dtype(t.module.weight))
            B = t.module.weight.detach()[:, :r].to(A.dtype) / config.scaling_for(t.name, t.group)
            out[t.name] = (A, B)
        return out

    def finish(self, analysed, targets, config):
        return Decomposition(analysed, {t.name: module_record(t, config) for t in targets})


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # forget it after the test
    return register_method(HalfCorda())


def test_a_registered_method_builds_plans_and_keeps_outputs_exact(toy):
    config = CordaConfig(method="toy", r=4, target_modules=["q_proj", "down_proj"])
    model = tiny_llama()
    batch = text_batches(1)[0]
    before = logits(model, batch)
    assert {row.covariance for row in plan(model, config).rows} == {"toy label"}
    peft_model = build_corda(model, None, config, progress=False)
    assert torch.allclose(logits(peft_model, batch), before, atol=1e-5)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_A["default"].weight, torch.eye(layer.in_features)[:4])
    modules = build_record(peft_model).modules
    assert len(modules) == 2 * len(peft_model.base_model.model.model.layers)
    assert all(name.endswith(("q_proj", "down_proj")) for name in modules)


def test_a_method_that_needs_a_store_is_refused_without_one():
    with pytest.raises(CordaError, match="needs a CovarianceStore"):
        build_corda(tiny_llama(), None, CordaConfig(method="corda++", r=4), progress=False)
    store = collect_covariances(tiny_llama(), text_batches(2), progress=False)
    assert build_record(build_corda(tiny_llama(), store, CordaConfig(r=4), progress=False)).source == "calib"
