"""Bootstrap intervals, paired differences and frontiers on data whose answers are known."""

import math

import numpy as np
import pytest

from corda_vl.errors import CordaError
from corda_vl.lab.stats import (Interval, Resample, aggregate, format_interval, interpolate_frontier,
                                matched_task_score, mean_interval, paired_difference, pareto_frontier,
                                percentile_interval, replicates)


def test_aggregate_is_mean_over_seeds_of_weighted_item_means():
    values = np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 0.0]])
    assert aggregate(values) == pytest.approx((0.5 + 0.75) / 2)
    weights = np.array([[3, 1, 1, 1], [1, 1, 1, 1]])
    assert aggregate(values, weights) == pytest.approx((4 / 6 + 0.75) / 2)
    # perplexity: exp of each seed's token-weighted NLL, then the mean over seeds
    assert aggregate(values, weights, "exp") == pytest.approx((math.exp(4 / 6) + math.exp(0.75)) / 2)


def test_aggregate_follows_the_resample():
    values = np.array([[0.0, 1.0], [1.0, 1.0]])
    assert aggregate(values, resample=Resample(np.array([0, 0]), np.array([1, 1]))) == 1.0
    assert aggregate(values, resample=Resample(np.array([0, 0]), np.array([0, 0]))) == 0.0
    assert aggregate(values, resample=Resample(np.array([1, 0]), np.array([0, 0]))) == 0.5


def test_mean_interval_covers_the_truth_at_about_the_binomial_width():
    rng = np.random.default_rng(1)
    values = (rng.random((3, 400)) < 0.36).astype(float)
    iv = mean_interval(values, n_boot=500)
    assert iv.contains(0.36)
    # binomial standard error of 1,200 answers at 36 % is 1.4 points: 95 % half-width about 2.7
    assert 0.015 < iv.half_width < 0.045


def test_seed_noise_widens_the_interval():
    rng = np.random.default_rng(2)
    items = (rng.random(300) < 0.5).astype(float)
    same = np.stack([items, items, items])
    shifted = np.stack([items * 0.8, items, np.minimum(items * 1.2, 1)])  # seeds that disagree
    assert mean_interval(shifted, n_boot=400).half_width > mean_interval(same, n_boot=400).half_width


def test_paired_difference_of_identical_scores_is_exactly_zero():
    rng = np.random.default_rng(3)
    a = (rng.random((3, 200)) < 0.4).astype(float)
    iv = paired_difference(a, a.copy(), n_boot=300)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)


def test_paired_difference_recovers_a_constant_shift_far_tighter_than_two_intervals():
    rng = np.random.default_rng(4)
    base = rng.normal(0, 1, (3, 500))
    iv = paired_difference(base + 0.1, base, n_boot=300)
    assert iv.estimate == pytest.approx(0.1) and iv.low == pytest.approx(0.1) and iv.high == pytest.approx(0.1)
    noisy = paired_difference(base + 0.1 + rng.normal(0, 0.05, base.shape), base, n_boot=300)
    assert noisy.excludes_zero and noisy.contains(0.1)
    # unpaired, the item-to-item spread (sd 1 over 500 items) would hide a 0.1 shift
    assert mean_interval(base + 0.1, n_boot=300).half_width > 0.05 > noisy.half_width


def test_mismatched_shapes_and_bad_input_are_refused():
    with pytest.raises(CordaError, match="same seeds and items"):
        paired_difference(np.zeros((3, 10)), np.zeros((2, 10)))
    with pytest.raises(CordaError, match="weights shape"):
        aggregate(np.zeros((2, 3)), np.ones((2, 4)))
    with pytest.raises(CordaError, match="at least one item"):
        aggregate(np.zeros((2, 0)))
    with pytest.raises(CordaError, match="transform"):
        aggregate(np.zeros((1, 2)), transform="log")


def test_replicates_keep_one_seed_fixed_and_are_reproducible():
    reps = replicates(1, 5, n_boot=20, seed=7)
    assert all(r.seeds.tolist() == [0] for r in reps)
    again = replicates(1, 5, n_boot=20, seed=7)
    assert all((a.items == b.items).all() for a, b in zip(reps, again))


def test_percentile_interval_gives_up_when_most_replicates_are_undefined():
    iv = percentile_interval(1.0, [math.nan] * 6 + [1.0] * 4)
    assert iv.estimate == 1.0 and math.isnan(iv.low) and not iv.excludes_zero
    assert format_interval(iv) == "100.0 [no interval]"
    assert format_interval(Interval(0.523, 0.491, 0.554)) == "52.3 [49.1, 55.4]"
    assert format_interval(Interval(13.5, 13.1, 13.9), 1.0, 2) == "13.50 [13.10, 13.90]"


def test_pareto_frontier_drops_dominated_and_nan_points():
    points = [(0.5, 0.9), (0.6, 0.95), (0.8, 0.7), (0.7, 0.6), (math.nan, 1.0), [0.9, 0.5]]
    assert pareto_frontier(points) == [1, 2, 5]
    assert pareto_frontier([(0.5, 0.5), (0.5, 0.5)]) == [0]  # a tie is one point


def test_interpolation_and_matched_task_score():
    a = [(0.2, 0.9), (0.6, 0.5)]
    assert interpolate_frontier(a, 0.4) == pytest.approx(0.7)
    assert interpolate_frontier(a, 0.2) == pytest.approx(0.9) and interpolate_frontier(a, 0.6) == pytest.approx(0.5)
    assert math.isnan(interpolate_frontier(a, 0.1)) and math.isnan(interpolate_frontier(a, 0.7))  # not measured
    b = [(0.3, 0.8), (0.5, 0.6), (0.9, 0.1)]
    assert matched_task_score(a, b) == pytest.approx(0.6)
    assert math.isnan(matched_task_score(a, [(math.nan, 0.5)]))
    # one point each, the second learning more: no task score at which both were measured
    assert math.isnan(matched_task_score([(0.61, 0.59)], [(0.83, 0.40)]))
    assert matched_task_score([(0.61, 0.59)], [(0.61, 0.40)]) == pytest.approx(0.61)
