"""CorDA++ maths: the compactness metric, selection and the greedy rank allocation (pure functions)."""

import itertools

import pytest
import torch

from corda_vl import CordaError
from corda_vl.decomposition.compactness import RankRequest, compactness, greedy_ranks, rank_scores, select_best
from corda_vl.decomposition.cosvd import co_svd, damp_covariance, eigen_range


def test_hand_computed_case():
    s, lam = torch.tensor([4.0, 2.0, 1.0, 1.0]), [1.0, 4.0]  # sqrt(kappa) = 2, S = 8
    assert compactness(s, lam, 1, "kpm") == pytest.approx(1 - 2 * 1 / 8)
    assert compactness(s, lam, 2, "kpm") == pytest.approx(1 - 2 * 2 / 8)
    assert compactness(s, lam, 1, "ipm") == pytest.approx(4 / (2 * 8))
    assert compactness(s, lam, 3, "ipm") == pytest.approx(7 / (2 * 8))
    # the order the singular values come in does not matter, nor eigenvalues between the extremes
    assert compactness(s.flip(0), [1.0, 2.5, 4.0], 2, "ipm") == compactness(s, lam, 2, "ipm")


def test_scores_are_lower_bounds_on_the_real_context_shares():
    """The derivation, checked on data: with C = X X^T / n exactly, the share of the summed
    component outputs ||s_i u_i v_i^T C^-1 X|| that the frozen (KPM) or adapted (IPM) components
    carry is never below the score."""
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        d_in, d_out, n = 12, 9, 60
        X = torch.randn(d_in, n, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d_in, dtype=torch.float64)[:, None]
        W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
        C = X @ X.T / n
        U, S, Vh = torch.linalg.svd(W @ C, full_matrices=False)
        norms = S * torch.linalg.solve(C, Vh.T).T.matmul(X).norm(dim=1)  # ||s_i v_i^T C^-1 X||
        lam = torch.linalg.eigvalsh(C)
        m = S.shape[0]
        for r in range(1, m):
            kept = float(norms[: m - r].sum() / norms.sum())  # KPM freezes the top m - r
            assert compactness(S, lam, r, "kpm") <= kept + 1e-12
            captured = float(norms[:r].sum() / norms.sum())  # IPM trains the top r
            assert compactness(S, lam, r, "ipm") <= captured + 1e-12


def test_scores_move_the_way_each_mode_wants():
    g = torch.Generator().manual_seed(1)
    s = torch.rand(20, generator=g) ** 3
    kpm, ipm = rank_scores(s, [0.2, 1.0], "kpm"), rank_scores(s, [0.2, 1.0], "ipm")
    assert kpm[0] == 1.0 and ipm[0] == 0.0
    assert (kpm.diff() <= 0).all() and (ipm.diff() >= 0).all()
    # KPM's costs grow with the rank, IPM's gains shrink: what makes the greedy exact
    assert (kpm.diff().diff() <= 1e-15).all() and (ipm.diff().diff() <= 1e-15).all()
    with pytest.raises(CordaError, match="mode"):
        rank_scores(s, [1, 2], "both")


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
    flat = torch.ones(32)
    heavy_head = torch.cat([torch.full((4,), 10.0), torch.ones(28)])
    light_tail = torch.cat([torch.ones(28), torch.full((4,), 1e-3)])
    assert compactness(light_tail, [1, 1], 4, "kpm") > compactness(heavy_head, [1, 1], 4, "kpm")
    assert compactness(heavy_head, [1, 1], 4, "ipm") > compactness(light_tail, [1, 1], 4, "ipm")
    assert compactness(light_tail, [1, 1], 4, "kpm") > compactness(flat, [1, 1], 4, "kpm")


def test_zero_weight_scores():
    z = torch.zeros(8)
    assert compactness(z, [1, 1], 3, "kpm") == 1.0 and compactness(z, [1, 1], 3, "ipm") == 0.0


def test_eigen_range_matches_an_eigendecomposition():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 96, generator=g, dtype=torch.float64) * torch.logspace(1, -3, 96, dtype=torch.float64)
    cov = damp_covariance(X.T @ X / 400, (1e-4, 1e-2))
    lam = torch.linalg.eigvalsh(cov.matrix)
    lo, hi = eigen_range(cov)
    assert lo == pytest.approx(float(lam[0]), rel=1e-2) and lo >= float(lam[0]) * (1 - 1e-9)
    assert hi == pytest.approx(float(lam[-1]), rel=1e-6) and hi <= float(lam[-1]) * (1 + 1e-9)
    assert eigen_range(cov) == (lo, hi)  # deterministic
    tiny = damp_covariance(torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64), (0.0,), normalize=False)
    assert eigen_range(tiny) == pytest.approx(tuple(torch.linalg.eigvalsh(tiny.matrix).tolist()), rel=1e-12)


def test_select_best_and_ties():
    assert select_best({"calib": 0.5, "calib/image": 0.7, "calib/text": 0.6}) == "calib/image"
    assert select_best({"calib": 0.7, "calib/split0": 0.7}) == "calib"  # first listed wins a tie
    with pytest.raises(CordaError):
        select_best({})


