"""Kill -9 at random moments of saving a covariance store, saving an adapter, and training (with
its resume): every kill must leave either the previous complete state or the new one, and the
next write or resume must carry on as if nothing happened.

3 kills per stage by default; ``CORDA_VL_FAULT_KILLS=20 make test`` for the thorough run."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import text_batches

from corda_vl import CovarianceStore, load_corda, save_corda

HERE = Path(__file__).resolve().parent
KILLS = int(os.environ.get("CORDA_VL_FAULT_KILLS", "3"))


def kill_at_random(stage, out, rng, longest):
    """Start the worker, wait for it to start writing, then SIGKILL it after a random delay."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(HERE / "fault_worker.py"), stage, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
    time.sleep(rng.uniform(0.0, longest))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def hidden_leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_a_killed_store_save_leaves_one_complete_version(tmp_path):
    sys.path.insert(0, str(HERE))
    from fault_worker import versions

    expected = [{k: v.clone() for k, v in s.sums.items()} for s in versions("store")]
    rng = random.Random(0)
    for _ in range(KILLS):
        kill_at_random("store", tmp_path, rng, 1.0)
        path = tmp_path / "cov.safetensors"
        if not path.exists():  # killed before the first save finished: nothing, not half of one
            assert not (set(p.name for p in tmp_path.iterdir()) - set(hidden_leftovers(tmp_path)))
            continue
        sums = CovarianceStore.load(path).sums
        assert any(sums.keys() == e.keys() and all(torch.equal(sums[k], e[k]) for k in e) for e in expected)
    versions("store")[0].save(tmp_path / "cov.safetensors")  # the next write clears what the kills left
    assert hidden_leftovers(tmp_path) == []


def test_a_killed_adapter_save_leaves_one_complete_version(tmp_path):
    rng = random.Random(1)
    batch = text_batches(1, seed=9)[0]
    for _ in range(KILLS):
        kill_at_random("save", tmp_path, rng, 1.5)
        if not (tmp_path / "saved").exists():
            continue
        loaded = load_corda(tmp_path / "saved")  # verifies every file against its recorded SHA-256
        assert {m.r["default"] for n, m in loaded.named_modules() if hasattr(m, "lora_A") and m.lora_A} in ({2}, {4})
        with torch.no_grad():
            assert torch.isfinite(loaded(**batch).logits).all()
    sys.path.insert(0, str(HERE))
    from fault_worker import versions

    save_corda(versions("save")[0], tmp_path / "saved", overwrite=True)
    assert hidden_leftovers(tmp_path) == []


def test_training_killed_anywhere_resumes_to_the_uninterrupted_result(tmp_path):
    sys.path.insert(0, str(HERE))
    from fault_worker import ROWS, TRAIN, fresh_lora, loss_fn

    from corda_vl.lab.training import TrainConfig, train, trainable_parameters

    reference = fresh_lora()
    full = train(reference, ROWS, loss_fn, TrainConfig(**TRAIN), tmp_path / "full", progress=False)
    rng = random.Random(2)
    out = tmp_path / "cut"
    for _ in range(KILLS):  # each kill lands in a run that itself resumed from the previous kill
        kill_at_random("train", out, rng, 2.0)
    model = fresh_lora()
    resumed = train(model, ROWS, loss_fn, TrainConfig(**TRAIN), out, resume=True, progress=False)
    assert resumed.losses == full.losses
    want = trainable_parameters(reference)
    assert all(torch.equal(p, want[n]) for n, p in trainable_parameters(model).items())
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(TRAIN["steps"]))
