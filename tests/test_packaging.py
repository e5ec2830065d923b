"""Packaging: every sub-package is declared (assets/ is mapped in, so nothing is auto-found)."""

import tomllib
from pathlib import Path

from corda_vl.resources import load_json_asset

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_declared():
    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"corda_vl." + ".".join(p.parent.relative_to(ROOT / "corda_vl").parts)
             for p in (ROOT / "corda_vl").rglob("__init__.py") if p.parent != ROOT / "corda_vl"}
    assert found | {"corda_vl", "corda_vl.assets"} == declared


def test_assets_are_reachable():
    assert "{name}" in load_json_asset("templates/knowledge.json")["capital_question"]
