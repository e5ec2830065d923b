"""Pure maths of docs/maths.md, checked against independent numpy computations."""

import numpy as np
import pytest
import torch

from corda_vl.decomposition.cosvd import (_short_wide_svd, co_svd, corda_factors, damp_covariance, identity_covariance,
                               subtract_adapter_)
from corda_vl.errors import DecompositionError

DAMPING = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def random_problem(d_out=24, d_in=16, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, d_in, dtype=torch.float64)
    return W, X.T @ X / n


def span_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Largest principal-angle sine between the column spans of a and b."""
    qa, _ = np.linalg.qr(a)
    qb, _ = np.linalg.qr(b)
    return float(np.linalg.norm(qb - qa @ (qa.T @ qb), 2))


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("shape", [(24, 16), (10, 16)])
def test_factors_span_the_selected_co_svd_directions(mode, shape):
    W, C = random_problem(*shape)
    r, s = 4, 2.0
    cov = damp_covariance(C, DAMPING)
    A, B, _ = corda_factors(W, cov, r, mode, s, svd="full")
    # independent: numpy SVD of W C' with C' = (C + lam*mean(diag)*I) / mean(diag C')
    Cn = C.numpy() + cov.damping * np.mean(np.diag(C.numpy())) * np.eye(C.shape[0])
    Cn = Cn / np.mean(np.diag(Cn))
    U, S, Vt = np.linalg.svd(W.numpy() @ Cn)
    keep = slice(0, r) if mode == "ipm" else slice(len(S) - r, len(S))
    # rows of A C' span V_r; columns of B span U_r
    assert span_distance((A.numpy() @ Cn).T, Vt[keep].T) < 1e-8
    assert span_distance(B.numpy(), U[:, keep]) < 1e-8
    # s B A is exactly the selected part U_r S_r V_r^T C'^{-1}
    part = U[:, keep] @ np.diag(S[keep]) @ Vt[keep] @ np.linalg.inv(Cn)
    np.testing.assert_allclose(s * (B @ A).numpy(), part, atol=1e-9)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_residual_plus_adapter_is_the_weight(mode):
    W, C = random_problem()
    A, B, _ = corda_factors(W, damp_covariance(C, DAMPING), 5, mode, 0.5)
    res = subtract_adapter_(W.clone(), A, B, 0.5)
    torch.testing.assert_close(res + 0.5 * B @ A, W, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_row_blocks_round_the_float64_residual_once(dtype):
    """Row blocks of any size give exactly (W - s B A in float64) rounded to W's dtype."""
    g = torch.Generator().manual_seed(4)
    W, A, B = (torch.randn(*shape, generator=g).to(dtype) for shape in ((37, 20), (5, 20), (37, 5)))
    expected = (W.double() - 0.7 * (B.double() @ A.double())).to(dtype)
    for rows in (1, 8, 36, 37, 128):
        assert torch.equal(subtract_adapter_(W.clone(), A, B, 0.7, rows=rows), expected)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_decomposition_is_invariant_to_the_scale_of_c(mode):
    W, C = random_problem()
    ref = corda_factors(W, damp_covariance(C, DAMPING), 4, mode, 1.0, svd="full")
    for c in (1e-6, 37.0, 1e5):
        A, B, _ = corda_factors(W, damp_covariance(C * c, DAMPING), 4, mode, 1.0, svd="full")
        torch.testing.assert_close(A, ref[0], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(B, ref[1], rtol=1e-7, atol=1e-9)


def test_without_normalisation_the_balance_follows_the_scale():
    """The failure the normalisation removes: A shrinks and B grows by sqrt(c)."""
    W, C = random_problem()
    A1, B1, _ = corda_factors(W, damp_covariance(C, DAMPING, normalize=False), 4, "kpm", 1.0)
    A2, B2, _ = corda_factors(W, damp_covariance(C * 100.0, DAMPING, normalize=False), 4, "kpm", 1.0)
    assert B2.norm() / B1.norm() == pytest.approx(10.0, rel=1e-6)
    assert A1.norm() / A2.norm() == pytest.approx(10.0, rel=1e-6)


def test_damping_takes_the_smallest_lambda_that_factorises():
    C = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    damped = damp_covariance(C, (0.0, 1e-3, 1e-1))
    assert damped.damping == 1e-3
    assert damped.scale == pytest.approx(0.5 * (1 + 1e-3))  # mean(diag C'), C' = C + lam * mean(diag C) * I
    expected = (C + 1e-3 * 0.5 * torch.eye(4, dtype=torch.float64)) / damped.scale
    torch.testing.assert_close(damped.matrix, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(damped.cholesky @ damped.cholesky.T, expected, rtol=1e-14, atol=1e-15)
    assert damp_covariance(torch.eye(4, dtype=torch.float64), (0.0, 1e-3)).damping == 0.0


def test_damping_in_place_equals_damping_a_copy():
    """overwrite=True reuses the caller's scratch tensor: the same C' (bit for bit when the first
    lam factorises, to float64 rounding after retries) and the same lam."""
    _, C = random_problem()
    C = (C + C.T) / 2  # exactly symmetric, else damping symmetrises into a new tensor anyway
    scratch = C.clone()
    copy, in_place = damp_covariance(C, DAMPING), damp_covariance(scratch, DAMPING, overwrite=True)
    assert in_place.matrix.data_ptr() == scratch.data_ptr() and copy.matrix.data_ptr() != C.data_ptr()
    assert torch.equal(in_place.matrix, copy.matrix) and in_place.damping == copy.damping == DAMPING[0]
    indefinite = torch.diag(torch.tensor([1.0, 1.0, 0.0, -0.01], dtype=torch.float64))  # lam 0 and 1e-3 fail
    schedule = (0.0, 1e-3, 1e-1, 1.0)
    copy = damp_covariance(indefinite, schedule)
    in_place = damp_covariance(indefinite.clone(), schedule, overwrite=True)
    assert in_place.damping == copy.damping == 1e-1 and in_place.scale == copy.scale
    torch.testing.assert_close(in_place.matrix, copy.matrix, rtol=1e-15, atol=1e-16)
    assert torch.equal(indefinite, torch.diag(torch.tensor([1.0, 1.0, 0.0, -0.01], dtype=torch.float64)))


@pytest.mark.parametrize("where", [(1, 0), (299, 5), (140, 139), (299, 298)])
def test_an_asymmetric_covariance_is_damped_as_its_symmetric_part(where):
    """Wherever the asymmetry sits (first or a later row panel of the symmetry check, next to
    the diagonal or far from it), C' is built from (C + C^T) / 2 and the input is left alone."""
    x = torch.randn(600, 300, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    symmetric = x.T @ x / 600
    symmetric = (symmetric + symmetric.T) / 2
    skewed = symmetric.clone()
    skewed[where] += 0.5
    damped = damp_covariance(skewed, DAMPING)
    expected = damp_covariance((skewed + skewed.T) / 2, DAMPING)
    assert torch.equal(damped.matrix, expected.matrix) and torch.equal(damped.matrix, damped.matrix.T)
    assert not torch.equal(damped.matrix, damp_covariance(symmetric, DAMPING).matrix)
    assert skewed[where] == symmetric[where] + 0.5


def test_singular_at_the_largest_damping_is_a_clear_error():
    C = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(DecompositionError, match="layer.q.*not positive definite.*damping"):
        damp_covariance(C, (0.0,), name="layer.q")


def test_nan_and_zero_covariances_are_errors():
    with pytest.raises(DecompositionError, match="NaN"):
        damp_covariance(torch.full((3, 3), float("nan")), DAMPING)
    with pytest.raises(DecompositionError, match="zero"):
        damp_covariance(torch.zeros(3, 3), DAMPING)


def test_rank_must_be_below_min_dimension():
    W, C = random_problem(8, 16)
    with pytest.raises(DecompositionError, match="rank 8"):
        co_svd(W, damp_covariance(C, DAMPING), 8, "kpm")


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("shape", [(40, 32), (24, 40)])  # tall: right Gram basis; wide: left
def test_fast_paths_agree_with_the_full_svd(mode, shape):
    W, C = random_problem(*shape, n=400)
    cov = damp_covariance(C, DAMPING)
    full = co_svd(W, cov, 6, mode, svd="full")
    auto = co_svd(W, cov, 6, mode, svd="auto")
    assert auto.path == "fast+rr" and full.path == "full"
    others = [(auto, 1e-5, 1e-3)]  # float32 subspace, float64 Rayleigh-Ritz values
    if mode == "ipm":
        others.append((co_svd(W, cov, 6, mode, svd="lowrank", niter=8), 1e-4, 1e-4))
    for other, s_tol, span_tol in others:
        torch.testing.assert_close(other.S, full.S, rtol=s_tol, atol=0)
        assert span_distance(other.Vh.T.numpy(), full.Vh.T.numpy()) < span_tol
        assert span_distance(other.U.numpy(), full.U.numpy()) < span_tol
    assert auto.context_share == pytest.approx(full.context_share, rel=1e-4)


@pytest.mark.parametrize("mode", ["kpm", "ipm"])
@pytest.mark.parametrize("shape", [(40, 32), (24, 40)])
def test_solve_free_factor_equals_the_cholesky_solve(mode, shape):
    """Where the Rayleigh-Ritz basis is a left one, V^T C'^{-1} is taken as S^{-1} U^T W (no solve):
    the same matrix as solving with C', to float64 rounding."""
    W, C = random_problem(*shape, n=400)
    cov = damp_covariance(C, DAMPING)
    auto = co_svd(W, cov, 6, mode, svd="auto")
    if mode == "ipm" or shape[0] < shape[1]:
        assert auto.VhCinv is not None
    if auto.VhCinv is not None:
        solved = cov.solve(auto.Vh.T).T
        torch.testing.assert_close(auto.VhCinv, solved, rtol=1e-9, atol=1e-12 * float(solved.abs().max()))


def test_auto_below_float32_resolution_carries_negligible_context():
    """A tail 1e-9 below the head: float32 cannot order it, the check accepts it only because
    what it carries is measured below sqrt(k) * eps32 of the context."""
    g = torch.Generator().manual_seed(3)
    Q1, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    W = Q1 @ torch.diag(torch.logspace(0, -12, 24, dtype=torch.float64)) @ Q2.T
    cov = damp_covariance(torch.eye(24, dtype=torch.float64), (0.0,))
    auto, full = co_svd(W, cov, 4, "kpm", svd="auto"), co_svd(W, cov, 4, "kpm", svd="full")
    assert full.context_share < 1e-9
    assert auto.context_share < 24 ** 0.5 * torch.finfo(torch.float32).eps
    A, B, _ = corda_factors(W, cov, 4, "kpm", 1.0)
    torch.testing.assert_close(subtract_adapter_(W.clone(), A, B, 1.0) + B @ A, W, atol=1e-14, rtol=0)


def test_auto_falls_back_when_float64_disagrees(monkeypatch):
    import corda_vl.decomposition.cosvd as decompose

    W, C = random_problem(40, 32, n=400)
    cov = damp_covariance(C, DAMPING)
    original = decompose._fast_basis

    def wrong_subspace(m32, r, mode):
        basis, side, s32 = original(m32, r, mode)
        return torch.randn(basis.shape, generator=torch.Generator().manual_seed(0)), side, s32

    monkeypatch.setattr(decompose, "_fast_basis", wrong_subspace)
    for mode in ("kpm", "ipm"):
        auto = co_svd(W, cov, 6, mode, svd="auto")
        full = co_svd(W, cov, 6, mode, svd="full")
        assert auto.path == "full"
        torch.testing.assert_close(auto.S, full.S)


def test_short_wide_svd_equals_lapacks_including_a_zero_singular_value():
    g = torch.Generator().manual_seed(5)
    small = torch.randn(12, 300, generator=g, dtype=torch.float64)
    small[-1] = 0  # rank 11
    u, s, vh = _short_wide_svd(small, 12)
    U, S, Vh = torch.linalg.svd(small, full_matrices=False)
    torch.testing.assert_close(s, S, rtol=1e-12, atol=1e-12)
    signs = torch.sign((vh[:11] * Vh[:11]).sum(1))
    torch.testing.assert_close(vh[:11] * signs[:, None], Vh[:11], rtol=0, atol=1e-10)
    torch.testing.assert_close(u[:, :11] * signs, U[:, :11], rtol=0, atol=1e-10)
    assert torch.equal(vh[11], torch.zeros(300, dtype=torch.float64))
    torch.testing.assert_close(u[:, :11] @ torch.diag(s[:11]) @ vh[:11], small, rtol=0, atol=1e-10)


def test_lowrank_leaves_the_global_rng_alone():
    W, C = random_problem(40, 32, n=400)
    cov = damp_covariance(C, DAMPING)
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    first = co_svd(W, cov, 6, "ipm", svd="lowrank")
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(co_svd(W, cov, 6, "ipm", svd="lowrank").U, first.U)


def test_lowrank_refuses_kpm():
    W, C = random_problem()
    with pytest.raises(DecompositionError, match="KPM"):
        co_svd(W, damp_covariance(C, DAMPING), 4, "kpm", svd="lowrank")


def test_identity_covariance_gives_the_plain_svd():
    W, _ = random_problem()
    A, B, tr = corda_factors(W, identity_covariance(W.shape[1]), 3, "kpm", 1.0)
    S = np.linalg.svd(W.numpy(), compute_uv=False)
    np.testing.assert_allclose(tr.S.numpy(), S[-3:], rtol=1e-10)
    np.testing.assert_allclose(tr.singular_values.numpy(), S, rtol=1e-5)  # all values: float32 (svd='auto')


def test_auto_ipm_adapter_is_not_inflated_by_weak_directions():
    """float32 rounding along weak input directions, amplified by C'^{-1} in A, must not survive."""
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    C = Q @ torch.diag(torch.logspace(2, -5, 48, dtype=torch.float64)) @ Q.T
    W = torch.randn(64, 48, generator=g, dtype=torch.float64)
    cov = damp_covariance(C, (0.0,))
    A_auto, _, auto = corda_factors(W, cov, 8, "ipm", 1.0, svd="auto")
    A_full, _, _ = corda_factors(W, cov, 8, "ipm", 1.0, svd="full")
    assert auto.path == "fast+rr"
    assert float(A_auto.norm() / A_full.norm()) == pytest.approx(1.0, abs=1e-3)


def test_ipm_without_spectrum_finds_the_head_by_a_randomised_basis():
    """corda IPM records only the context share, so its auto path may skip the eigendecomposition:
    with a gap after the head it finds the same triplets as the float64 SVD, and without one it
    still captures all but a sliver of what the exact head carries."""
    _, C = random_problem(48, 40, n=800)
    cov = damp_covariance(C, DAMPING)
    g = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(48, 40, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    S = torch.cat([torch.linspace(10, 5, 6), torch.logspace(-0.5, -3, 34)]).double()
    W = (U * S) @ cov.solve(V).T  # W C' = U S V^T
    full = co_svd(W, cov, 6, "ipm", svd="full")
    fast = co_svd(W, cov, 6, "ipm", svd="auto", spectrum=False)
    assert fast.path == "randomised" and fast.singular_values.shape[0] < 40 and fast.total is not None
    torch.testing.assert_close(fast.S, full.S, rtol=1e-6, atol=0)  # float32 Ritz values (no float64 RR)
    assert span_distance(fast.U.numpy(), full.U.numpy()) < 1e-5
    assert fast.VhCinv.dtype == torch.float64 and fast.U.dtype == torch.float64  # the decomposition dtype
    assert fast.context_share == pytest.approx(full.context_share, rel=1e-6)  # ||M||_F from float32 M
    A, B, _ = corda_factors(W, cov, 6, "ipm", 1.0, spectrum=False)
    A_full, B_full, _ = corda_factors(W, cov, 6, "ipm", 1.0, svd="full")
    torch.testing.assert_close(B @ A, B_full @ A_full, rtol=0, atol=1e-5 * float((B_full @ A_full).abs().max()))
    # no gap: a flat random spectrum is the hard case for a range finder
    W, C = random_problem(40, 32, n=400)
    cov = damp_covariance(C, DAMPING)
    fast, full = co_svd(W, cov, 6, "ipm", spectrum=False), co_svd(W, cov, 6, "ipm", svd="full")
    assert full.context_share * (1 - 1e-4) <= fast.context_share <= full.context_share * (1 + 1e-6)


def test_lowrank_context_share_counts_the_whole_spectrum():
    W, C = random_problem(40, 32, n=400)
    cov = damp_covariance(C, DAMPING)
    low, full = co_svd(W, cov, 6, "ipm", svd="lowrank", niter=8), co_svd(W, cov, 6, "ipm", svd="full")
    assert low.context_share == pytest.approx(full.context_share, rel=1e-6)


def test_ipm_randomised_basis_that_has_not_converged_gives_way_to_the_eigendecomposition():
    """A Gaussian W has a flat spectrum: four power iterations leave Ritz residuals ~0.1 s_i, so the
    head comes from the Gram eigendecomposition and equals the exact one."""
    W = torch.randn(300, 200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = damp_covariance(torch.eye(200, dtype=torch.float64), (0.0,))
    fast, full = co_svd(W, cov, 32, "ipm", spectrum=False), co_svd(W, cov, 32, "ipm", svd="full")
    assert fast.total is None and fast.singular_values.shape[0] == 200  # the whole spectrum: eigh
    assert fast.context_share == pytest.approx(full.context_share, rel=1e-6)


@pytest.mark.parametrize("svd", ["full", "auto"])
@pytest.mark.parametrize("mode", ["kpm", "ipm"])
def test_kept_components_hold_only_their_own_bytes(svd, mode):
    """CorDA++ keeps these for every layer until allocation: they must not pin the full U."""
    from corda_vl.decomposition.cosvd import components

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g), torch.randn(512, 64, generator=g)
    cov = damp_covariance(x.T @ x / 512, (1e-4,))
    parts = components(co_svd(w, cov, 8, mode, svd), cov)
    for tensor in (parts.U, parts.S, parts.VhCinv):
        assert tensor.untyped_storage().nbytes() == tensor.nbytes
    assert parts.U.shape == (96, 8) and parts.VhCinv.shape == (8, 64)
