"""The layout's rules, checked on the source: no import cycles, no module importing another's
private names, and the core never importing the retention lab."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("corda_vl", "recipes", "benchmarks")
LAB_ONLY = ("datasets", "matplotlib", "sklearn", "easy_vqa", "countryinfo", "babel", "PIL", "torchvision",
            "open_clip", "timm")
"""Dependencies of the lab extra (and vlm) that the core must not need."""


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in SCANNED for p in sorted((ROOT / top).rglob("*.py"))}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import in ``name``, those inside
    functions and under ``if TYPE_CHECKING:`` included: a cycle through annotations is still a
    cycle to a reader."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, "", node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in modules else (base, alias.name, node.lineno))
    return [(mod, attr, line) for mod, attr, line in out if mod.split(".")[0] in {"corda_vl", *SCANNED}]


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: {mod for mod, _, _ in _imports(name, path, modules) if mod in modules and mod != name}
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_not_even_through_annotations():
    assert _cycles(_graph()) == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = [f"{name}:{line} imports {mod}.{attr}" for name, path in modules.items()
           for mod, attr, line in _imports(name, path, modules)
           if (attr.startswith("_") or mod.rpartition(".")[2].startswith("_")) and mod != name
           ]
    assert bad == []


def test_the_core_never_imports_the_lab():
    modules = _modules()
    bad = [f"{name}:{line} imports {mod}" for name, path in modules.items() if name.startswith("corda_vl")
           and not name.startswith("corda_vl.lab") for mod, _, line in _imports(name, path, modules)
           if mod.startswith("corda_vl.lab")]
    assert bad == []


def test_no_source_file_is_over_600_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > 600}
    assert long == {}


def _site_without_the_lab(where: Path) -> Path:
    """A copy of site-packages made of links to everything but the lab's dependencies (their
    modules and their metadata), so they are as absent as in an environment that never had them."""
    import importlib.metadata
    import site

    hidden_dists = {d for name in LAB_ONLY for d in importlib.metadata.packages_distributions().get(name, [])}
    hidden_dists = {d.lower().replace("-", "_") for d in hidden_dists}
    where.mkdir()
    for source in site.getsitepackages():
        for entry in Path(source).iterdir():
            top = entry.name.split(".")[0]
            dist = entry.name.split("-")[0].lower().replace("-", "_")
            if top in LAB_ONLY or (entry.name.endswith((".dist-info", ".egg-info")) and dist in hidden_dists):
                continue
            if entry.name.endswith(".pth") or (where / entry.name).exists():
                continue
            (where / entry.name).symlink_to(entry)
    return where


def _run(code: str, site_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter that sees only ``site_dir`` and this checkout (-S: no
    site-packages, no .pth files)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(site_dir)])}
    return subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True, env=env,
                          timeout=300)


CORE_ONLY = """
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM
import corda_vl
from corda_vl import CordaConfig, build_corda, collect_covariances, save_corda, load_corda

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)).eval()
ids = torch.randint(0, 64, (4, 16))
with torch.no_grad():
    before = model(ids).logits
store = collect_covariances(model, [{"input_ids": ids}], progress=False)
peft_model = build_corda(model, store, CordaConfig(r=4), progress=False)
with torch.no_grad():
    assert torch.allclose(peft_model(ids).logits, before, atol=1e-4)
save_corda(peft_model, sys.argv[1])
assert load_corda(sys.argv[1]) is not None
hidden = [m for m in sys.modules if m.split(".")[0] in LAB_ONLY_NAMES]
assert not hidden, hidden
assert not [m for m in sys.modules if m.startswith("corda_vl.lab")]
print("core ok")
""".replace("LAB_ONLY_NAMES", repr(set(LAB_ONLY)))


@pytest.fixture(scope="module")
def core_site(tmp_path_factory) -> Path:
    return _site_without_the_lab(tmp_path_factory.mktemp("core") / "site")


def test_the_core_works_without_the_labs_dependencies(core_site, tmp_path):
    result = _run(CORE_ONLY, core_site, str(tmp_path / "adapter"))
    assert result.returncode == 0 and "core ok" in result.stdout, result.stderr[-3000:]


def test_that_environment_really_lacks_the_labs_dependencies(core_site):
    for name in ("datasets", "matplotlib", "PIL", "torchvision"):
        result = _run(f"import {name}\n", core_site)
        assert result.returncode != 0 and "No module named" in result.stderr, (name, result.stderr[-2000:])


def test_the_tests_mirror_the_package():
    folders = {p.relative_to(ROOT / "tests") for p in (ROOT / "tests").rglob("*") if p.is_dir()
               and p.name != "__pycache__" and any(p.glob("test_*.py"))}
    assert folders and all((ROOT / "corda_vl" / folder).is_dir() for folder in folders), folders