def _request(name, s, mode="kpm", dims=64, nominal=4, low=1, high=16, lam=(1.0, 1.0)):
    return RankRequest(name, mode, dims, nominal, low, high, tuple(rank_scores(s, lam, mode).tolist()))


STEEP = torch.cat([torch.full((4,), 10.0), torch.full((28,), 1e-3)])
FLAT = torch.ones(32)


def test_kpm_gives_rank_where_the_tail_is_empty_ipm_where_the_head_is_full():
    for mode, expect in (("kpm", {"steep": 16, "flat": 4}), ("ipm", {"steep": 4, "flat": 16})):
        reqs = [_request("steep", STEEP, mode), _request("flat", FLAT, mode)]
        assert greedy_ranks(reqs, budget=20 * 64) == expect, mode


def test_rank_moves_away_from_badly_conditioned_layers():
    for mode in ("kpm", "ipm"):
        reqs = [_request("calm", FLAT, mode, lam=(1, 1)), _request("stiff", FLAT, mode, lam=(1, 1e4))]
        assert greedy_ranks(reqs, budget=8 * 64) == {"calm": 7, "stiff": 1}, mode


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_greedy_is_optimal_against_brute_force(mode):
    g = torch.Generator().manual_seed(4)
    for trial in range(6):
        reqs = [_request(f"l{i}", torch.rand(10, generator=g) ** float(1 + 4 * torch.rand(1, generator=g)), mode,
                         dims=20, low=1, high=9, lam=(1.0, float(1 + 50 * torch.rand(1, generator=g))))
                for i in range(3)]
        total = int(torch.randint(4, 24, (1,), generator=g))
        ranks = greedy_ranks(reqs, budget=total * 20)
        best = max(sum(r.value(k) for r, k in zip(reqs, combo))
                   for combo in itertools.product(range(1, 10), repeat=3) if sum(combo) == total)
        assert sum(ranks.values()) == total
        assert sum(r.value(ranks[r.name]) for r in reqs) == pytest.approx(best, abs=1e-12)


def test_budget_bounds_determinism():
    g = torch.Generator().manual_seed(3)
    layers = []
    for i in range(12):
        m = int(torch.randint(8, 40, (1,), generator=g))
        s = torch.rand(m, generator=g) ** float(torch.rand(1, generator=g) * 6)
        dims = m + int(torch.randint(m, 3 * m, (1,), generator=g))
        layers.append((f"l{i}", s, dims, (1.0, float(torch.rand(1, generator=g) * 100 + 1))))
    for mode, step in (("kpm", 1), ("kpm", 3), ("ipm", 1), ("ipm", 3)):
        reqs = [_request(name, s, mode, dims, 4, 2, len(s) - 1, lam) for name, s, dims, lam in layers]
        budget = sum(4 * r.params_per_rank for r in reqs)
        ranks = greedy_ranks(reqs, budget, step)
        used = sum(ranks[r.name] * r.params_per_rank for r in reqs)
        assert budget <= used < budget + step * max(r.params_per_rank for r in reqs)
        assert all(r.low <= ranks[r.name] <= r.high < len(r.scores) - 1 for r in reqs)
        assert greedy_ranks(list(reqs), budget, step) == ranks
        assert len(set(ranks.values())) > 2  # the allocation is not uniform


def test_budget_larger_than_the_caps_stops_at_the_caps():
    reqs = [_request("a", FLAT, high=5), _request("b", STEEP, high=3)]
    assert greedy_ranks(reqs, budget=10**6) == {"a": 5, "b": 3}


def test_floors_over_budget_and_bad_bounds_are_refused():
    with pytest.raises(CordaError, match="floors"):
        greedy_ranks([_request("a", FLAT, low=8)], budget=4 * 64)
    with pytest.raises(CordaError, match="min\\(d_in, d_out\\)"):
        greedy_ranks([_request("a", FLAT, high=32)], budget=4 * 64)
    with pytest.raises(CordaError, match="step"):
        greedy_ranks([_request("a", FLAT)], budget=4 * 64, step=0)


def test_mixed_modes_split_the_budget_by_nominal_share_above_the_floors():
    reqs = [_request("k1", STEEP, "kpm"), _request("k2", FLAT, "kpm"),
            _request("i1", STEEP, "ipm", nominal=8), _request("i2", FLAT, "ipm", nominal=8)]
    ranks = greedy_ranks(reqs, budget=24 * 64)
    # floors 2 + 2; the other 20 units shared 6 : 14 as nominal - floor (8 - 2 : 16 - 2)
    assert ranks["k1"] + ranks["k2"] == 8 and ranks["i1"] + ranks["i2"] == 16
    # a mode whose floors exceed its nominal share still gets them, and the total stays in budget
    reqs = [_request("k", FLAT, "kpm", nominal=1, low=10), _request("i", FLAT, "ipm", nominal=1)]
    assert greedy_ranks(reqs, budget=11 * 64) == {"k": 10, "i": 1}
