"""Packaging: every sub-package is found, and the lab's data files ship with it."""

import tomllib
from pathlib import Path

from setuptools import find_packages

from corda_vl.lab.resources import assets_root, load_json_asset

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_found():
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set(find_packages(str(ROOT), include=include))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "corda_vl").rglob("__init__.py")}
    assert on_disk == found


def test_assets_are_reachable():
    assert "{name}" in load_json_asset("templates/knowledge.json")["capital_question"]


def test_assets_are_declared_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["corda_vl.lab"]
    files = [p for p in Path(str(assets_root())).rglob("*") if p.is_file()]
    assert files and all(any(p.match(g.replace("**/", "")) or p.match(g) for g in globs) for p in files)
