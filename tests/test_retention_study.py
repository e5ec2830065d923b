"""The study definitions parse into their recipes' configs, with the run counts they promise."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "recipes"))
study = pytest.importorskip("retention_study")


@pytest.mark.parametrize("name, runs", [("clip_kpm", 75), ("clip_ipm", 12), ("llama_kpm", 45), ("llava_kpm", 45),
                                        ("clip_kpm_cordapp", 80)])
def test_each_study_parses_into_its_grid(name, runs):
    recipe, flags = study.STUDIES[name]
    assert study.count_runs(recipe, flags) == runs
