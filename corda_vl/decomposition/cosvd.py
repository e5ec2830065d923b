"""Pure maths of CorDA: damped Cholesky, context-oriented SVD, KPM/IPM factor split, residual.

No hooks, no PEFT, no module state: tensors in, tensors out.

Notation (derivations in docs/maths.md): ``W`` is d_out x d_in, ``C`` the d_in x d_in input covariance.

* Damping: ``C' = C + lam * mean(diag C) * I`` with the smallest ``lam`` of a schedule for which a
  float64 Cholesky factorisation succeeds. ``C'^{-1}`` is never formed: we solve with the factor.
* Normalisation: ``C'`` is divided by its mean diagonal. Multiplying C by a constant then changes
  nothing downstream; without it, A shrinks and B grows by sqrt(c) (unbalanced factors whenever
  the calibration activations are large or small).
* CO-SVD: ``W C' = U S V^T``, so ``W = U S (V^T C'^{-1})`` exactly.
* Factors with LoRA scaling s: ``B = U_r S_r^{1/2} / sqrt(s)``, ``A = S_r^{1/2} V_r^T C'^{-1} / sqrt(s)``,
  ``W_res = W - s B A``. KPM takes the r smallest triplets, IPM the r largest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from corda_vl.errors import DecompositionError


@dataclass
class DampedCovariance:
    """A damped (and optionally normalised) covariance with its Cholesky factor."""

    matrix: torch.Tensor
    cholesky: torch.Tensor
    damping: float
    scale: float
    """mean(diag C') the matrix was divided by (1.0 when not normalised)."""
    _single: torch.Tensor | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def float32(self) -> torch.Tensor:
        """C' in float32, cast once and shared by every module that reads this input."""
        if self._single is None:
            self._single = self.matrix.float()
        return self._single

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C'^{-1} @ rhs through the Cholesky factor: two triangular solves (what cholesky_solve
        does, but about 2x faster here for narrow right-hand sides)."""
        half = torch.linalg.solve_triangular(self.cholesky, rhs, upper=False)
        return torch.linalg.solve_triangular(self.cholesky.mT, half, upper=True)


def damp_covariance(
    cov: torch.Tensor,
    damping: tuple[float, ...],
    normalize: bool = True,
    dtype: torch.dtype = torch.float64,
    name: str = "module",
    overwrite: bool = False,
) -> DampedCovariance:
    """Damp ``cov`` with the first lam of ``damping`` that makes it Cholesky-factorisable.

    ``overwrite=True``: ``cov`` is a scratch copy the caller gives away (``store.covariance``
    returns a fresh one); it becomes the damped matrix, saving a d x d copy and a pass. A retry
    at a larger lam then undoes the previous damping in place, equal to damping ``cov`` afresh up
    to float64 rounding.
    """
    c = cov.to(dtype)
    if not _symmetric(cov):  # an exact upcast keeps (a)symmetry: check the input, fewer bytes when narrower
        c = (c + c.T) / 2
    diag = c.diagonal()
    if not torch.isfinite(diag).all():  # x_i NaN/Inf puts NaN/Inf on the diagonal (Cauchy-Schwarz)
        raise DecompositionError(f"{name}: the covariance contains NaN/Inf; recalibrate (see CalibrationError).")
    mean_diag = float(diag.mean())
    if mean_diag <= 0:
        raise DecompositionError(f"{name}: the covariance is zero (the module only saw zero inputs); "
                                 f"calibrate with data that reaches it or exclude it.")
    in_place = overwrite or c is not cov
    held_scale, held_shift = 1.0, 0.0  # c holds C / held_scale + held_shift * I
    for lam in damping:
        # C' / mean(diag C') written in one pass: mean(diag C') = mean(diag C) * (1 + lam)
        scale = mean_diag * (1 + lam) if normalize else 1.0
        if in_place:
            c.diagonal().sub_(held_shift)
            damped = c.div_(scale / held_scale)
        else:
            damped = c / scale
        held_scale, held_shift = scale, lam * mean_diag / scale
        damped.diagonal().add_(held_shift)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
    else:
        raise DecompositionError(
            f"{name}: the covariance is still not positive definite with damping lam={damping[-1]} "
            f"(schedule {damping}). Calibrate on more, and more varied, tokens, or extend "
            f"CordaConfig.damping with larger values."
        )
    return DampedCovariance(damped, factor, float(lam), scale)


def _symmetric(m: torch.Tensor, block: int = 128) -> bool:
    """m == m^T exactly, one row panel against its column panel at a time: comparing m with m.T
    whole reads one side with a stride of a full row, twice as slow for a 1536-wide covariance."""
    return all(torch.equal(m[i:i + block, i:], m[i:, i:i + block].T) for i in range(0, m.shape[0], block))


def identity_covariance(dim: int, dtype: torch.dtype = torch.float64, device=None) -> DampedCovariance:
    """C = I: the CO-SVD becomes the plain SVD of W (data-free MiLoRA / PiSSA-style inits)."""
    eye = torch.eye(dim, dtype=dtype, device=device)
    return DampedCovariance(eye, eye.clone(), 0.0, 1.0)


@dataclass
class CoSVD:
    """The selected singular triplets of W C' plus every singular value that was computed."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    singular_values: torch.Tensor
    """All singular values, descending (top ones only where ``total`` is set: svd='lowrank', and
    corda IPM's randomised auto path)."""
    path: str = "full"
    """How they were computed: 'fast+rr', 'randomised' (corda IPM's converged float32 head),
    'full' or 'lowrank'."""
    VhCinv: torch.Tensor | None = None
    """V^T C'^{-1} when it was obtained without a solve (see :func:`_rayleigh_ritz`)."""
    total: float | None = None
    """||M||_F^2 where ``singular_values`` holds only the top ones."""

    @property
    def context_share(self) -> float:
        """||M V_r||_F / ||M||_F: the part of the calibration context the selected components carry."""
        return context_share(self.S, self.singular_values, self.total)


