"""Pure maths of CorDA: damped Cholesky, context-oriented SVD, KPM/IPM factor split, residual.

No hooks, no PEFT, no module state: tensors in, tensors out.

Notation (DESIGN.md §2): ``W`` is d_out x d_in, ``C`` the d_in x d_in input covariance.

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
from dataclasses import dataclass

import torch

from .errors import DecompositionError


@dataclass
class DampedCovariance:
    """A damped (and optionally normalised) covariance with its Cholesky factor."""

    matrix: torch.Tensor
    cholesky: torch.Tensor
    damping: float
    scale: float
    """mean(diag C') the matrix was divided by (1.0 when not normalised)."""

    @property
    def dim(self) -> int:
        return self.matrix.shape[0]

    def solve(self, rhs: torch.Tensor) -> torch.Tensor:
        """C'^{-1} @ rhs through the Cholesky factor."""
        return torch.cholesky_solve(rhs, self.cholesky)

    def eigenvalues(self) -> torch.Tensor:
        """Ascending eigenvalues of the damped, normalised covariance (used by CorDA++)."""
        return torch.linalg.eigvalsh(self.matrix)


def damp_covariance(
    cov: torch.Tensor,
    damping: tuple[float, ...],
    normalize: bool = True,
    dtype: torch.dtype = torch.float64,
    name: str = "module",
) -> DampedCovariance:
    """Damp ``cov`` with the first lam of ``damping`` that makes it Cholesky-factorisable."""
    c = cov.to(dtype)
    if not torch.equal(c, c.T):
        c = (c + c.T) / 2
    diag = c.diagonal()
    if not torch.isfinite(diag).all():  # x_i NaN/Inf puts NaN/Inf on the diagonal (Cauchy-Schwarz)
        raise DecompositionError(f"{name}: the covariance contains NaN/Inf; recalibrate (see CalibrationError).")
    mean_diag = diag.mean()
    if mean_diag <= 0:
        raise DecompositionError(f"{name}: the covariance is zero (the module only saw zero inputs); "
                                 f"calibrate with data that reaches it or exclude it.")
    for lam in damping:
        damped = c.clone()
        damped.diagonal().add_(lam * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
    else:
        raise DecompositionError(
            f"{name}: the covariance is still not positive definite with damping lam={damping[-1]} "
            f"(schedule {damping}). Calibrate on more, and more varied, tokens, or extend "
            f"CordaConfig.damping with larger values."
        )
    scale = 1.0
    if normalize:
        scale = float(damped.diagonal().mean())
        damped.div_(scale)
        factor.div_(math.sqrt(scale))
    return DampedCovariance(damped, factor, float(lam), scale)


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
    """All singular values, descending (top ones only for svd='lowrank')."""


def _select(k: int, r: int, mode: str) -> slice:
    return slice(0, r) if mode == "ipm" else slice(k - r, k)


def _gram_svd(product: torch.Tensor, r: int, mode: str, tolerance: float) -> CoSVD | None:
    """The selected triplets of ``product`` from an eigendecomposition of its smaller Gram matrix.

    Three times cheaper than a full SVD. Forming the Gram matrix squares the spectrum, so the
    eigenvectors are only accurate where eigenvalues and the gap at the selection boundary stand
    well above the rounding noise ``k * eps * s_max^2``; the subspace error is about noise / gap.
    Returns None (caller falls back to the full SVD) when noise / gap exceeds ``tolerance``.
    """
    d_out, d_in = product.shape
    right = d_in <= d_out  # eigenvectors of M^T M are the right singular vectors
    gram = product.T @ product if right else product @ product.T
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)  # descending, like the SVD
    k = evals.shape[0]
    keep = _select(k, r, mode)
    noise = k * torch.finfo(evals.dtype).eps * evals[0].clamp_min(0)
    boundary = r if mode == "ipm" else k - r  # first index outside / inside the tail
    gap = evals[boundary - 1] - evals[boundary]
    smallest_kept = evals[keep].min()
    if not (noise < tolerance * gap and noise < tolerance * smallest_kept):
        return None
    S = evals.clamp_min(0).sqrt()
    S_r = S[keep]
    if right:
        Vh_r = evecs[:, keep].T
        U_r = (product @ Vh_r.T) / S_r[None, :]
    else:
        U_r = evecs[:, keep]
        Vh_r = (U_r.T @ product) / S_r[:, None]
    return CoSVD(U_r, S_r, Vh_r, S)


def co_svd(
    weight: torch.Tensor,
    cov: DampedCovariance,
    r: int,
    mode: str,
    svd: str = "auto",
    niter: int = 4,
    tolerance: float = 1e-6,
) -> CoSVD:
    """SVD of ``W C'``; keep the r smallest (``mode='kpm'``) or largest (``'ipm'``) triplets.

    ``svd``: 'full' (LAPACK SVD), 'lowrank' (randomised, IPM only) or 'auto': for IPM the Gram
    eigendecomposition when its estimated subspace error is below ``tolerance``, else the full
    SVD; for KPM always the full SVD. Measured on SmolLM2-135M, the smallest singular values of
    W C' sit 1e-6..1e-11 below the largest, far under the Gram matrix's rounding noise (and
    under float32's: a float32 SVD returns an arbitrary mix of the tail directions there).
    """
    d_out, d_in = weight.shape
    if d_in != cov.dim:
        raise DecompositionError(f"weight has d_in={d_in} but the covariance is {cov.dim}x{cov.dim}.")
    if not 0 < r < min(d_out, d_in):
        raise DecompositionError(f"rank {r} must be in [1, min(d_in, d_out)) = [1, {min(d_out, d_in)}).")
    product = weight.to(cov.matrix.dtype) @ cov.matrix
    if svd == "lowrank":
        if mode != "ipm":
            raise DecompositionError("svd='lowrank' returns the largest components; KPM needs svd='full'.")
        q = min(r + 16, min(d_out, d_in))
        U, S, V = torch.svd_lowrank(product, q=q, niter=niter)
        return CoSVD(U[:, :r], S[:r], V[:, :r].T, S)
    if svd == "auto" and mode == "ipm":
        result = _gram_svd(product, r, mode, tolerance)
        if result is not None:
            return result
    U, S, Vh = torch.linalg.svd(product, full_matrices=False)
    keep = _select(S.shape[0], r, mode)
    return CoSVD(U[:, keep], S[keep], Vh[keep], S)


def split_factors(triplets: CoSVD, cov: DampedCovariance, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors (A: r x d_in, B: d_out x r) with ``s B A = U_r S_r V_r^T C'^{-1}``."""
    root = triplets.S.clamp_min(0).sqrt()
    vh_cinv = cov.solve(triplets.Vh.T).T  # V_r^T C'^{-1}, C' symmetric
    inv_sqrt_s = 1.0 / math.sqrt(scaling)
    A = root[:, None] * vh_cinv * inv_sqrt_s
    B = triplets.U * root[None, :] * inv_sqrt_s
    return A, B


def residual_weight(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``W - s B A`` computed in float64 from the factors *as they will be used*, cast last."""
    res = weight.double() - scaling * (B.double() @ A.double())
    return res.to(dtype or weight.dtype)


def corda_factors(
    weight: torch.Tensor,
    cov: DampedCovariance,
    r: int,
    mode: str,
    scaling: float,
    svd: str = "auto",
    niter: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, CoSVD]:
    """A, B (decomposition dtype) and the CO-SVD they came from."""
    triplets = co_svd(weight, cov, r, mode, svd=svd, niter=niter)
    A, B = split_factors(triplets, cov, scaling)
    return A, B, triplets
