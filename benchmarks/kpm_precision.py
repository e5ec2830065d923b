"""Why KPM decomposes in float64: what a float32 SVD (PEFT's choice) picks as the KPM tail, and
what our default ``svd="auto"`` picks.

    python benchmarks/kpm_precision.py              # SmolLM2-135M, r = 32, 32 x 256 tokens

For every module, with M = W C' (damped, normalised covariance from country-fact text):

* the exact tail: the r smallest right singular vectors of M from a float64 SVD;
* the float32 tail: the same from a float32 SVD of M (what PEFT computes);
* the auto adapter: ``corda_factors(..., svd="auto")`` (float64 Gram of the float32 M,
  eigendecomposed, then a float64 Rayleigh-Ritz step and check);
* ``context ratio`` = ||M V32||_F / ||M V64||_F, evaluated in float64: how much more of the
  calibration context the float32-chosen adapter directions carry than the exact ones (1 = same);
  ``auto ratio`` = ||B A C'||_F / ||M V64||_F for the auto factors: the part of M the adapter
  really holds (B A C' = M V V^T for a right basis, U U^T M for a left one; measuring the left
  basis by ||M V|| instead would amplify its rounding by s_max / s_min);
* the largest principal angle (sine) between the two r-dimensional subspaces.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from corda_vl import collect_covariances
from corda_vl.config import DEFAULT_DAMPING
from corda_vl.lab.data import country_fact_texts, token_blocks
from corda_vl.decomposition.cosvd import corda_factors, damp_covariance
from corda_vl.lab.models import load_llama


def tail(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(all singular values, the r smallest right singular vectors as columns)."""
    _, s, vh = torch.linalg.svd(M, full_matrices=False)
    return s, vh[-r:].T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--seqs", type=int, default=32)
    args = parser.parse_args()
    model, tok = load_llama()
    store = collect_covariances(model, token_blocks(tok, country_fact_texts(), args.seqs, 256), progress=False)
    rows = []
    damped = {}  # one damped covariance per input, shared by the modules that read it (q/k/v, gate/up)
    for name in store.modules:
        key = store.input_key(name)
        if key not in damped:
            damped = {key: damp_covariance(store.covariance(name), DEFAULT_DAMPING)}
        cov = damped[key]
        weight = model.get_submodule(name).weight.detach()
        M = weight.double() @ cov.matrix
        (s, v64), v32 = tail(M, args.rank), tail(M.float(), args.rank)[1].double()
        v32, _ = torch.linalg.qr(v32)
        exact = (M @ v64).norm()
        ratio = float((M @ v32).norm() / exact)
        A, B, auto = corda_factors(weight, cov, args.rank, "kpm", 1.0, svd="auto")
        auto_ratio = float((B @ A @ cov.matrix).norm() / exact)
        sine = float(torch.linalg.matrix_norm(v32 - v64 @ (v64.T @ v32), ord=2))
        rows.append((name, ratio, auto_ratio, auto.path, sine, float(s[-1] / s[0]), float(exact / s.norm())))
    rows.sort(key=lambda row: row[1])
    for label, column in (("float32 SVD", 1), ("auto", 2)):
        ratios = torch.tensor([r[column] for r in rows])
        print(f"{len(rows)} modules, r={args.rank}: the {label} tail carries more context than the exact tail by a "
              f"factor of median {ratios.median():.6g}, max {ratios.max():.3g}; "
              f"{int((ratios > 2).sum())} modules above 2x, {int((ratios > 10).sum())} above 10x")
    paths = [r[3] for r in rows]
    print(f"auto paths: {({p: paths.count(p) for p in sorted(set(paths))})}")
    angles = torch.tensor([r[4] for r in rows])
    print(f"subspace sine between float32 and float64 tails: median {angles.median():.3g}, "
          f"{int((angles > 0.5).sum())} modules above 0.5")
    print(f"{'module':<40}{'context ratio':>15}{'auto ratio':>12}{'sine':>8}{'s_min/s_max':>13}{'exact share':>13}")
    for name, ratio, auto_ratio, _, sine, cond, share in rows[:3] + rows[-5:]:
        print(f"{name:<40}{ratio:>15.3g}{auto_ratio:>12.6g}{sine:>8.3f}{cond:>13.2e}{share:>13.2e}")


if __name__ == "__main__":
    main()