def context_share(selected: torch.Tensor, singular_values: torch.Tensor, total: float | None = None) -> float:
    """Frobenius share sqrt(sum selected^2 / sum all^2) of a subset of singular values (``total``:
    the sum of all squares, when ``singular_values`` is not the whole spectrum)."""
    total = float(singular_values.double().square().sum()) if total is None else total
    return float(selected.double().square().sum()) ** 0.5 / total ** 0.5


# svd='auto': a fast candidate is kept when float64 confirms it within this relative slack...
AUTO_SLACK = 1e-2


def _select(k: int, r: int, mode: str) -> slice:
    return slice(0, r) if mode == "ipm" else slice(k - r, k)


def _rayleigh_ritz(weight: torch.Tensor, cov: DampedCovariance, basis: torch.Tensor, side: str) -> CoSVD:
    """The best triplets of M = W C' within span(basis), in the covariance's dtype.

    ``side='right'``: basis spans right singular vectors (M Q = U_z S_z W_z^T gives V = Q W_z);
    ``side='left'``: it spans left ones (M^T Q = V_z S_z W_z^T gives U = Q W_z). M is never formed.
    On the left side U^T M = S V^T holds by construction, hence V^T C'^{-1} = S^{-1} U^T W: A
    needs no solve, and rounding in the basis along weak input directions is not amplified by
    C'^{-1} (which a float32 right basis suffers from; docs/maths.md).
    """
    c, w = cov.matrix, weight.to(cov.matrix.dtype)
    q, _ = torch.linalg.qr(basis.to(c.dtype))
    if side == "right":
        u, s, wh = torch.linalg.svd(w @ (c @ q), full_matrices=False)
        return CoSVD(u, s, (q @ wh.T).T, s)
    wtq = w.T @ q
    v, s, wh = torch.linalg.svd(c @ wtq, full_matrices=False)
    return CoSVD(q @ wh.T, s, v.T, s, VhCinv=_over_singular_values((wtq @ wh.T).T, s))


