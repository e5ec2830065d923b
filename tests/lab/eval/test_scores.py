"""Per-item scores: the value they stand for, and their JSON lines round trip."""

import math

import pytest

from corda_vl import CordaError
from corda_vl.lab.eval.scores import ItemScores, hits, read_items, token_nll, write_items


def test_values_aggregate_to_the_benchmark_score():
    assert hits("em", [True, False, True, True]).value == 0.75
    ppl = token_nll("perplexity", [1.0, 2.0], [30, 10])
    assert ppl.transform == "exp" and ppl.value == pytest.approx(math.exp((30 * 1.0 + 10 * 2.0) / 40))
    ce = token_nll("ce", [1.0, 2.0], [30, 10])
    assert ce.transform is None and ce.value == pytest.approx(1.25)
    assert math.isnan(ItemScores("em", []).value)


def test_items_round_trip_exactly(tmp_path):
    scores = {"task": hits("acc1", [1, 0, 1]), "facts": token_nll("perplexity", [2.5, 1.0 / 3], [7, 9]),
              "general": token_nll("ce", [0.1, 0.2], [4, 5])}
    write_items(tmp_path / "items.jsonl", scores)
    back = read_items(tmp_path / "items.jsonl")
    assert back == scores and list(back) == list(scores)
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 3  # one line per benchmark


def test_bad_items_are_refused(tmp_path):
    with pytest.raises(CordaError, match="weights"):
        ItemScores("ce", [1.0, 2.0], [1.0])
    with pytest.raises(CordaError, match="transform"):
        ItemScores("ce", [1.0], transform="log")
    (tmp_path / "bad.jsonl").write_text('{"benchmark": "x"}\n')
    with pytest.raises(CordaError, match="bad.jsonl:1"):
        read_items(tmp_path / "bad.jsonl")
