"""Pure maths of CorDA++: the compactness metric, covariance selection and rank allocation.

No hooks, no PEFT, no modules: numbers in, numbers out (the orchestration is in allocation.py).

Compactness: how much of a layer's calibration context is guaranteed to sit in its principal
components. Write the calibration inputs as ``X`` (d_in x n, ``X X^T = n C``) and the CO-SVD
``W C = U S V^T``. Since ``W = U S V^T C^{-1}``, component i maps the data to
``s_i u_i v_i^T C^{-1} X``, whose norm is ``s_i sqrt(n v_i^T C^{-1} v_i)``; with unit ``v_i`` that
lies in ``[s_i / sqrt(lam_max), s_i / sqrt(lam_min)] * sqrt(n)``. So, of the summed component
outputs, the top k components carry at least

    T(k) = P_k / (P_k + sqrt(kappa) * (P_m - P_k)),   P_k = s_1 + ... + s_k,  kappa = lam_max / lam_min

(their norms at their smallest, the rest at their largest). ``T`` depends on the singular values
of W C' and the extreme eigenvalues of the damped C' only; it is dimensionless, unchanged when W
or C is multiplied by a constant (all s_i scale together, kappa does not change), and so comparable
across vision, projector and language layers. It equals 1 / (1 + rho) with DESIGN.md's worst-case
ratio rho = (tail sum / head sum) * sqrt(kappa), but stays in [0, 1], so shares of different
layers can be added up by the rank allocation.

One function drives both modes; what differs is which components the adapter gets:

* KPM trains the r smallest components and freezes the top k = m - r: the score is T(m - r),
  the context guaranteed to stay frozen (higher = less knowledge exposed to training);
* IPM trains the top k = r: the score is T(r), the context guaranteed to be in the adapter
  (higher = the adapter holds more of the task).

Allocation maximises the sum of the layers' scores under a parameter budget: more rank lowers a
KPM layer's score (cost) and raises an IPM layer's (gain); each step goes to the layer with the
best change per trainable parameter.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import CordaError


def context_profile(singular_values: torch.Tensor, eigenvalues: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """``T(k)`` for k = 0..m (float64): the worst-case share of context in the top k components.

    ``singular_values``: all singular values of W C' (any order); ``eigenvalues``: eigenvalues of
    the damped C' (all of them, or just (lam_min, lam_max)).
    """
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten().clamp_min(0).sort(descending=True).values
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    lam_min, lam_max = float(lam.min()), float(lam.max())
    if not lam_min > 0:
        raise CordaError(f"the damped covariance must be positive definite (smallest eigenvalue {lam_min}).")
    root_kappa = math.sqrt(lam_max / lam_min)
    prefix = torch.cat([s.new_zeros(1), s.cumsum(0)])
    total = prefix[-1]
    if total == 0:  # W C' = 0: no context anywhere; every split is equally (trivially) compact
        return torch.ones_like(prefix)
    return prefix / (prefix + root_kappa * (total - prefix))


def frozen_top(m: int, r: int, mode: str) -> int:
    """How many top components the score counts: KPM freezes the top m - r, IPM trains the top r."""
    if mode not in ("kpm", "ipm"):
        raise CordaError(f"mode={mode!r} is not 'kpm' or 'ipm'.")
    return m - r if mode == "kpm" else r


def compactness(singular_values: torch.Tensor, eigenvalues: Sequence[float] | torch.Tensor, r: int, mode: str) -> float:
    """CorDA++ compactness of a layer adapted at rank ``r`` in ``mode`` (higher is better).

    KPM: the worst-case share of the calibration context that stays in the frozen principal
    components; IPM: the worst-case share the adapter's principal components carry. See the
    module docstring for the derivation and invariances.
    """
    profile = context_profile(singular_values, eigenvalues)
    m = profile.shape[0] - 1
    if not 0 <= r <= m:
        raise CordaError(f"rank {r} is outside [0, {m}] for {m} singular values.")
    return float(profile[frozen_top(m, r, mode)])


def select_best(scores: Mapping[str, float]) -> str:
    """The candidate with the highest compactness; ties go to the first listed (deterministic)."""
    if not scores:
        raise CordaError("no candidate covariance to select from.")
    return max(scores, key=lambda name: (scores[name], -list(scores).index(name)))


@dataclass(frozen=True)
class RankRequest:
    """One layer as the allocator sees it."""

    name: str
    mode: str
    params_per_rank: int
    """d_in + d_out: trainable parameters one unit of rank costs."""
    nominal: int
    """The rank it would get without allocation (its share of the default budget)."""
    low: int
    high: int
    profile: tuple[float, ...]
    """context_profile(...) as floats, length min(d_in, d_out) + 1."""

    def value(self, r: int) -> float:
        return self.profile[frozen_top(len(self.profile) - 1, r, self.mode)]


def _grant(req: RankRequest, r: int, step: int) -> tuple[int, float]:
    """(rank added, change of score per parameter) for the next step of ``req`` at rank ``r``."""
    add = min(step, req.high - r)
    return add, (req.value(r + add) - req.value(r)) / (add * req.params_per_rank)


def _greedy(requests: list[RankRequest], budget: float, step: int) -> dict[str, int]:
    ranks = {req.name: req.low for req in requests}
    used = sum(req.low * req.params_per_rank for req in requests)
    heap = []
    for i, req in enumerate(requests):
        if req.low < req.high:
            add, delta = _grant(req, req.low, step)
            heapq.heappush(heap, (-delta, i, add))
    while used < budget and heap:
        _, i, add = heapq.heappop(heap)
        req = requests[i]
        ranks[req.name] += add
        used += add * req.params_per_rank
        if ranks[req.name] < req.high:
            add, delta = _grant(req, ranks[req.name], step)
            heapq.heappush(heap, (-delta, i, add))
    return ranks


def allocate(requests: Sequence[RankRequest], budget: int, step: int = 1) -> dict[str, int]:
    """Ranks per layer with ``sum r_l (d_in,l + d_out,l)`` reaching ``budget``.

    Every layer starts at its floor ``low``; then, ``step`` rank at a time, the layer whose next
    components change its compactness score most favourably per trainable parameter gets them
    (KPM: the smallest loss of frozen context; IPM: the largest gain of adapter context), never
    above its cap ``high``, until the budget is met (it may be passed by less than one step of one
    layer). Ties go to the layer listed first. When KPM and IPM layers are mixed (group_modes),
    their scores move in opposite directions, so the budget is split between the two modes in
    proportion to their nominal budgets and each part is allocated on its own.
    """
    if step < 1:
        raise CordaError(f"rank step {step} must be >= 1.")
    floor = sum(req.low * req.params_per_rank for req in requests)
    if floor > budget:
        raise CordaError(f"the rank floors alone need {floor:,} trainable parameters, more than the budget "
                         f"{budget:,}. Lower rank_min or raise the budget.")
    for req in requests:
        if not 1 <= req.low <= req.high < len(req.profile) - 1:
            raise CordaError(f"{req.name}: rank bounds [{req.low}, {req.high}] must satisfy 1 <= low <= high "
                             f"< min(d_in, d_out) = {len(req.profile) - 1}.")
    modes = sorted({req.mode for req in requests})
    if len(modes) == 1:
        return _greedy(list(requests), budget, step)
    nominal = {m: sum(q.nominal * q.params_per_rank for q in requests if q.mode == m) for m in modes}
    ranks: dict[str, int] = {}
    for m in modes:
        part = budget * nominal[m] / sum(nominal.values())
        ranks.update(_greedy([q for q in requests if q.mode == m], part, step))
    return ranks
