"""Pure maths of CorDA++: the compactness metric, covariance selection and rank allocation.

No hooks, no PEFT, no modules: numbers in, numbers out (the orchestration is in allocation.py).

Compactness: how much of a layer's calibration context is guaranteed to be where the mode wants
it. Write the calibration inputs as ``X`` (d_in x n, ``X X^T = n C``) and the CO-SVD
``W C = U S V^T``. Since ``W = U S V^T C^{-1}``, component i maps the data to
``s_i u_i v_i^T C^{-1} X``, whose norm is ``s_i sqrt(n v_i^T C^{-1} v_i)``; with unit ``v_i`` it
lies in ``[s_i / sqrt(lam_max), s_i / sqrt(lam_min)] * sqrt(n)``. The layer's context (the summed
component outputs) therefore lies in ``[S / sqrt(lam_max), S / sqrt(lam_min)] * sqrt(n)`` with
``S = s_1 + ... + s_m``, and component i's share of it is bounded by

    lower:  s_i / (sqrt(kappa) * S)        upper:  sqrt(kappa) * s_i / S        (kappa = lam_max / lam_min)

Both bounds add up over components. The score of a layer adapted at rank r:

* KPM (the adapter takes the r smallest components, calibration = knowledge to keep):
  ``1 - sqrt(kappa) * (sum of the r smallest s_i) / S``, a lower bound on the share of the
  context that stays in the frozen components;
* IPM (the adapter takes the r largest, calibration = the task):
  ``(sum of the r largest s_i) / (sqrt(kappa) * S)``, a lower bound on the share in the adapter.

Higher is better in both modes, and one function computes both. The score depends on the
singular values of W C' and the extreme eigenvalues of the damped C' only; it is dimensionless
and unchanged when W or C is multiplied by a constant (all s_i scale together, kappa does not),
so vision, projector and language layers compare. A worst-case ratio
rho = sqrt(kappa) * tail / head would compare the adapter's bound with the *rest* of the layer;
the bound here compares it with the *whole* (1 - KPM score = rho * head / S, equal to rho to first order when
the tail is small), because a bound that adds up over components makes the rank allocation a
sum of per-component costs: KPM's costs grow with each step (it reaches for larger s_i), IPM's
gains shrink, so the greedy allocation below is exact. (A bounded-ratio score such as
head / (head + sqrt(kappa) * tail) is convex in the sums; a greedy on it piles rank onto layers
whose guarantee is already lost.)
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from corda_vl.deprecation import module_getattr
from corda_vl.errors import CordaError


def rank_scores(singular_values: torch.Tensor, eigenvalues: Sequence[float] | torch.Tensor, mode: str) -> torch.Tensor:
    """The score at every rank r = 0..m (float64, index r); see the module docstring.

    ``singular_values``: all singular values of W C' (any order); ``eigenvalues``: eigenvalues of
    the damped C' (all of them, or just (lam_min, lam_max)).
    """
    if mode not in ("kpm", "ipm"):
        raise CordaError(f"mode={mode!r} is not 'kpm' or 'ipm'.")
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten().clamp_min(0).sort(descending=True).values
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
    lam_min, lam_max = float(lam.min()), float(lam.max())
    if not lam_min > 0:
        raise CordaError(f"the damped covariance must be positive definite (smallest eigenvalue {lam_min}).")
    root_kappa = math.sqrt(max(lam_max / lam_min, 1.0))  # Ritz estimates can cross by an ulp when C' = I
    total = float(s.sum())
    if total == 0:  # W C' = 0: no context anywhere, nothing to keep or to capture
        return torch.full((s.shape[0] + 1,), 1.0 if mode == "kpm" else 0.0, dtype=torch.float64)
    if mode == "ipm":
        return torch.cat([s.new_zeros(1), s.cumsum(0)]) / (root_kappa * total)
    tail = torch.cat([s.new_zeros(1), s.flip(0).cumsum(0)])  # sum of the r smallest
    return 1.0 - root_kappa * tail / total


def compactness(singular_values: torch.Tensor, eigenvalues: Sequence[float] | torch.Tensor, r: int, mode: str) -> float:
    """CorDA++ compactness of a layer adapted at rank ``r`` in ``mode`` (higher is better).

    KPM: a lower bound on the share of the calibration context left in the frozen components;
    IPM: a lower bound on the share the adapter's components carry. Derivation and invariances
    in the module docstring.
    """
    scores = rank_scores(singular_values, eigenvalues, mode)
    m = scores.shape[0] - 1
    if not 0 <= r <= m:
        raise CordaError(f"rank {r} is outside [0, {m}] for {m} singular values.")
    return float(scores[r])


def select_best(scores: Mapping[str, float]) -> str:
    """The candidate with the highest compactness; ties go to the first listed (deterministic)."""
    if not scores:
        raise CordaError("no candidate covariance to select from.")
    return max(scores, key=lambda name: (scores[name], -list(scores).index(name)))


def log_condition(low: float, mean: float, top: float, d_out: int) -> float:
    """``log pi`` of the CorDA++ paper's condition factor, ``pi = sqrt(d_out * sig_max) / sig_min``.

    The paper's formula is not dimensionless: multiplying C by ``c`` divides ``pi`` by ``sqrt(c)``.
    Here the spectrum (smallest ``low``, mean ``mean``, largest ``top``) is first divided by its
    mean, so ``pi`` is unchanged by the scale of C, and ``pi >= sqrt(d_out)`` (``top >= mean >=
    low``), hence ``log pi >= 0``. That normalisation is this project's choice; the paper, as
    transcribed, does not say. The caller takes the spectrum from the damped covariance (default)
    or from W C' (``compactness_spectrum``). ``low`` below ``1e-12 * top`` counts as that (a
    rank-deficient W C').
    """
    if not (top > 0 and mean > 0):
        raise CordaError("the spectrum for the condition factor is zero.")
    low = max(low, 1e-12 * top)
    return 0.5 * math.log(d_out) + 0.5 * math.log(top / mean) - math.log(low / mean)


def paper_selection(singular_values: torch.Tensor, log_pi: float, r: int) -> float:
    """The paper's selection score of one candidate covariance at rank ``r`` (KPM), negated so that
    higher is better like every other score here: ``-log pi * sum_{j<=r} s_{-j} / s_max``, where
    ``s_{-j}`` is the j-th smallest singular value of W C'. A candidate wins when its r smallest
    components are small against its largest (little context in the adapter) and its covariance is
    well conditioned."""
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten().clamp_min(0).sort().values
    top = float(s[-1])
    return -log_pi * float(s[:r].sum()) / top if top > 0 else 0.0


def paper_rank_scores(singular_values: torch.Tensor, log_pi: float, params_per_rank: int) -> torch.Tensor:
    """The paper's greedy allocation as cumulative scores for :func:`greedy_ranks` (KPM).

    The paper grants one more rank to the layer with the lowest cost
    ``log pi * s_{-r} / sum_{k=1..m-r} s_k`` (the r-th smallest component against the components
    still frozen), without weighing the layer's parameter cost. ``greedy_ranks`` picks the largest
    change of score per parameter, so the score at rank r is ``-params_per_rank * (cost_1 + ... +
    cost_r)``; each step's change per parameter is then ``-cost_r``, and the two greedies pick the
    same layer. The costs grow with r (a larger numerator, a smaller denominator), so the greedy
    is the paper's. Unchanged by the scale of W and of C (only ratios of s enter, and ``log pi``
    is scale-free).
    """
    s = torch.as_tensor(singular_values, dtype=torch.float64).flatten().clamp_min(0).sort().values
    m = s.shape[0]
    frozen = s.flip(0).cumsum(0).flip(0)  # frozen[j] = sum of all but the j smallest = sum_{k<=m-j} (descending)
    cost = torch.full((m,), math.inf, dtype=torch.float64)
    rest = frozen[1:]  # step r (1-based) leaves the m - r largest frozen
    ok = rest > 0
    cost[:-1][ok] = log_pi * s[:-1][ok] / rest[ok]
    cost[:-1][~ok] = 0.0  # nothing left frozen means nothing to protect: W C' is zero beyond here
    return torch.cat([s.new_zeros(1), -params_per_rank * cost.cumsum(0)])


def component_energies(S: torch.Tensor, VhCinv: torch.Tensor, heldout: torch.Tensor) -> torch.Tensor:
    """Output energy of each component ``s_i u_i v_i^T C'^{-1}`` on held-out inputs with covariance
    ``heldout`` (H): ``s_i^2 * a_i^T H a_i`` with ``a_i = C'^{-1} v_i``. The ``u_i`` are orthonormal,
    so the energies of any set of components add up exactly: no cross terms."""
    a = VhCinv.to(torch.float64)
    return S.to(torch.float64).square() * ((a @ heldout.to(torch.float64)) * a).sum(1)


def output_energy(weight: torch.Tensor, heldout: torch.Tensor) -> float:
    """``tr(W H W^T)``: the layer's whole output energy on the held-out inputs (per token)."""
    w = weight.to(torch.float64)
    return float(((w @ heldout.to(torch.float64)) * w).sum())