def _over_singular_values(rows: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """S^{-1} rows, with a zero row where s is zero. For a left basis (U^T W C' = S V^T) it gives
    V^T C'^{-1} from rows = U^T W; for a short wide matrix's SVD, V^T from rows = U^T X. A zero
    singular value has a zero row either way (U^T W = 0 there), so A gets a zero row."""
    positive = s > 0
    return torch.where(positive[:, None], rows / torch.where(positive, s, 1)[:, None], 0)


def _fast_basis(m32: torch.Tensor, r: int, mode: str) -> tuple[torch.Tensor, str, torch.Tensor]:
    """(basis of the selected singular subspace, its side, all singular values, descending).

    Both from an eigendecomposition of the smaller Gram matrix of M (M^T M or M M^T), which is
    several times cheaper than an SVD. KPM: float64 Gram of the float32 M (its tail needs
    squared singular values resolved far below float32's eps, which a float32 SVD's tail does not
    give). IPM: float32 (the head is well separated);
    a right basis is mapped to a left one (M V spans U), so A needs no solve.
    """
    right = m32.shape[1] <= m32.shape[0]
    m = m32.double() if mode == "kpm" else m32
    evals, evecs = torch.linalg.eigh(m.T @ m if right else m @ m.T)  # ascending
    values = evals.flip(0).clamp_min(0).sqrt()
    if mode == "kpm":
        return evecs[:, :r], "right" if right else "left", values
    head = evecs[:, -r:]
    return (m32 @ head if right else head), "left", values


# A randomised head is used when every Ritz pair has ||M v_i - s_i u_i|| <= RITZ_TOL * s_i: loose
# enough for real weights' well-separated heads, tight enough to refuse a flat spectrum with no
# head to find (how it was set: docs/performance.md).
RITZ_TOL = 0.05


def _converged(m: torch.Tensor, top: CoSVD) -> bool:
    residual = (m @ top.Vh.T - top.U * top.S).norm(dim=0)
    return bool((residual <= RITZ_TOL * top.S).all())


def _fast_candidate(weight: torch.Tensor, cov: DampedCovariance, r: int, mode: str, spectrum: bool = True,
                    niter: int = 4) -> CoSVD | None:
    """Selected triplets from :func:`_fast_basis`, refined and checked in float64. (For IPM
    without ``spectrum``, first a randomised float32 range finder: top r of r + 16 directions
    after ``niter`` power iterations, ~2x cheaper than the Gram eigendecomposition; where its Ritz
    pairs have converged, see RITZ_TOL, it is returned as it is by :func:`_left_head`.)

    The subspace is refined by a float64 Rayleigh-Ritz step, which also *measures* what the
    selected components carry, ``||M V_r||_F^2``, against the basis's own claim (the sum of its
    selected squared singular values, from M in float32). Kept when
      KPM: carried <= (1 + slack)^2 * claim + k * eps32^2 * ||M||_F^2: the basis was accurate
           where the tail is resolved, and where it lies below float32's resolution of M the
           chosen directions carry less than sqrt(k) * eps32 ~ 3e-6 of the context, so any
           choice among them is equally negligible (the exact float64 tail can only be lower);
      IPM: carried >= (1 - slack)^2 * claim (the head captures what the basis said it would).
    Otherwise None: the caller computes the exact float64 SVD.
    """
    w32 = weight.float()
    m32 = w32 @ cov.float32()
    if mode == "ipm" and not spectrum:
        top = _randomized_top(m32, r, niter)
        if _converged(m32, top):
            return _left_head(w32, top, cov.matrix.dtype)
    basis, side, values = _fast_basis(m32, r, mode)
    total = float(values.double().square().sum())
    triplets = _rayleigh_ritz(weight, cov, basis, side)
    carried = triplets.S.double().square().sum()
    claim = values[_select(values.shape[0], r, mode)].double().square().sum()
    if mode == "kpm":
        noise = values.shape[0] * torch.finfo(torch.float32).eps ** 2 * total
        ok = carried <= (1 + AUTO_SLACK) ** 2 * claim + noise
    else:
        ok = carried >= (1 - AUTO_SLACK) ** 2 * claim
    if not bool(ok):
        return None
    triplets.singular_values, triplets.path = values.to(triplets.S.dtype), "fast+rr"
    return triplets


def _left_head(w32: torch.Tensor, top: CoSVD, dtype: torch.dtype) -> CoSVD:
    """A converged randomised head as it is: its U is already a left Rayleigh-Ritz basis of M
    (the SVD of Q^T M), so V^T C'^{-1} = S^{-1} U^T W needs no solve and s B A = U U^T W.

    No float64 Rayleigh-Ritz: on a left basis it cannot move the span (the only thing s B A
    depends on) and would refine S, which only sets the A/B balance and the recorded context
    share, from float32's ~1e-6 to float64 at the cost of a float64 copy of W per module (see
    docs/performance.md). The residual stays exact: it is taken from the
    factors as they are used (:func:`subtract_adapter_`).
    """
    vh_cinv = _over_singular_values(top.U.T @ w32, top.S)  # W in float32, as cast once for M
    return CoSVD(top.U.to(dtype), top.S.to(dtype), top.Vh.to(dtype), top.singular_values.to(dtype),
                 "randomised", VhCinv=vh_cinv.to(dtype), total=top.total)


def _randomized_top(product: torch.Tensor, r: int, niter: int, oversample: int = 16) -> CoSVD:
    """Randomised top-r SVD (Halko et al.) with its own seeded generator: deterministic, and the
    caller's global RNG stream is left alone."""
    q = min(r + oversample, min(product.shape))
    gen = torch.Generator(device=product.device).manual_seed(0)
    omega = torch.randn(product.shape[1], q, generator=gen, dtype=product.dtype, device=product.device)
    basis, _ = torch.linalg.qr(product @ omega)
    for _ in range(niter):  # one QR per M M^T step, not two: as accurate on real weights
        basis, _ = torch.linalg.qr(product @ (product.T @ basis))
    u, s, vh = _short_wide_svd(basis.T @ product, r)
    total = float(torch.linalg.vector_norm(product)) ** 2  # in the product's dtype: a share needs no more
    return CoSVD(basis @ u[:, :r], s[:r], vh, s, "lowrank", total=total)


def _short_wide_svd(small: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, all S, top-r Vh) of a q x n matrix with q << n, from the eigendecomposition of its
    q x q Gram matrix in float64: V_r^T = U_r^T small / S_r. Several times cheaper than LAPACK's
    SVD of ``small``, and float64 squares keep the head's singular values at float32's own
    accuracy. A zero singular value gets a zero row of V^T (its U column times S is zero either way)."""
    wide = small.double()
    evals, evecs = torch.linalg.eigh(wide @ wide.T)  # ascending
    s, u = evals.flip(0).clamp_min(0).sqrt(), evecs.flip(1)
    vh = _over_singular_values(u[:, :r].T @ wide, s[:r])
    return u.to(small.dtype), s.to(small.dtype), vh.to(small.dtype)


def co_svd(
    weight: torch.Tensor,
    cov: DampedCovariance,
    r: int,
    mode: str,
    svd: str = "auto",
    niter: int = 4,
    spectrum: bool = True,
) -> CoSVD:
    """SVD of ``W C'``; keep the r smallest (``mode='kpm'``) or largest (``'ipm'``) triplets.

    ``svd``: 'full' (LAPACK SVD in the covariance's dtype), 'lowrank' (randomised, IPM only) or
    'auto' (a Gram-eigendecomposition candidate checked in float64, see :func:`_fast_candidate`;
    the full SVD where the check fails). ``spectrum``: ``singular_values`` must hold every
    singular value (CorDA++'s scores need them); with False, IPM's auto path may return only the
    top ones (plus ``total`` = ||M||_F^2 for the context share) and uses a cheaper basis.
    """
    d_out, d_in = weight.shape
    if d_in != cov.dim:
        raise DecompositionError(f"weight has d_in={d_in} but the covariance is {cov.dim}x{cov.dim}.")
    if not 0 < r < min(d_out, d_in):
        raise DecompositionError(f"rank {r} must be in [1, min(d_in, d_out)) = [1, {min(d_out, d_in)}).")
    if svd == "lowrank" and mode != "ipm":
        raise DecompositionError("svd='lowrank' returns the largest components; KPM needs svd='full'.")
    if svd == "auto":
        candidate = _fast_candidate(weight, cov, r, mode, spectrum, niter)
        if candidate is not None:
            return candidate
    product = weight.to(cov.matrix.dtype) @ cov.matrix
    if svd == "lowrank":
        return _randomized_top(product, r, niter)
    U, S, Vh = torch.linalg.svd(product, full_matrices=False)
    keep = _select(S.shape[0], r, mode)
    return CoSVD(U[:, keep], S[keep], Vh[keep], S)


def _lanczos_top(apply, dim: int, steps: int, dtype: torch.dtype, device) -> float:
    """Largest eigenvalue of a symmetric positive operator by Lanczos with full reorthogonalisation
    (seeded start vector: deterministic). Converges on extreme eigenvalues far faster than power
    iteration, and its Ritz value never exceeds the true one."""
    gen = torch.Generator(device=device).manual_seed(0)
    basis = torch.empty(dim, min(steps, dim), dtype=dtype, device=device)
    q = torch.randn(dim, 1, generator=gen, dtype=dtype, device=device)
    basis[:, :1] = q / q.norm()
    alphas, betas = [], []
    for j in range(basis.shape[1]):
        w = apply(basis[:, j:j + 1])
        alphas.append(float(basis[:, j:j + 1].T @ w))
        done = basis[:, :j + 1]
        for _ in range(2):  # twice is enough (Kahan): keeps the basis orthogonal to working precision
            w = w - done @ (done.T @ w)
        beta = float(w.norm())
        if j + 1 == basis.shape[1] or beta <= 1e-12 * abs(alphas[-1]):
            break
        betas.append(beta)
        basis[:, j + 1:j + 2] = w / beta
    n = len(alphas)
    off = torch.tensor(betas[:n - 1], dtype=torch.float64)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(tri)[-1])


def eigen_range(cov: DampedCovariance, steps: int = 30) -> tuple[float, float]:
    """(lambda_min, lambda_max) of the damped covariance, without an eigendecomposition.

    Lanczos on C'^{-1} (two triangular solves with the Cholesky factor per step) for the smallest
    and on C' for the largest: O(d^2) per step instead of a d^3 eigensolver (accuracy and time:
    docs/performance.md). Ritz values lie inside the spectrum, so the condition number is never
    overestimated.
    """
    c = cov.matrix
    lam_min = 1.0 / _lanczos_top(cov.solve, cov.dim, steps, c.dtype, c.device)
    # the top of a covariance spectrum is well separated (outlier features): half the steps do
    lam_max = _lanczos_top(lambda v: c @ v, cov.dim, max(steps // 2, 2), c.dtype, c.device)
    return lam_min, lam_max


@dataclass
class Components:
    """Selected triplets ready to become factors: ``U``, ``S`` and ``V^T C'^{-1}`` (no covariance
    needed any more, so a caller can keep more components than it will use and slice later)."""

    U: torch.Tensor
    S: torch.Tensor
    VhCinv: torch.Tensor

    def take(self, keep: slice) -> "Components":
        return Components(self.U[:, keep], self.S[keep], self.VhCinv[keep])


def _owned(x: torch.Tensor) -> torch.Tensor:
    """``x`` in storage of its own: a slice of a full SVD's U would otherwise keep all of U alive."""
    return x.clone() if x.untyped_storage().nbytes() > x.nbytes else x


def components(triplets: CoSVD, cov: DampedCovariance) -> Components:
    """The kept components in tensors of their own (CorDA++ holds them for every layer until the
    ranks are allocated, so they must not pin the decomposition's work arrays)."""
    vh_cinv = triplets.VhCinv if triplets.VhCinv is not None else cov.solve(triplets.Vh.T).T  # C' symmetric
    return Components(_owned(triplets.U), _owned(triplets.S), _owned(vh_cinv))


def factors_from(parts: Components, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A: r x d_in, B: d_out x r) with ``s B A = U_r S_r V_r^T C'^{-1}``."""
    root = parts.S.clamp_min(0).sqrt()
    inv_sqrt_s = 1.0 / math.sqrt(scaling)
    return root[:, None] * parts.VhCinv * inv_sqrt_s, parts.U * root[None, :] * inv_sqrt_s


def balance_factors(A: torch.Tensor, B: torch.Tensor, how: str = "sigma") -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each component i as (A_i / c_i, B_i * c_i): B A is unchanged, exactly.

    "sigma" keeps the CO-SVD's split (sqrt(sigma) on both sides). "norm" takes
    c_i = sqrt(||A_i|| / ||B_i||) so that ||A_i|| = ||B_i||: A carries C'^{-1}, whose gain along
    weakly-excited input directions makes ||A|| many times a LoRA init (KPM; docs/maths.md) while
    B is tiny; Adam then moves B by ~lr per entry and B A by that much times ||A||. Balanced factors
    have a LoRA-like step size. Components with a zero factor are left alone."""
    if how == "sigma":
        return A, B
    a, b = A.norm(dim=1), B.norm(dim=0)
    c = torch.where((a > 0) & (b > 0), (a / b.clamp_min(torch.finfo(b.dtype).tiny)).sqrt(), torch.ones_like(a))
    return A / c[:, None], B * c[None, :]


def split_factors(triplets: CoSVD, cov: DampedCovariance, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A: r x d_in, B: d_out x r) of the selected triplets."""
    return factors_from(components(triplets, cov), scaling)


def subtract_adapter_(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
                      rows: int = 128) -> torch.Tensor:
    """``W <- W - s B A`` in place, computed in float64 from the factors *as they will be used* and
    rounded to W's dtype once (the subtraction runs in float64, the product's dtype).

    ``rows`` rows of W at a time: the float64 product never exists as a d_out x d_in matrix, so it
    stays in cache and adds no memory (3-4x faster on CPU than the whole product at once).
    """
    A64, B64 = A.to(weight.device, torch.float64), B.to(weight.device, torch.float64)
    for i in range(0, weight.shape[0], rows):
        weight[i:i + rows].sub_(B64[i:i + rows] @ A64, alpha=scaling)
    return weight


def corda_factors(
    weight: torch.Tensor,
    cov: DampedCovariance,
    r: int,
    mode: str,
    scaling: float,
    svd: str = "auto",
    niter: int = 4,
    spectrum: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, CoSVD]:
    """A, B (decomposition dtype) and the CO-SVD they came from (``spectrum``: see :func:`co_svd`)."""
    triplets = co_svd(weight, cov, r, mode, svd=svd, niter=niter, spectrum=spectrum)
    A, B = split_factors(triplets, cov, scaling)
    return A, B, triplets
