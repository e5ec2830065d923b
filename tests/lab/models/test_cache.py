"""Where embedded models are built, and what a build pins and records about its environment."""

import pytest
import torch

from corda_vl.lab.models.cache import build_environment, model_dir, pinned_threads


def test_a_build_runs_on_its_own_thread_count_and_gives_the_callers_back():
    callers = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pinned_threads(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), pinned_threads(2):
            raise RuntimeError("a failed build")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(callers)


def test_the_environment_names_the_libraries_a_build_depends_on():
    env = build_environment()
    assert env["threads"] == torch.get_num_threads()
    assert env["torch"] and env["numpy"] and env["pillow"] and env["transformers"]


def test_models_live_under_the_cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CORDA_VL_CACHE", str(tmp_path))
    assert model_dir("corda-vl-clip") == tmp_path / "models" / "corda-vl-clip"
