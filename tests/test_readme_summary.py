"""The README's results block is generated from the benchmark files and cannot drift from them;
the README stays short and cites nothing its readers do not have."""

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
SCRIPT = ROOT / "benchmarks" / "readme_summary.py"


def _load_summary():
    spec = importlib.util.spec_from_file_location("readme_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summary = _load_summary()


def test_readme_block_equals_the_generated_summary():
    block = summary.block_of(README.read_text(encoding="utf-8"))
    assert block == "\n" + summary.render()
    study = summary.block_of(README.read_text(encoding="utf-8"), begin=summary.STUDY_BEGIN, end=summary.STUDY_END)
    assert study == "\n" + summary.overview()
    details = summary.block_of(summary.DETAILS.read_text(encoding="utf-8"), begin=summary.STUDY_BEGIN,
                               end=summary.STUDY_END)
    assert details == "\n" + summary.render_studies()
    assert summary.main(["--check", str(README)]) == 0


def test_summary_figures_come_from_the_results_file():
    data = json.loads(summary.VS_PEFT.read_text())
    kpm = data["results"]["kpm"]
    speedup = kpm["peft"]["seconds"] / kpm["ours"]["seconds"]
    added = kpm["ours"]["added_rss_mb"] / kpm["peft"]["added_rss_mb"]
    row = next(line for line in summary.render().splitlines() if line.startswith("| KPM |") and "e-0" in line)
    assert f"| {speedup:.2f}× |" in row and f"| {added:.2f}× |" in row


def test_check_fails_on_a_stale_block_and_write_repairs_it(tmp_path, capsys):
    details = tmp_path / "results.md"
    details.write_text(summary.DETAILS.read_text(encoding="utf-8"), encoding="utf-8")
    readme = tmp_path / "README.md"
    text = README.read_text(encoding="utf-8")
    stale = text.replace("| KPM | ", "| KPM | 1", 1)
    assert stale != text
    readme.write_text(stale, encoding="utf-8")
    assert summary.main(["--check", str(readme), "--details", str(details)]) == 1
    assert "stale" in capsys.readouterr().err
    assert summary.main(["--write", str(readme), "--details", str(details)]) == 0
    assert readme.read_text(encoding="utf-8") == text
    assert summary.main(["--check", str(readme), "--details", str(details)]) == 0


def test_a_results_file_missing_a_required_key_fails_loudly(tmp_path):
    data = json.loads(summary.VS_PEFT.read_text())
    broken = copy.deepcopy(data)
    del broken["results"]["ipm"]["ours"]["added_rss_mb"]
    path = tmp_path / "results_vs_peft.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(summary.SummaryError, match=r"\['results'\]\['ipm'\]\['ours'\]\['added_rss_mb'\]"):
        summary.render(path)
    # the command line says so and exits non-zero, leaving the README alone
    readme = tmp_path / "README.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    done = subprocess.run([sys.executable, str(SCRIPT), "--results", str(path), "--write", str(readme)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "added_rss_mb" in done.stderr
    assert readme.read_text(encoding="utf-8") == README.read_text(encoding="utf-8")


def test_a_cordapp_file_missing_a_required_key_fails_loudly(tmp_path):
    data = json.loads(summary.CORDAPP[0].read_text())
    del data["best"]["corda++ alloc"]
    path = tmp_path / "results_cordapp.json"
    path.write_text(json.dumps(data))
    with pytest.raises(summary.SummaryError, match=r"\['best'\]\['corda\+\+ alloc'\]"):
        summary.render(summary.VS_PEFT, [path])


def test_markers_must_appear_once_each():
    with pytest.raises(summary.SummaryError, match="exactly one"):
        summary.block_of("no markers here")
    with pytest.raises(summary.SummaryError, match="exactly one"):
        summary.block_of(f"{summary.BEGIN}\n{summary.BEGIN}\n{summary.END}\n")


def test_readme_is_short_and_cites_no_internal_document():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    assert "DESIGN" not in text
    assert not re.search(r"\bissues? \d|#\d", text, re.IGNORECASE), "the README is written for users, not by issue"


def test_readme_links_point_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    links = [target.split("#")[0] for target in re.findall(r"\]\(([^)\s]+)\)", text)]
    local = [link for link in links if link and "://" not in link]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists() and link != "CHANGELOG.md"]
    assert not missing, f"README links to missing files: {missing}"


