"""A recipe folder's identity: --resume continues only the same settings, refused before anything
is written, and the grid may grow."""

import json
from pathlib import Path

import pytest

from corda_vl import CordaError
from corda_vl.lab.identity import FILE, base_model_fingerprint, claim_output_dir, identity
from corda_vl.lab.recipe_config import LlamaRecipeConfig

YAML = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "llama_kpm.yaml"


def config(tmp_path, **overrides):
    return LlamaRecipeConfig.from_yaml(YAML, smoke=True, overrides={"output_dir": str(tmp_path), **overrides})


def files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_same_settings_resume_and_the_grid_may_grow(tmp_path):
    path = claim_output_dir(config(tmp_path), resume=False)
    assert json.loads(path.read_text()) == identity(config(tmp_path))
    # more seeds, methods, rates or another place to keep checkpoints: the same study, continued
    claim_output_dir(config(tmp_path, seeds=[0, 1, 2], methods=["lora", "pissa"], lrs=[1e-3, 2e-3],
                            checkpoint_every=7, save_adapters=False), resume=True)


@pytest.mark.parametrize("change, named", [
    ({"mode": "ipm"}, "mode: 'kpm' -> 'ipm'"),
    ({"task": "sort"}, "task: 'reverse' -> 'sort'"),
    ({"rank": 4}, "rank: 2 -> 4"),
    ({"calib_samples": 4}, "calib_samples:"),
    ({"corda": {"damping": [0.1]}}, "corda: {'damping': [0.01, 0.1, 1.0]} -> {'damping': [0.1]}"),
    ({"threads": 2}, "threads:"),
])
def test_a_changed_setting_is_refused_before_anything_is_written(tmp_path, change, named):
    claim_output_dir(config(tmp_path), resume=False)
    before = files(tmp_path)
    for resume in (True, False):
        with pytest.raises(CordaError, match="Differences") as err:
            claim_output_dir(config(tmp_path, **change), resume=resume)
        assert named in str(err.value)
    assert files(tmp_path) == before


def test_a_folder_from_before_identities_is_accepted_with_a_warning(tmp_path):
    (tmp_path / "runs" / "lora" / "lr0.001_wd0" / "seed0").mkdir(parents=True)
    (tmp_path / "runs" / "lora" / "lr0.001_wd0" / "seed0" / "runs.json").write_text("[]")
    with pytest.warns(UserWarning, match="cannot be checked"):
        claim_output_dir(config(tmp_path), resume=True)
    assert (tmp_path / FILE).is_file()
    with pytest.raises(CordaError, match="rank: 2 -> 4"):  # and from then on, it is checked
        claim_output_dir(config(tmp_path, rank=4), resume=True)


def test_a_base_model_with_other_weights_is_refused_and_an_older_folder_gets_the_fingerprint(tmp_path):
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    claim_output_dir(config(tmp_path), resume=False)  # a folder from before fingerprints
    with pytest.warns(UserWarning, match="predates recording base_model"):
        path = claim_output_dir(config(tmp_path), resume=True, model=model)
    recorded = json.loads(path.read_text())
    assert recorded["base_model"] == base_model_fingerprint(model)
    claim_output_dir(config(tmp_path), resume=True)  # without the model: the settings alone
    assert json.loads(path.read_text()) == recorded
    claim_output_dir(config(tmp_path), resume=True, model=model)
    before = files(tmp_path)
    with torch.no_grad():
        model[0].weight.mul_(1.01)  # another build of the same architecture
    with pytest.raises(CordaError, match="base_model: "):
        claim_output_dir(config(tmp_path), resume=True, model=model)
    assert files(tmp_path) == before


def test_a_changed_engine_default_is_a_changed_setting(tmp_path, monkeypatch):
    import dataclasses

    from corda_vl import CordaConfig
    from corda_vl.lab import identity as identity_module

    claim_output_dir(config(tmp_path), resume=False)
    changed = dataclasses.make_dataclass("Changed", [("damping", tuple, dataclasses.field(default=(0.5,)))],
                                         bases=(CordaConfig,))
    monkeypatch.setattr(identity_module, "CordaConfig", changed)  # a release whose default damping differs
    with pytest.raises(CordaError, match="corda_defaults"):
        claim_output_dir(config(tmp_path), resume=True)


def test_an_older_folder_keeps_its_fingerprint_when_the_defaults_are_added(tmp_path):
    import torch

    model = torch.nn.Linear(4, 4)
    path = claim_output_dir(config(tmp_path), resume=False, model=model)
    recorded = json.loads(path.read_text())
    del recorded["corda_defaults"]  # as written before the defaults were recorded
    path.write_text(json.dumps(recorded))
    with pytest.warns(UserWarning, match="predates recording corda_defaults"):
        claim_output_dir(config(tmp_path), resume=True)  # no model at hand: the fingerprint must stay
    assert json.loads(path.read_text())["base_model"] == base_model_fingerprint(model)
