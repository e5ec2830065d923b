"""The CorDA++ paper's metric and the held-out metric (pure functions): hand-computed cases,
scale invariance, the direction of selection, and allocation on constructed spectra."""

import math

import pytest
import torch

from corda_vl.decomposition.compactness import (RankRequest, component_energies, greedy_ranks, heldout_rank_scores,
                                                 log_condition, output_energy, paper_rank_scores, paper_selection)
from corda_vl.decomposition.cosvd import co_svd, components, damp_covariance


def test_log_condition_by_hand_and_scale_free():
    # spectrum 1, 2, 4 (mean 7/3), d_out 4: pi = sqrt(4 * (4 / (7/3))) / (1 / (7/3))
    expected = math.log(math.sqrt(4 * 4 / (7 / 3)) / (3 / 7))
    assert log_condition(1.0, 7 / 3, 4.0, 4) == pytest.approx(expected)
    assert log_condition(10.0, 70 / 3, 40.0, 4) == pytest.approx(expected)  # C times 10: unchanged
    assert log_condition(1.0, 1.0, 1.0, 1) == 0.0  # the identity with one output: pi = 1
    assert log_condition(0.0, 1.0, 2.0, 3) < math.inf  # a singular spectrum is clamped, not infinite


def test_paper_selection_and_allocation_by_hand():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert paper_selection(s, 2.0, 2) == pytest.approx(-2.0 * (1 + 2) / 8)
    scores = paper_rank_scores(s, 2.0, 10)
    # costs: 2 * 1 / (2 + 4 + 8), 2 * 2 / (4 + 8), 2 * 4 / 8; scores = -10 * cumulative cost
    assert scores[:4].tolist() == pytest.approx([0.0, -10 * 2 / 14, -10 * (2 / 14 + 4 / 12), -10 * (2 / 14 + 4 / 12 + 1)])
    for c in (1e-3, 1e3):  # W or C times c scales every singular value: nothing moves
        assert paper_rank_scores(s * c, 2.0, 10)[:4].tolist() == pytest.approx(scores[:4].tolist())
        assert paper_selection(s * c, 2.0, 2) == pytest.approx(paper_selection(s, 2.0, 2))


def test_paper_allocation_grants_the_lowest_cost_first():
    """Two layers, equal parameter cost: a flat spectrum (costly to cut into) and a steep one with a
    tiny tail (cheap). The steep one takes rank until its next component costs more."""
    flat = torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    steep = torch.tensor([100.0, 50.0, 20.0, 1.0, 0.01, 0.001])
    reqs = [RankRequest(name, "kpm", 10, 2, 1, 4, tuple(paper_rank_scores(s, 1.0, 10).tolist()))
            for name, s in (("flat", flat), ("steep", steep))]
    # both start at the floor 1 (20 parameters); next costs: steep 0.01/171, 1/170, 20/150 for
    # r = 2..4 (its cap), flat 5/20 for r = 2. 10 parameters a step.
    assert greedy_ranks(reqs, budget=40) == {"flat": 1, "steep": 3}
    assert greedy_ranks(reqs, budget=50) == {"flat": 1, "steep": 4}
    assert greedy_ranks(reqs, budget=60) == {"flat": 2, "steep": 4}


def _decompose(weight, cov, r, mode):
    damped = damp_covariance(cov, (1e-6,))
    triplets = co_svd(weight, damped, r, mode, svd="full")
    return components(triplets, damped), triplets.singular_values


def test_component_energies_add_up_to_the_layer_output():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    x = torch.randn(5, 400, generator=gen, dtype=torch.float64)
    h = torch.randn(5, 300, generator=gen, dtype=torch.float64)
    cov, held = x @ x.T / 400, h @ h.T / 300
    parts, _ = _decompose(w, cov, 4, "ipm")  # 4 of the 5 components, then the 5th via kpm
    tail, _ = _decompose(w, cov, 1, "kpm")
    energies = torch.cat([component_energies(parts.S, parts.VhCinv, held), component_energies(tail.S, tail.VhCinv, held)])
    # the damped C' differs from C by 1e-6 of its mean diagonal: W is recovered to that precision
    assert float(energies.sum()) == pytest.approx(output_energy(w, held), rel=1e-5)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_heldout_scores_are_scale_free(mode):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    x = torch.randn(8, 200, generator=gen, dtype=torch.float64)
    h = torch.randn(8, 200, generator=gen, dtype=torch.float64)
    cov, held = x @ x.T / 200, h @ h.T / 200

    def scores(w, cov, held):
        parts, s = _decompose(w, cov, 3, mode)
        return heldout_rank_scores(component_energies(parts.S, parts.VhCinv, held), output_energy(w, held), mode, 6)

    ref = scores(w, cov, held)
    assert ref[0] == pytest.approx(1.0 if mode == "kpm" else 0.0)
    assert ref[4:].tolist() == pytest.approx([float(ref[3])] * 3)  # beyond the kept components: repeated
    for a, b, c in ((7.0, 1.0, 1.0), (1.0, 0.01, 1.0), (1.0, 1.0, 30.0)):
        assert scores(w * a, cov * b, held * c).tolist() == pytest.approx(ref.tolist(), rel=1e-6)


def test_heldout_prefers_the_covariance_whose_subspace_generalises():
    """The inputs live in 8 dimensions. Candidate 'narrow' saw a sample that missed 3 of them (it
    has almost no variance there); 'wide' saw all 8. KPM puts the adapter where the candidate saw
    the least: for 'narrow' those are directions the held-out data does excite, so its adapter
    would carry held-out output. The held-out metric must prefer 'wide'."""
    gen = torch.Generator().manual_seed(2)
    d = 8
    w = torch.randn(d, d, generator=gen, dtype=torch.float64)
    scale = torch.linspace(1.0, 2.0, d, dtype=torch.float64)
    wide = torch.randn(d, 2000, generator=gen, dtype=torch.float64) * scale[:, None]
    narrow = wide[:, :2000].clone()
    narrow[5:] *= 1e-3
    held = torch.randn(d, 2000, generator=gen, dtype=torch.float64) * scale[:, None]
    h = held @ held.T / 2000
    out = {}
    for name, x in (("wide", wide), ("narrow", narrow)):
        parts, s = _decompose(w, x @ x.T / x.shape[1], 3, "kpm")
        out[name] = float(heldout_rank_scores(component_energies(parts.S, parts.VhCinv, h), output_energy(w, h),
                                              "kpm", d - 1)[3])
    assert out["wide"] > out["narrow"] + 0.05
