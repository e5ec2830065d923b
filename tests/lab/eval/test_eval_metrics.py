"""Metric functions against hand-computed cases; retention and ZSCL summaries."""

import math

import pytest
import torch

from corda_vl.lab.eval.metrics import (
    exact_match,
    mean_per_class_recall,
    normalize_answer,
    perplexity,
    relative_retention,
    topk_accuracy,
    zscl_metrics,
)
from corda_vl.lab.eval.retention import evaluate_retention, mean_relative_retention


def test_normalisation_and_exact_match():
    assert normalize_answer("  The Paris! ") == "paris"
    assert normalize_answer("An apple, a day") == "apple day"
    assert exact_match("the paris.", "Paris")
    assert exact_match("Kyiv", ["Kiev", "Kyiv"])
    assert not exact_match("Paris, France", "Paris")
    assert not exact_match("", "Paris")


def test_topk_and_per_class_recall():
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1]])
    labels = torch.tensor([0, 2, 2, 1])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(2 / 4)  # rows 0, 2
    assert topk_accuracy(logits, labels, 2) == pytest.approx(4 / 4)
    assert topk_accuracy(logits, labels, 5) == 1.0  # k above the class count = all classes
    pred = logits.argmax(1)  # [0, 1, 2, 0]
    # class 0: 1/1, class 1: 0/1, class 2: 1/2 -> mean 0.5
    assert mean_per_class_recall(pred, labels) == pytest.approx(0.5)


def test_perplexity_and_relative_retention():
    assert perplexity(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert relative_retention("exact_match", 0.5, 0.4) == pytest.approx(0.8)
    assert relative_retention("perplexity", 10.0, 12.5) == pytest.approx(0.8)  # lower is better


def test_zscl_hand_computed():
    # rows: after learning task 0, 1, 2; columns: tasks 0, 1, 2
    m = [[0.9, 0.2, 0.3],
         [0.8, 0.7, 0.4],
         [0.6, 0.5, 0.9]]
    out = zscl_metrics(m)
    # transfer: task 1 <- row 0 (0.2); task 2 <- rows 0, 1 (0.3, 0.4) -> 0.35; mean 0.275
    assert out["transfer"] == pytest.approx(0.275)
    assert out["avg"] == pytest.approx(sum(map(sum, m)) / 9)
    assert out["last"] == pytest.approx((0.6 + 0.5 + 0.9) / 3)
    with pytest.raises(ValueError, match="square"):
        zscl_metrics([[1.0, 2.0]])


def test_evaluate_retention():
    before = {"capitals": {"exact_match": 0.5, "loglik_accuracy": 0.8}, "wiki": {"perplexity": 10.0}}
    after = {"capitals": {"exact_match": 0.25, "loglik_accuracy": 0.8}, "wiki": {"perplexity": 20.0}}
    out = evaluate_retention(before, after)
    assert out["capitals"]["exact_match"] == {"before": 0.5, "after": 0.25, "delta": -0.25, "relative": 0.5}
    assert out["wiki"]["perplexity"]["relative"] == pytest.approx(0.5)
    assert mean_relative_retention(out) == pytest.approx(0.5)
    assert mean_relative_retention(out, {"capitals": "loglik_accuracy"}) == pytest.approx(0.75)
    with pytest.raises(KeyError, match="wiki"):
        evaluate_retention(before, {"capitals": after["capitals"]})