def heldout_rank_scores(energies: torch.Tensor, total: float, mode: str, m: int) -> torch.Tensor:
    """The "heldout" score at every rank r = 0..m from the kept components' held-out energies.

    ``energies`` are those of the kept components in descending singular-value order (KPM keeps the
    smallest, and the adapter takes the last r of them; IPM keeps the largest and takes the first
    r). KPM: ``1 - (energy of the adapter's components) / total``, the share of the layer's output
    on data the covariance never saw that stays frozen; IPM: the adapter's share. Higher is better.
    No condition number enters: a covariance that saw fewer directions puts components where the
    held-out data has energy, and is scored on it. Unchanged by the scale of W, C and H (a ratio of
    energies that scale together). Ranks above the kept components repeat the last score; the
    allocation never reaches them (``high`` caps it).
    """
    if mode not in ("kpm", "ipm"):
        raise CordaError(f"mode={mode!r} is not 'kpm' or 'ipm'.")
    e = torch.as_tensor(energies, dtype=torch.float64).flatten().clamp_min(0)
    k = e.shape[0]
    if not total > 0:
        return torch.full((m + 1,), 1.0 if mode == "kpm" else 0.0, dtype=torch.float64)
    taken = e.flip(0) if mode == "kpm" else e
    share = torch.cat([e.new_zeros(1), taken.cumsum(0) / total])
    scores = 1.0 - share if mode == "kpm" else share
    return torch.cat([scores, scores[-1].repeat(m - k)]) if m > k else scores[: m + 1]


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
    scores: tuple[float, ...]
    """rank_scores(...) as floats: the score at rank 0..min(d_in, d_out)."""

    def value(self, r: int) -> float:
        return self.scores[r]


