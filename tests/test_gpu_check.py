"""benchmarks/gpu_check.py: its CPU-sized mode runs every stage and writes figures that say the
CUDA paths' checks work (the GPU run itself needs a GPU machine)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
NO_CUDA = "skipped: no CUDA"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--output-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_every_stage_ran_without_errors(tiny_run):
    results, _ = tiny_run
    assert results["tiny"] and results["errors"] == [] and "interrupted" not in results
    assert list(results["stages"]) == ["env", "exactness", "timing", "sequential", "llava", "tests"]
    assert all(stage["status"] == "ok" for stage in results["stages"].values())


def test_exactness_at_init_and_round_trip(tiny_run):
    exact = tiny_run[0]["stages"]["exactness"]
    for kind in ("llama", "clip", "llava"):
        fp32, bf16 = exact[f"{kind}_float32"], exact[f"{kind}_bfloat16"]
        assert fp32["rel_dlogits"] < 1e-4 and fp32["residual_dtype"] == "float32"
        assert bf16["rel_dlogits"] < 0.1 and bf16["residual_dtype"] == "bfloat16"  # bf16 rounding of W - BA
        assert fp32["roundtrip_max_abs_dlogits"] < 1e-6 and bf16["roundtrip_max_abs_dlogits"] < 1e-6
    train = exact["train"]
    assert train["finite"] and len(train["losses"]) == 3 and train["adapter_moved"] > 0
    assert train["precision"] == ("bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")


def test_timing_compares_ours_peft_and_floor(tiny_run):
    timing = tiny_run[0]["stages"]["timing"]
    cuda = torch.cuda.is_available()
    for mode in ("kpm", "ipm"):
        sides = timing[mode]
        assert set(sides["floor"]["parts"]) == {"forward", "gemm", "svd"} and sides["floor"]["flops_xtx"] > 0
        for side in ("ours", "peft"):
            assert sides[side]["seconds"] > 0 and sides[side]["max_abs_dlogits"] < 1e-4
            assert (sides[side]["peak_gib"] == NO_CUDA) != cuda
        assert {"speedup_vs_peft", "ours_over_floor"} <= set(sides["ratios"])
        assert ("added_memory_vs_peft" in sides["ratios"]) == cuda
    xtx = timing["xtx"]
    assert xtx["gramsum_fp32_tflops"] > 0 and xtx["matmul_tflops_measured"] > 0
    assert (xtx["gramsum_fp32_fraction_of_peak"] == NO_CUDA) != cuda


def test_sequential_matches_all_at_once_and_the_plan(tiny_run):
    seq = tiny_run[0]["stages"]["sequential"]
    assert seq["sequential_vs_all"]["max_rel_dBA"] < 1e-5
    assert seq["sequential"]["covariance_peak_gib"] == pytest.approx(seq["predicted"]["covariances_one_block_gib"])
    assert seq["predicted"]["sequential_mixed"] < seq["predicted"]["all_mixed"]
    assert ("peak_over_predicted_mixed" in seq["sequential"]) == torch.cuda.is_available()


def test_llava_image_and_text_covariances_and_allocation(tiny_run):
    llava = tiny_run[0]["stages"]["llava"]
    assert {"calib/image", "calib/text"} <= set(llava["sources"])
    assert set(llava["group_totals"]) == {"vision", "projector", "language"}
    assert llava["trainable"] == pytest.approx(llava["budget"], rel=0.05)


def test_tests_stage_counts_and_markdown(tiny_run):
    results, md = tiny_run
    tests = results["stages"]["tests"]
    assert (tests["passed"], tests["skipped"], tests["failed"], tests["timed_out"]) == (1, 1, 0, False)
    assert "## Targets" in md and all(f"## {name}: ok" in md for name in results["stages"])


def test_budget_skips_stages(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    threads = torch.get_num_threads()  # --tiny on CPU sets one thread; this is the suite's process
    try:
        assert gpu_check.main(["--tiny", "--budget-s", "0", "--stages", "env", "exactness",
                               "--output-dir", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: s["status"] for name, s in results["stages"].items()} == {"env": "skipped: budget",
                                                                              "exactness": "skipped: budget"}


def test_killed_test_run_is_counted_from_its_progress():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    counts = gpu_check.parse_progress("..F.s\n....E [ 40%]\nFAILED tests/a.py::test_x - boom\n")
    assert (counts["passed"], counts["failed"], counts["errors"], counts["skipped"]) == (7, 1, 1, 1)
    assert counts["failed_tests"] == ["tests/a.py::test_x"]
