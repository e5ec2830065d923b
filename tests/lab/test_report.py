"""The report writer: results.json schema and round trip, report.md tables, plot.png."""

import json
import math

import pytest

from corda_vl import CordaError, Run, Score, load_results, write_report
from corda_vl.lab.plots import plot_retention
from corda_vl.lab.report import relative_retention, retention_points, task_gain

BENCHMARKS = ("capitals", "wikitext")


def make_run(method, mode="kpm", rank=16, budget=None, task_after=0.9, capitals_after=0.7, ppl_after=13.0,
             scale=None):
    return Run(method=method, mode=mode, rank=rank, budget=budget, trainable_params=12_345,
               task_name="digits", task=Score("acc1", 0.1, task_after),
               retention={"capitals": Score("em", 0.8, capitals_after),
                          "wikitext": Score("perplexity", 12.0, ppl_after)},
               seconds={"calibrate": 1.5, "train": 10.0}, scale=scale)


def make_runs():
    runs = [make_run("corda"), make_run("corda", mode="ipm", task_after=0.95, capitals_after=0.5),
            make_run("corda++", rank=None, budget=100_000),
            make_run("lora", mode=None, capitals_after=0.4, ppl_after=20.0)]
    sweep = [make_run("lora", mode=None, task_after=0.1 + 0.8 * s, capitals_after=0.8 - 0.4 * s,
                      ppl_after=12.0 + 8 * s, scale=s) for s in (0.0, 0.5, 1.0)]
    return runs, sweep


@pytest.fixture
def written(tmp_path):
    runs, sweep = make_runs()
    paths = write_report(tmp_path / "out", "finetune_digits", "tiny-clip", runs + sweep)
    return paths, runs, sweep


def test_files_written_with_exact_schema(written):
    paths, runs, sweep = written
    assert set(paths) == {"results", "report", "plot"} and all(p.is_file() for p in paths.values())
    data = json.loads(paths["results"].read_text())
    assert list(data) == ["recipe", "model", "runs"] and data["recipe"] == "finetune_digits"
    assert len(data["runs"]) == len(runs) + len(sweep)
    base = {"method", "mode", "trainable_params", "task", "retention", "seconds"}
    for run, entry in zip(runs + sweep, data["runs"]):
        size = {"budget"} if run.budget is not None else {"rank"}
        scale = {"scale"} if run.scale is not None else set()
        assert set(entry) == base | size | scale
        assert set(entry["task"]) == {"name", "metric", "before", "after"}
        assert set(entry["retention"]) == set(BENCHMARKS)
        assert all(set(s) == {"metric", "before", "after"} for s in entry["retention"].values())
        assert entry["method"] == run.method and entry["seconds"] == run.seconds
    assert data["runs"][2]["budget"] == 100_000 and data["runs"][0]["rank"] == 16
    assert [e.get("scale") for e in data["runs"][-3:]] == [0.0, 0.5, 1.0]
    assert not list(paths["results"].parent.glob("*.tmp"))  # atomic writes left no temp files


def test_round_trip(written):
    paths, runs, sweep = written
    recipe, model, loaded = load_results(paths["results"])
    assert (recipe, model) == ("finetune_digits", "tiny-clip")
    assert loaded == runs + sweep


def test_non_finite_scores_round_trip_as_null(tmp_path):
    run = make_run("lora", ppl_after=math.inf)
    paths = write_report(tmp_path, "r", "m", [run])
    assert json.loads(paths["results"].read_text())["runs"][0]["retention"]["wikitext"]["after"] is None
    assert math.isnan(load_results(paths["results"])[2][0].retention["wikitext"].after)