def _study_folder(root, name="2026-12-05-demo"):
    folder = root / name
    folder.mkdir(parents=True)
    iv = lambda e, lo, hi: {"estimate": e, "low": lo, "high": hi}  # noqa: E731
    study = {"task": "t", "retention": ["r"], "seeds": [0, 1, 2], "items": {"t": 50, "r": 60},
             "metrics": {"t": "acc", "r": "perplexity"}, "base": {"t": 0.1, "r": 13.5},
             "arms": {"lora r4 lr 0.001": {"method": "lora r4", "lr": 0.001, "scale": None,
                                           "scores": {"t": iv(0.6, 0.55, 0.65), "r": iv(14.0, 13.8, 14.2),
                                                      "retention": iv(0.96, 0.95, 0.97)}},
                      "lora r4 lr 0.002": {"method": "lora r4", "lr": 0.002, "scale": None,
                                           "scores": {"t": iv(0.7, 0.65, 0.75), "r": iv(15.0, 14.8, 15.2),
                                                      "retention": iv(0.9, 0.89, 0.91)}},
                      "corda kpm r4 lr 0.001": {"method": "corda kpm r4", "lr": 0.001, "scale": None,
                                                "scores": {"t": iv(0.65, 0.6, 0.7), "r": iv(13.6, 13.5, 13.7),
                                                           "retention": iv(0.98, 0.97, 0.99)}}},
             "matched": [{"method": "corda kpm r4", "reference": "lora r4", "task_score": 0.6, "lrs": [0.001],
                          "difference": iv(0.02, 0.01, 0.03)},
                         {"method": "corda++ kpm r4", "reference": "corda kpm r4", "task_score": float("nan"),
                          "lrs": [0.001], "difference": iv(float("nan"), float("nan"), float("nan"))}]}
    (folder / "study.json").write_text(json.dumps(study))
    (folder / "config.json").write_text(json.dumps({"lr": 0.001}))
    (folder / "provenance.json").write_text(json.dumps({"study": "demo", "command": "python x.py demo",
                                                        "sittings": [{"wall_seconds": 3600, "commit": "abc1234"}],
                                                        "run_seconds": {"eval": 600.0, "train": 2400.0}}))
    return folder


def test_study_block_is_generated_from_the_dated_folders(tmp_path):
    _study_folder(tmp_path)
    block = summary.render_studies(tmp_path)
    assert ("**demo** (`python x.py demo`; 3 seeds; items: t 50, r 60; commit abc1234; 1.0 h of study wall time "
            "(train 40 min, eval 10 min)") in block
    assert "| method | t (acc), lr 0.001 | retention, lr 0.001 |" in block
    assert "| lora r4 | 60.0 [55.0, 65.0] | 0.960 [0.950, 0.970] | – |" in block
    assert "0.900" not in block  # the table shows the recipe's learning rate; the sweep is in study.md
    assert "| corda kpm r4 | 65.0 [60.0, 70.0] | 0.980 [0.970, 0.990] | 0.020 [0.010, 0.030]* at 60.0 (lr 0.001) |" in block
    assert "corda++ kpm r4 − corda kpm r4, retention at matched task score: no overlap." in block
    assert summary.render_studies(tmp_path / "none").count("No retention study") == 1


def test_the_readme_overview_has_a_column_per_kpm_study_and_a_row_per_method(tmp_path):
    _study_folder(tmp_path, "2026-12-05-a")
    second = _study_folder(tmp_path, "2026-12-06-b")
    study = json.loads((second / "study.json").read_text())
    study["matched"].append({"method": "pissa r8", "reference": "lora r8", "task_score": 0.5, "lrs": [0.001],
                             "difference": {"estimate": -0.01, "low": -0.03, "high": 0.01}})
    study["matched"][0]["method"] = "corda kpm r8"  # another rank: still the row 'corda'
    (second / "study.json").write_text(json.dumps(study))
    (second / "provenance.json").write_text(json.dumps({"study": "b", "sittings": []}))
    block = summary.overview(tmp_path)
    assert ("| method | [demo](2026-12-05-a/study.md) (3 seeds) | [b](2026-12-06-b/study.md) (3 seeds) |"
            in block.replace(str(tmp_path) + "/", ""))
    assert "| corda | 0.020 [0.010, 0.030]* | 0.020 [0.010, 0.030]* |" in block
    assert "| pissa | – | -0.010 [-0.030, 0.010] |" in block
    assert block.index("| pissa |") < block.index("| corda++ vs corda | no overlap | no overlap |")
    assert summary.overview(tmp_path / "none").count("No retention study") == 1


def test_an_ipm_study_is_summarised_by_its_convergence(tmp_path):
    folder = _study_folder(tmp_path)
    (folder / "config.json").write_text(json.dumps({"lr": 0.001, "mode": "ipm"}))
    study = json.loads((folder / "study.json").read_text())
    study["convergence"] = [{"arm": "corda ipm r4 lr 0.001", "reference": "lora r4 lr 0.001",
                             "loss": {"ratio": {"estimate": 2.1, "low": 1.9, "high": 2.3}}}]
    (folder / "study.json").write_text(json.dumps(study))
    block = summary.overview(tmp_path)
    assert "| method |" not in block
    assert "(IPM): steps to LoRA's final training loss, LoRA's over the method's: corda 2.10 [1.90, 2.30]×." in block


def test_study_blocks_are_checked_with_the_results_block(tmp_path):
    studies = tmp_path / "results"
    _study_folder(studies)
    readme, details = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text(README.read_text(encoding="utf-8"), encoding="utf-8")
    details.write_text(summary.DETAILS.read_text(encoding="utf-8"), encoding="utf-8")
    flags = ["--studies", str(studies), "--details", str(details)]
    assert summary.main(["--check", str(readme), *flags]) == 1  # a new study: stale
    assert summary.main(["--write", str(readme), *flags]) == 0
    assert "[demo](" in readme.read_text(encoding="utf-8")
    assert "**demo**" in details.read_text(encoding="utf-8") and "**demo**" not in readme.read_text(encoding="utf-8")
    assert summary.main(["--check", str(readme), *flags]) == 0
