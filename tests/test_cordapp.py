"""CorDA++ maths: the compactness metric, selection and the greedy rank allocation (pure functions)."""

import math
from dataclasses import replace

import pytest
import torch

from corda_vl import CordaError
from corda_vl.cordapp import RankRequest, allocate, compactness, context_profile, select_best
from corda_vl.decompose import co_svd, damp_covariance, eigen_range


def test_hand_computed_case():
    s, lam = torch.tensor([4.0, 2.0, 1.0, 1.0]), [1.0, 4.0]  # sqrt(kappa) = 2
    # KPM r=1 freezes the top 3 (sum 7) against a tail of 1: 7 / (7 + 2 * 1)
    assert compactness(s, lam, 1, "kpm") == pytest.approx(7 / 9)
    # IPM r=1 trains the top 1 (4) against the rest (4): 4 / (4 + 2 * 4)
    assert compactness(s, lam, 1, "ipm") == pytest.approx(1 / 3)
    # DESIGN.md's worst-case ratio rho = (tail / head) * sqrt(kappa) gives the same ordering: 1 / (1 + rho)
    rho = (1 / 7) * 2
    assert compactness(s, lam, 1, "kpm") == pytest.approx(1 / (1 + rho))


def test_profile_is_a_monotone_share():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(20, generator=g) ** 4
    profile = context_profile(s, torch.rand(30, generator=g) + 0.1)
    assert profile[0] == 0 and profile[-1] == pytest.approx(1.0)
    assert (profile.diff() >= 0).all()
    # the order the singular values come in does not matter, nor eigenvalues between the extremes
    lam = torch.tensor([0.1, 0.5, 1.1])
    torch.testing.assert_close(context_profile(s, lam), context_profile(s[torch.randperm(20, generator=g)], lam[[0, 2]]))


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_invariant_to_scaling_w_and_c(mode):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(24, 16, generator=g, dtype=torch.float64)
    X = torch.randn(200, 16, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    C = X.T @ X / 200

    def score(w, c, normalize):
        cov = damp_covariance(c, (1e-4,), normalize=normalize)
        return compactness(co_svd(w, cov, 4, mode, svd="full").singular_values, eigen_range(cov), 4, mode)

    ref = score(W, C, True)
    for normalize in (True, False):  # the metric needs no normalisation to be invariant
        assert score(7.5 * W, C, normalize) == pytest.approx(ref, rel=1e-9)
        assert score(W, 0.003 * C, normalize) == pytest.approx(ref, rel=1e-9)


def test_worse_conditioning_lowers_the_score():
    s = torch.linspace(1, 0.01, 16)
    for mode in ("kpm", "ipm"):
        assert compactness(s, [1, 10], 4, mode) > compactness(s, [1, 1000], 4, mode)


def test_kpm_and_ipm_prefer_different_spectra():
    """KPM wants little context in the tail it trains; IPM wants much in the head it trains."""
    steep = torch.cat([torch.full((4,), 10.0), torch.full((28,), 1e-3)])  # context in 4 directions
    flat = torch.ones(32)
    assert compactness(steep, [1, 1], 4, "kpm") > compactness(flat, [1, 1], 4, "kpm")
    assert compactness(steep, [1, 1], 4, "ipm") > compactness(flat, [1, 1], 4, "ipm")
    # a middle-heavy spectrum: poor head (IPM) but a tiny tail (KPM)
    middle = torch.cat([torch.ones(8), torch.full((20,), 5.0), torch.full((4,), 1e-4)]).sort(descending=True).values
    assert compactness(middle, [1, 1], 4, "kpm") > compactness(flat, [1, 1], 4, "kpm")
    assert compactness(middle, [1, 1], 4, "ipm") < compactness(steep, [1, 1], 4, "ipm")


def test_eigen_range_matches_an_eigendecomposition():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.logspace(1, -3, 96, dtype=torch.float64)
    cov = damp_covariance(X.T @ X / 400, (1e-4, 1e-2))
    lam = torch.linalg.eigvalsh(cov.matrix)
    lo, hi = eigen_range(cov)
    assert lo == pytest.approx(float(lam[0]), rel=1e-2) and lo >= float(lam[0]) * (1 - 1e-9)
    assert hi == pytest.approx(float(lam[-1]), rel=1e-6) and hi <= float(lam[-1]) * (1 + 1e-9)
    assert eigen_range(cov) == (lo, hi)  # deterministic


def test_select_best_and_ties():
    assert select_best({"calib": 0.5, "calib/image": 0.7, "calib/text": 0.6}) == "calib/image"
    assert select_best({"calib": 0.7, "calib/split0": 0.7}) == "calib"  # first listed wins a tie
    with pytest.raises(CordaError):
        select_best({})


def _request(name, s, mode="kpm", dims=64, nominal=4, low=1, high=16, lam=(1.0, 1.0)):
    return RankRequest(name, mode, dims, nominal, low, high, tuple(context_profile(s, lam).tolist()))


STEEP = torch.cat([torch.full((4,), 10.0), torch.full((28,), 1e-3)])
FLAT = torch.ones(32)


def test_kpm_gives_rank_where_the_tail_is_empty_ipm_where_the_head_is_full():
    # budget of 10 units of rank per layer on average... here 20 in all, floors 1, caps 16
    for mode, expect in (("kpm", {"steep": 16, "flat": 4}), ("ipm", {"steep": 4, "flat": 16})):
        reqs = [_request("steep", STEEP, mode), _request("flat", FLAT, mode)]
        assert allocate(reqs, budget=20 * 64) == expect, mode


def test_rank_moves_away_from_badly_conditioned_layers():
    reqs = [_request("calm", FLAT, lam=(1, 1)), _request("stiff", FLAT, lam=(1, 1e4))]
    ranks = allocate(reqs, budget=8 * 64)
    assert ranks["calm"] > ranks["stiff"]


def test_budget_bounds_determinism():
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(12):
        m = int(torch.randint(8, 40, (1,), generator=g))
        s = torch.rand(m, generator=g) ** float(torch.rand(1, generator=g) * 6)
        dims = m + int(torch.randint(m, 3 * m, (1,), generator=g))
        reqs.append(_request(f"l{i}", s, "kpm", dims, 4, 2, m - 1, (1.0, float(torch.rand(1, generator=g) * 100 + 1))))
    for mode, step in (("kpm", 1), ("kpm", 3), ("ipm", 1), ("ipm", 3)):
        reqs = [replace(r, mode=mode) for r in reqs]
        budget = sum(4 * r.params_per_rank for r in reqs)
        ranks = allocate(reqs, budget, step)
        used = sum(ranks[r.name] * r.params_per_rank for r in reqs)
        assert budget <= used < budget + step * max(r.params_per_rank for r in reqs)
        assert all(r.low <= ranks[r.name] <= r.high < len(r.profile) - 1 for r in reqs)
        assert allocate(list(reqs), budget, step) == ranks


def test_budget_larger_than_the_caps_stops_at_the_caps():
    reqs = [_request("a", FLAT, high=5), _request("b", STEEP, high=3)]
    assert allocate(reqs, budget=10**6) == {"a": 5, "b": 3}


def test_floors_over_budget_and_bad_bounds_are_refused():
    with pytest.raises(CordaError, match="floors"):
        allocate([_request("a", FLAT, low=8)], budget=4 * 64)
    with pytest.raises(CordaError, match="min\\(d_in, d_out\\)"):
        allocate([_request("a", FLAT, high=32)], budget=4 * 64)
    with pytest.raises(CordaError, match="step"):
        allocate([_request("a", FLAT)], budget=4 * 64, step=0)


def test_mixed_modes_split_the_budget_by_nominal_share():
    reqs = [_request("k1", STEEP, "kpm"), _request("k2", FLAT, "kpm"),
            _request("i1", STEEP, "ipm", nominal=8), _request("i2", FLAT, "ipm", nominal=8)]
    ranks = allocate(reqs, budget=24 * 64)
    assert ranks["k1"] + ranks["k2"] == 8 and ranks["i1"] + ranks["i2"] == 16
    assert math.isclose(sum(ranks.values()) * 64, 24 * 64)
