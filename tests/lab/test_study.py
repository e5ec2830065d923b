"""The study read back from run folders: means with intervals, paired differences, frontiers and
retention at matched task score, on constructed runs whose answers are known."""

import json

import pytest

from corda_vl.lab.eval.scores import hits, write_items
from corda_vl.lab.report import Run, Score, run_to_dict
from corda_vl.lab.study import compute, smoothed, write_study

N_TASK, N_KEEP = 50, 60
BASE_KEEP = 48  # the base model answers 48 of the 60 retention items


def first(k, n):
    return [i < k for i in range(n)]


def write_run(out, method, lr, seed, task_k, keep_k, losses):
    run_dir = out / "runs" / method.replace("+", "p") / f"lr{lr:g}_wd0" / f"seed{seed}"
    run_dir.mkdir(parents=True)
    items = {"t": hits("acc", first(task_k, N_TASK)), "r": hits("acc", first(keep_k, N_KEEP))}
    write_items(run_dir / "items.jsonl", items)
    run = Run(method=method, mode=None if method == "lora" else "kpm", rank=4, budget=None, trainable_params=10,
              task_name="t", task=Score("acc", 0.0, items["t"].value),
              retention={"r": Score("acc", BASE_KEEP / N_KEEP, items["r"].value)}, seconds={"train": 1.0},
              seed=seed, lr=lr, weight_decay=0.0, update={"fro": lr, "relative": lr * 10}, losses=losses)
    (run_dir / "runs.json").write_text(json.dumps([run_to_dict(run)]))


def write_before(out):
    """The base model: no task item right, BASE_KEEP of the retention items."""
    write_items(out / "before_items.jsonl", {"t": hits("acc", [0] * N_TASK), "r": hits("acc", first(BASE_KEEP, N_KEEP))})


@pytest.fixture
def study_dir(tmp_path):
    """lora and corda at three rates, three seeds: a higher rate learns more and forgets more;
    corda keeps 6 more retention items than lora at every rate and learns the same, and its loss
    falls twice as fast."""
    write_before(tmp_path)
    lora_loss = [1.0 - i / 100 for i in range(100)]
    corda_loss = [max(0.0, 1.0 - i / 50) for i in range(100)]
    for seed in range(3):
        for lr, task_k, keep_k in ((0.001, 20, 40), (0.002, 30, 34), (0.004, 40, 28)):
            write_run(tmp_path, "lora", lr, seed, task_k, keep_k, lora_loss)
            write_run(tmp_path, "corda", lr, seed, task_k, keep_k + 6, corda_loss)
    return tmp_path


def test_arms_pairs_and_matched_retention(study_dir):
    result = compute(study_dir, n_boot=300)
    assert result["seeds"] == [0, 1, 2] and result["items"] == {"t": N_TASK, "r": N_KEEP}
    lora = result["arms"]["lora r4 lr 0.002"]
    assert lora["scores"]["t"]["estimate"] == pytest.approx(30 / N_TASK)
    assert lora["scores"]["r"]["low"] < 34 / N_KEEP < lora["scores"]["r"]["high"]
    assert lora["scores"]["retention"]["estimate"] == pytest.approx(34 / BASE_KEEP)
    pairs = {(p["arm"], p["reference"]): p["difference"] for p in result["paired"]}
    diff = pairs[("corda kpm r4 lr 0.002", "lora r4 lr 0.002")]
    assert diff["t"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}  # the same items right: exactly 0
    assert diff["r"]["estimate"] == pytest.approx(6 / N_KEEP) and diff["r"]["low"] > 0
    assert len(pairs) == 3  # corda against lora at each rate; nothing against itself
    (matched,) = result["matched"]
    assert (matched["method"], matched["reference"]) == ("corda kpm r4", "lora r4")
    assert matched["task_score"] == pytest.approx(40 / N_TASK)
    assert matched["difference"]["estimate"] == pytest.approx(6 / BASE_KEEP)
    assert matched["difference"]["low"] > 0
    conv = {c["arm"]: c for c in result["convergence"]}["corda kpm r4 lr 0.002"]
    # LoRA's final smoothed loss is reached by corda in about half the steps
    target = smoothed(lora_loss := [1.0 - i / 100 for i in range(100)])[-1]
    assert target == pytest.approx(sum(lora_loss[-10:]) / 10)
    assert conv["loss"]["ratio"]["estimate"] == pytest.approx(2.0, rel=0.1)


def test_identical_methods_differ_by_an_interval_around_zero(tmp_path):
    write_before(tmp_path)
    for seed in range(3):
        write_run(tmp_path, "lora", 0.001, seed, 20 + seed, 40 - seed, [1.0])
        write_run(tmp_path, "pissa", 0.001, seed, 20 + seed, 40 - seed, [1.0])
    (pair,) = compute(tmp_path, n_boot=200)["paired"]
    assert pair["difference"]["r"] == {"estimate": 0.0, "low": 0.0, "high": 0.0}


def test_matched_retention_uses_only_the_learning_rates_both_methods_ran(tmp_path):
    """lora's extra rate dominates pissa's only point; a comparison over all of lora's rates would
    charge pissa for a rate it never ran. Same rate, same answers: the difference must be 0."""
    write_before(tmp_path)
    for seed in range(3):
        write_run(tmp_path, "lora", 0.001, seed, 20, 40, [1.0])
        write_run(tmp_path, "lora", 0.004, seed, 30, 46, [1.0])
        write_run(tmp_path, "pissa", 0.001, seed, 20, 40, [1.0])
    (matched,) = compute(tmp_path, n_boot=200)["matched"]
    assert matched["lrs"] == [0.001]
    assert matched["task_score"] == pytest.approx(20 / N_TASK)
    assert matched["difference"]["estimate"] == pytest.approx(0.0)


def test_peft_corda_corda_plus_plus_and_corda_variants_are_paired_with_this_librarys_corda(tmp_path):
    write_before(tmp_path)
    for seed in range(3):
        write_run(tmp_path, "lora", 0.001, seed, 20, 40, [1.0])
        write_run(tmp_path, "corda", 0.001, seed, 25, 46, [1.0])
        write_run(tmp_path, "peft-corda", 0.001, seed, 25, 36, [1.0])
        write_run(tmp_path, "corda++:heldout", 0.001, seed, 25, 46, [1.0])
        write_run(tmp_path, "corda:damping=0.01", 0.001, seed, 25, 46, [1.0])
    result = compute(tmp_path, n_boot=200)
    assert ("corda++:heldout kpm r4", "corda kpm r4") in {(m["method"], m["reference"]) for m in result["matched"]}
    assert ("corda:damping=0.01 kpm r4", "corda kpm r4") in {(m["method"], m["reference"]) for m in result["matched"]}
    pairs = {(p["arm"], p["reference"]): p["difference"] for p in result["paired"]}
    diff = pairs[("peft-corda kpm r4 lr 0.001", "corda kpm r4 lr 0.001")]
    assert diff["r"]["estimate"] == pytest.approx(-10 / N_KEEP) and diff["r"]["high"] < 0
    assert ("peft-corda kpm r4", "corda kpm r4") in {(m["method"], m["reference"]) for m in result["matched"]}


def test_write_study_writes_the_report_and_both_plots(study_dir):
    paths = write_study(study_dir, n_boot=100)
    text = paths["study.md"].read_text()
    assert "lora r4 lr 0.002" in text and "Paired differences" in text and "matched task score" in text
    assert "[" in text and "*" in text  # intervals, and a marked difference that excludes 0
    for name in ("tradeoff.png", "update.png"):
        assert paths[name].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["study.json"].read_text())["task"] == "t"