def test_markdown_tables(written):
    paths, runs, sweep = written
    text = paths["report"].read_text()
    methods, sweeps = text.split("## Adapter-scale sweeps")
    rows = [line for line in methods.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert len(body) == len(runs)
    assert [row.split("|")[1].strip() for row in body] == [r.method for r in runs]
    for name in BENCHMARKS:
        assert sum(name in col for col in header.split("|")) == 1
    assert all(len(row.split("|")) == len(header.split("|")) for row in body)
    assert "10.0% → 90.0%" in body[0] and "12.00 → 13.00" in body[0] and "budget 100,000" in body[2]
    sweep_rows = [line for line in sweeps.splitlines() if line.startswith("| lora")]
    assert len(sweep_rows) == len(sweep)


def test_plot_png(written):
    paths, _, _ = written
    png = paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sweeps_drawn_as_lines(tmp_path):
    runs, sweep = make_runs()
    drawn = plot_retention(retention_points(runs + sweep[::-1]), tmp_path / "p.png")
    assert [label for label, _, _ in drawn.points] == [r.label for r in runs]
    assert list(drawn.curves) == ["lora r16"]
    curve = drawn.curves["lora r16"]
    assert [s for s, _, _ in curve] == [0.0, 0.5, 1.0]  # sorted by scale along the line
    assert curve[0][1] == pytest.approx(0.0) and curve[0][2] == pytest.approx(1.0)  # scale 0 = base model
    assert curve[-1][1] == pytest.approx(0.8) and curve[-1][2] < 1.0


def test_relative_retention_direction():
    assert relative_retention(Score("acc1", 0.8, 0.4)) == pytest.approx(0.5)
    assert relative_retention(Score("perplexity", 10.0, 20.0)) == pytest.approx(0.5)
    assert relative_retention(Score("eval_loss", 2.0, 1.0)) == pytest.approx(2.0)
    assert task_gain(Score("ppl", 20.0, 15.0)) == pytest.approx(5.0)
    assert task_gain(Score("em", 0.2, 0.5)) == pytest.approx(0.3)
    assert relative_retention(Score("acc1", 0.0, 0.0)) == 1.0
    assert math.isnan(relative_retention(Score("acc1", 0.0, 0.3)))


def _write(tmp_path, data):
    path = tmp_path / "results.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_malformed_refused(written, tmp_path):
    good = json.loads(written[0]["results"].read_text())
    with pytest.raises(CordaError, match="not valid JSON"):
        load_results(_write(tmp_path, '{"recipe": "x", '))
    with pytest.raises(CordaError, match="does not exist"):
        load_results(tmp_path / "missing.json")
    def broken(edit):
        data = json.loads(json.dumps(good))
        edit(data)
        return data

    cases = [
        broken(lambda d: d.pop("model")),
        broken(lambda d: d["runs"][0]["task"].pop("metric")),
        broken(lambda d: d["runs"][0].update(budget=5)),  # rank and budget
        broken(lambda d: d["runs"][1].update(extra=1)),
        broken(lambda d: d["runs"][0]["retention"]["capitals"].update(after="high")),
        broken(lambda d: d["runs"][0].update(trainable_params=1.5)),
        broken(lambda d: d.update(runs={})),
    ]
    for data in cases:
        with pytest.raises(CordaError):
            load_results(_write(tmp_path, data))


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(CordaError, match="no runs"):
        write_report(tmp_path, "r", "m", [])
    with pytest.raises(CordaError, match="not both"):
        make_run("corda++", rank=8, budget=100)


def test_allocated_ranks_round_trip_and_show_in_the_report(tmp_path):
    ranks = {"group": {"language": {"2": 5, "8": 3}}, "projection": {"q_proj": {"8": 3}, "down_proj": {"2": 5}}}
    run = make_run("corda++", rank=None, budget=100_000)
    run.ranks, run.seed, run.lr = ranks, 1, 0.001
    paths = write_report(tmp_path, "r", "m", [run, make_run("lora", mode=None)])
    assert load_results(paths["results"])[2][0].ranks == ranks
    text = paths["report"].read_text()
    assert "## Allocated ranks" in text
    assert "* corda++ kpm budget 100,000 (seed 1, lr 0.001): language: 2×5 8×3; q_proj: 8×3; down_proj: 2×5" in text
