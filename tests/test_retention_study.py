"""The study definitions parse into their recipes' configs, with the run counts they promise."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "recipes"))
study = pytest.importorskip("retention_study")


@pytest.mark.parametrize("name, runs", [("clip_kpm", 75), ("clip_ipm", 12), ("llama_kpm", 45), ("llava_kpm", 45),
                                        ("clip_kpm_variants", 95), ("llama_kpm_variants", 57)])
def test_each_study_parses_into_its_grid(name, runs):
    recipe, flags = study.STUDIES[name]
    assert study.count_runs(recipe, flags) == runs


def test_a_sitting_is_on_record_from_its_start_and_after_every_run(tmp_path):
    """A sitting killed outright never reaches its end: provenance.json must already say it ran."""
    import json

    def add_run(i):
        run = tmp_path / "runs" / "lora" / "lr0.001_wd0" / f"seed{i}"
        run.mkdir(parents=True)
        (run / "runs.json").write_text(json.dumps([{"seconds": {"train": 2.0, "eval": 1.0}}]))

    add_run(0)
    sitting = study.Sitting(tmp_path, "clip_kpm", "clip_kpm", ["python", "recipes/clip_kpm.py"], total=3)
    on_disk = json.loads((tmp_path / "provenance.json").read_text())
    assert on_disk["sittings"][-1]["runs_at_start"] == 1 and on_disk["sittings"][-1]["finished"] is False
    add_run(1)
    sitting.update()
    on_disk = json.loads((tmp_path / "provenance.json").read_text())
    assert on_disk["sittings"][-1]["runs_done"] == 2 and on_disk["run_seconds"] == {"train": 4.0, "eval": 2.0}
    study.Sitting(tmp_path, "clip_kpm", "clip_kpm", ["python", "recipes/clip_kpm.py"], total=3).update(finished=True)
    sittings = json.loads((tmp_path / "provenance.json").read_text())["sittings"]
    assert len(sittings) == 2 and sittings[-1]["runs_at_start"] == 2 and sittings[-1]["finished"] is True


def _kept_run(folder, setting, task_after):
    import json

    run = folder / "runs" / setting.path
    run.mkdir(parents=True)
    (run / "runs.json").write_text(json.dumps([{"task": {"after": task_after}, "retention": {}, "update": {},
                                                "seconds": {"train": 1.0}}]))
    (run / "items.jsonl").write_text(json.dumps({"benchmark": "letters", "values": [1, 0, 1]}) + "\n")


def test_a_study_reuses_another_studys_runs_only_when_a_rerun_gives_the_same_items(tmp_path, monkeypatch):
    import json

    from corda_vl.lab.experiment import settings
    from corda_vl.lab.identity import identity

    flags = ["--methods", "lora,corda", "--seeds", "0"]
    cfg = study.study_config("clip_kpm", flags)
    lora, corda = settings(cfg)
    src, out, dest = tmp_path / "src", tmp_path / "out", tmp_path / "dest"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(identity(cfg)))
    _kept_run(src, lora, 0.5)
    _kept_run(src, corda, 0.7)
    _kept_run(out, corda, 0.7)  # the check run (CorDA's), as if rerun here: no recipe is launched
    monkeypatch.setitem(study.REUSE, "mine", "other")
    monkeypatch.setattr(study, "results_dir", lambda name: src)
    reused = study.reuse("mine", out, dest, cfg, ["false"])
    assert reused == {"from": "src", "runs": 1, "check_run": corda.path, "check_identical": True}
    assert (out / "runs" / lora.path / "items.jsonl").is_file() and (dest / "runs" / lora.path / "runs.json").is_file()

    (out / "runs" / lora.path / "runs.json").unlink()
    (out / "runs" / corda.path / "items.jsonl").write_text(json.dumps({"benchmark": "letters", "values": [1, 1, 1]}))
    (src / "before_items.jsonl").write_text("base here\n")
    (out / "before_items.jsonl").write_text("base there\n")
    refused = study.reuse("mine", out, dest, cfg, ["false"])
    assert refused["runs"] == 0 and not refused["check_identical"]
    assert refused["differs_in"][0] == "items.jsonl" and "base model" in refused["differs_in"][1]
    assert not (out / "runs" / lora.path / "runs.json").is_file()  # nothing reused

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rank": config["rank"] + 1}))
    with pytest.raises(SystemExit, match="rank"):
        study.reuse("mine", out, dest, cfg, ["false"])