def _next_step(req: RankRequest, r: int, step: int) -> tuple[int, float]:
    """(rank added, change of score per parameter) for the next step of ``req`` at rank ``r``."""
    add = min(step, req.high - r)
    return add, (req.value(r + add) - req.value(r)) / (add * req.params_per_rank)


def _greedy(requests: list[RankRequest], budget: float, step: int) -> dict[str, int]:
    ranks = {req.name: req.low for req in requests}
    used = sum(req.low * req.params_per_rank for req in requests)
    heap = []
    for i, req in enumerate(requests):
        if req.low < req.high:
            add, delta = _next_step(req, req.low, step)
            heap.append((-delta, i, add))
    heapq.heapify(heap)
    while used < budget and heap:
        _, i, add = heapq.heappop(heap)
        req = requests[i]
        ranks[req.name] += add
        used += add * req.params_per_rank
        if ranks[req.name] < req.high:
            add, delta = _next_step(req, ranks[req.name], step)
            heapq.heappush(heap, (-delta, i, add))
    return ranks


def _split_budget(requests: Sequence[RankRequest], budget: int, modes: list[str]) -> dict[str, float]:
    """Budget per mode: its floors, plus the rest shared in proportion to nominal - floor."""
    floor = {m: sum(q.low * q.params_per_rank for q in requests if q.mode == m) for m in modes}
    free = {m: max(0, sum(q.nominal * q.params_per_rank for q in requests if q.mode == m) - floor[m]) for m in modes}
    spare, total = budget - sum(floor.values()), sum(free.values())
    return {m: floor[m] + spare * (free[m] / total if total else 1 / len(modes)) for m in modes}


def greedy_ranks(requests: Sequence[RankRequest], budget: int, step: int = 1) -> dict[str, int]:
    """Ranks per layer with ``sum r_l (d_in,l + d_out,l)`` reaching ``budget``.

    Every layer starts at its floor ``low``; then, ``step`` rank at a time, the layer whose next
    components change its score most favourably per trainable parameter gets them (KPM: the
    least frozen context put at risk; IPM: the most adapter context gained), never above its cap
    ``high``, until the budget is met (it may be passed by less than one step of one layer). The
    per-step changes only worsen as a layer's rank grows, so this greedy maximises the summed
    score among allocations on the step grid that spend the same budget. Ties go to the layer
    listed first. When KPM and IPM layers are mixed (group_modes), their scores are not on one
    scale, so each mode gets its floors plus a share of the rest in proportion to its nominal
    budget above the floors, and each part is allocated on its own (overshoot: less than one
    step per mode).
    """
    if step < 1:
        raise CordaError(f"rank step {step} must be >= 1.")
    floor = sum(req.low * req.params_per_rank for req in requests)
    if floor > budget:
        raise CordaError(f"the rank floors alone need {floor:,} trainable parameters, more than the budget "
                         f"{budget:,}. Lower rank_min or raise the budget.")
    for req in requests:
        if not 1 <= req.low <= req.high < len(req.scores) - 1:
            raise CordaError(f"{req.name}: rank bounds [{req.low}, {req.high}] must satisfy 1 <= low <= high "
                             f"< min(d_in, d_out) = {len(req.scores) - 1}.")
    modes = sorted({req.mode for req in requests})
    if len(modes) == 1:
        return _greedy(list(requests), budget, step)
    ranks: dict[str, int] = {}
    for m, part in _split_budget(requests, budget, modes).items():
        ranks.update(_greedy([q for q in requests if q.mode == m], part, step))
    return ranks


__getattr__ = module_getattr(__name__, {"allocate": f"{__name__}.greedy_ranks"})  # the 0.1 name
