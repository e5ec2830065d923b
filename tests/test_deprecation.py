"""The 0.2 renames keep working for one release, with a DeprecationWarning that names the new place."""

import importlib
import sys

import pytest
import torch
from conftest import text_batches, tiny_llama

import corda_vl
from corda_vl import collect_covariances, plan_memory


def test_old_argument_names_still_work_with_a_warning():
    batches = text_batches(2)
    with pytest.warns(DeprecationWarning, match="targets=...\\) is now target_modules="):
        old = collect_covariances(tiny_llama(), batches, targets=["v_proj"], progress=False)
    new = collect_covariances(tiny_llama(), batches, target_modules=["v_proj"], progress=False)
    assert old.modules == new.modules and all(torch.equal(old.sums[k], new.sums[k]) for k in new.sums)
    with pytest.warns(DeprecationWarning, match="exclude=...\\) is now exclude_modules="):
        assert plan_memory(tiny_llama(), exclude=["lm_head"]) == plan_memory(tiny_llama(), exclude_modules=["lm_head"])
    with pytest.raises(TypeError, match="both targets= and target_modules="):
        collect_covariances(tiny_llama(), batches, targets=["v_proj"], target_modules=["q_proj"], progress=False)


@pytest.mark.parametrize("old, new", [("corda_vl.decompose", "corda_vl.decomposition.cosvd"),
                                      ("corda_vl.sequential", "corda_vl.scaleout.sequential"),
                                      ("corda_vl.experiment", "corda_vl.lab.experiment"),
                                      ("corda_vl.data.vqa", "corda_vl.lab.data.vqa")])
def test_old_module_paths_still_import_as_the_new_module(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_report_names_moved_to_the_lab():
    from corda_vl.lab.report import Run

    with pytest.warns(DeprecationWarning, match="corda_vl.lab.report.Run"):
        assert corda_vl.Run is Run
    with pytest.raises(AttributeError):
        corda_vl.no_such_name  # noqa: B018


def test_plan_plot_points_to_the_lab(tmp_path):
    from corda_vl import CordaConfig, plan

    with pytest.warns(DeprecationWarning, match="plot_ranks"):
        plan(tiny_llama(), CordaConfig(r=4)).plot(tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 0


def test_method_tuples_and_decompose_targets_come_from_the_registry():
    import corda_vl.config as config
    from corda_vl import CordaConfig, build_corda
    from corda_vl.adapters.build import decompose_targets
    from corda_vl.families import detect_family
    from corda_vl.targets import resolve_targets

    with pytest.warns(DeprecationWarning):
        assert set(config.DECOMPOSING) == {"corda", "corda++"} and "lora" in config.METHODS
    model, cfg = tiny_llama(), CordaConfig(method="milora", r=4)
    targets = resolve_targets(model, detect_family(model), None, None, None)
    with pytest.warns(DeprecationWarning, match="decompose_targets"):
        factors, info = decompose_targets(targets, None, cfg, None, progress=False)
    built = build_corda(tiny_llama(), None, cfg, progress=False)
    name = targets[0].name
    assert torch.equal(built.get_base_model().get_submodule(name).lora_A["default"].weight, factors[name][0])
    assert info[name]["rank"] == 4


def test_an_aliased_module_keeps_its_own_spec():
    sys.modules.pop("corda_vl.covariance", None)
    with pytest.warns(DeprecationWarning):
        importlib.import_module("corda_vl.covariance")
    store = importlib.import_module("corda_vl.calibration.store")
    assert store.__spec__.name == "corda_vl.calibration.store"
    assert importlib.reload(store) is store


def test_the_0_1_names_of_moved_helpers_resolve():
    from corda_vl.adapters import decompose_targets
    from corda_vl.adapters.build import decompose_targets as new

    assert decompose_targets is new
    sys.modules.pop("corda_vl.sequential", None)
    with pytest.warns(DeprecationWarning):
        from corda_vl.sequential import blocks_of
    from corda_vl.scaleout.blocks import blocks_of as moved

    assert blocks_of is moved


def test_the_allocation_functions_answer_to_their_0_1_names():
    from corda_vl.decomposition import compactness
    from corda_vl.methods import cordapp

    with pytest.warns(DeprecationWarning, match="allocate is now greedy_ranks"):
        assert compactness.allocate is compactness.greedy_ranks
    with pytest.warns(DeprecationWarning, match="allocate_layers is now ranks_under_budget"):
        assert cordapp.allocate_layers is cordapp.ranks_under_budget
    with pytest.raises(AttributeError):
        compactness.no_such_name  # noqa: B018
