"""Privacy accounting: one history of Gaussian-mechanism releases, read by three accountants.

Every release that touches private data (stage-1 statistics, each stage-2 optimizer step, each federated
round) is recorded as ``(noise_multiplier, sample_rate, num_steps)``. The same history is handed to the
RDP and PRV accountants of opacus and to opacus' GDP functions, so the three reported values always describe
the same sequence of mechanisms: nothing can be counted by one accountant and forgotten by another.

Only upper bounds calibrate the noise, stop a run and give the headline ``epsilon``: RDP and PRV
(``ACCOUNTANTS``). GDP's central-limit approximation for q < 1 is not an upper bound (the noise it would
pick costs up to 4.8x the target for few steps), so it is reported as information only.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

# Accountants that give an upper bound on epsilon: the only ones that may calibrate, stop or headline a run.
ACCOUNTANTS = ("rdp", "prv")
# Every accountant ``compute_epsilon`` can evaluate; "gdp" is information (an approximation for q < 1).
REPORTED_ACCOUNTANTS = ("rdp", "prv", "gdp")

GDP_REFUSAL = (
    "accountant='gdp' cannot calibrate the noise, stop the run or give the headline epsilon: for Poisson "
    "subsampling (q < 1) GDP is a central-limit approximation, not an upper bound (the noise it picks can cost "
    "several times the target epsilon). Use accountant='prv' (default) or 'rdp'; mu_gdp and epsilon_gdp are "
    "still logged as information"
)

# Orders for RDP: opacus' defaults stop at 63, where small noise multipliers find their optimum at the edge
# (a valid but loose bound); extending the grid only tightens it.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [80, 96, 128, 192, 256, 384, 512, 768, 1024]

# Below this noise multiplier the PRV accountant is not evaluated (its grid cannot be built) and reports inf.
_PRV_MIN_NOISE_MULTIPLIER = 0.02

# PRV discretises the privacy loss on a grid whose size grows with the number of releases and the loss's range;
# above this many points (a few hundred MB across the FFT buffers) it falls back to RDP, also an upper bound.
_PRV_MAX_GRID_POINTS = 4_000_000

# sigma above this is treated as "calibration failed": the budget cannot be met with the planned steps.
_MAX_NOISE_MULTIPLIER = 1e4


class PrivacyBudgetError(ValueError):
    """Raised when a privacy budget cannot be met (or would be exceeded)."""


def _validate_history(history: Iterable[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    out = []
    for entry in history:
        sigma, q, steps = entry
        sigma, q, steps = float(sigma), float(q), int(steps)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"noise multiplier must be positive and finite, got {sigma}")
        if not (0 < q <= 1):
            raise ValueError(f"sample rate must be in (0, 1], got {q}")
        if steps < 0:
            raise ValueError(f"number of steps must be >= 0, got {steps}")
        if steps:
            out.append((sigma, q, steps))
    return out


def gdp_mu(history: Iterable[tuple[float, float, int]]) -> float:
    """mu of the composition under Gaussian DP (information only: never used to calibrate or stop).

    For full batches (q = 1) T steps of noise multiplier sigma are exactly mu = sqrt(T) / sigma. For Poisson
    subsampling (q < 1) only the central-limit approximation of Bu et al. (2020) is known (opacus'
    ``compute_mu_poisson``); it under-estimates epsilon for few steps. Independent mu-GDP mechanisms compose
    as sqrt(sum mu_i^2).
    """
    from opacus.accountants.analysis.gdp import compute_mu_poisson

    total = 0.0
    for sigma, q, steps in _validate_history(history):
        if q >= 1.0:
            mu = math.sqrt(steps) / sigma
        else:
            if sigma**-2 > 700:  # exp overflows: no meaningful privacy is left
                return math.inf
            mu = float(compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q))
        total += mu * mu
    return math.sqrt(total)


def gdp_epsilon(mu: float, delta: float) -> float:
    """epsilon at ``delta`` of a mu-GDP mechanism (Dong, Roth and Su 2019, Corollary 2.13), by opacus'
    ``eps_from_mu``; infinity where that search cannot bracket it (epsilon above 500: no useful guarantee)."""
    if mu <= 0:
        return 0.0
    if not math.isfinite(mu):
        return math.inf
    from opacus.accountants.analysis.gdp import delta_eps_mu, eps_from_mu

    if delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    try:
        return float(eps_from_mu(mu=mu, delta=delta))
    except (ValueError, OverflowError, FloatingPointError):
        return math.inf


@functools.lru_cache(maxsize=256)
def _rdp_one_step(sample_rate: float, noise_multiplier: float):
    """RDP of one subsampled Gaussian release at every order of ``RDP_ORDERS`` (opacus' analysis). RDP composes
    by addition, so a history is a sum of these; caching them makes a log line cheap for long histories."""
    from opacus.accountants.analysis.rdp import compute_rdp

    return compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDP_ORDERS)


def compute_epsilon(history: Iterable[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """epsilon(delta) of a history of subsampled Gaussian mechanisms under ``accountant``.

    An empty history is 0. The PRV value is opacus' upper bound (``eps_upper``), never the estimate.
    """
    if accountant not in REPORTED_ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(REPORTED_ACCOUNTANTS)}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = _validate_history(history)
    if not history:
        return 0.0
    if accountant == "gdp":
        return gdp_epsilon(gdp_mu(history), delta)
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(steps * _rdp_one_step(float(q), float(sigma)) for sigma, q, steps in history)
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return max(0.0, float(eps))
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    if min(sigma for sigma, _, _ in history) < _PRV_MIN_NOISE_MULTIPLIER:
        # PRV's grid explodes for tiny noise (it returns inf at 0.01 and exhausts memory below): report
        # infinity without trying; such a release bounds nothing useful anyway (RDP gives thousands).
        return math.inf
    if _prv_grid_points(history, delta) > _PRV_MAX_GRID_POINTS:
        # The grid would not fit in memory (e.g. sigma 0.5, q 1, 10,000 steps needs tens of GB): RDP is also an
        # upper bound, only looser, and is cheap for any history.
        return compute_epsilon(history, delta, "rdp")
    try:
        # PRV's discretisation can return a tiny negative number for very weak releases; epsilon is >= 0
        return max(0.0, float(acc.get_epsilon(delta=delta)))
    except (MemoryError, OverflowError, ValueError):
        # For very small noise multipliers (< ~0.01) PRV's grid cannot be built. Report infinity: an
        # accountant that cannot bound the loss must never be read as a small epsilon.
        return math.inf


def _prv_grid_points(history, delta: float, eps_error: float = 0.01) -> float:
    """Number of points of the grid opacus' PRV accountant would build for ``history`` (its own domain rule,
    evaluated without building anything), so that a history too large for memory is never attempted."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    counts = [steps for _, _, steps in history]
    try:
        half_width = compute_safe_domain_size(
            prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error
        )
    except (ValueError, OverflowError, FloatingPointError):
        return math.inf
    mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return 2 * float(half_width) / mesh


class PrivacyAccountant:
    """The privacy ledger of one run: a history of Gaussian releases and the delta they are reported at.

    ``step`` is called once per release (one optimizer step, one round, one statistics release). The
    history is what a checkpoint stores; a resumed run restores it, so it never reports less than was spent.
    """

    def __init__(self, delta: float, accountant: str = "prv", history=None):
        check_accountant(accountant)
        self.delta = float(delta)
        self.accountant = accountant
        self.history: list[tuple[float, float, int]] = []
        for entry in history or []:
            self.step(*entry)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        (entry,) = _validate_history([(noise_multiplier, sample_rate, num_steps)]) or [None]
        if entry is None:
            return
        sigma, q, steps = entry
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    @property
    def steps(self) -> int:
        return sum(s for _, _, s in self.history)

    def epsilon(self, accountant: str | None = None, extra=()) -> float:
        """epsilon spent so far (plus the hypothetical releases in ``extra``)."""
        return compute_epsilon(self.history + list(extra), self.delta, accountant or self.accountant)

    def mu_gdp(self) -> float:
        return gdp_mu(self.history)

    def report(self) -> dict:
        """epsilon under every accountant, plus mu of GDP, for the history so far."""
        return {
            "epsilon": self.epsilon(),
            "epsilon_rdp": self.epsilon("rdp"),
            "epsilon_prv": self.epsilon("prv"),
            "epsilon_gdp": self.epsilon("gdp"),
            "mu_gdp": self.mu_gdp(),
        }

    def state_dict(self) -> dict:
        return {"delta": self.delta, "accountant": self.accountant, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyAccountant":
        return cls(delta=state["delta"], accountant=state["accountant"], history=[tuple(h) for h in state["history"]])


def check_accountant(accountant: str) -> None:
    """Refuse an accountant that is not an upper bound (GDP) or unknown, with the fix."""
    if accountant == "gdp":
        raise ValueError(GDP_REFUSAL)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior_history=(),
    tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``tolerance`` in epsilon, from below) such that ``prior_history`` plus
    ``steps`` releases at ``sample_rate`` stay within ``target_epsilon`` at ``delta``.

    Bisection on sigma, the same search opacus' ``get_noise_multiplier`` runs, but over the whole history so
    that an earlier release (stage-1 statistics) is paid for out of the same budget. Raises
    :class:`PrivacyBudgetError` when no sigma can do it.
    """
    check_accountant(accountant)
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise PrivacyBudgetError(f"planned steps must be >= 1, got {steps}")
    prior = list(prior_history)

    def eps(sigma):
        return compute_epsilon(prior + [(sigma, sample_rate, steps)], delta, accountant)

    already = compute_epsilon(prior, delta, accountant)
    if already >= target_epsilon:
        raise PrivacyBudgetError(
            f"the releases made before training already spent epsilon={already:.3f} >= target_epsilon="
            f"{target_epsilon}: raise target_epsilon or release fewer statistics"
        )
    lo, hi = 0.0, 10.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > _MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(
                f"target_epsilon={target_epsilon} cannot be reached with {steps} steps at sample rate "
                f"{sample_rate:.4g} (delta={delta:.3g}, accountant={accountant}): even noise multiplier "
                f"{_MAX_NOISE_MULTIPLIER:g} exceeds it. Train fewer steps, use a smaller batch, or raise "
                "target_epsilon."
            )
    # invariant: eps(hi) <= target; shrink until the epsilon spent is within tolerance of the target
    while True:
        mid = (lo + hi) / 2
        e = eps(mid) if mid > 0 else math.inf
        if e <= target_epsilon:
            hi = mid
            if target_epsilon - e < tolerance * target_epsilon:
                return hi
        else:
            lo = mid
        if hi - lo < 1e-4 * hi:
            return hi


def max_steps_within_budget(
    target_epsilon: float,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    accountant: str = "prv",
    prior_history=(),
    upper: int | None = None,
) -> int:
    """Largest number of further releases at (noise_multiplier, sample_rate) whose total stays within
    ``target_epsilon``: the step at which a budget-limited run must stop. Capped at ``upper`` if given."""
    check_accountant(accountant)
    prior = list(prior_history)

    def ok(t):
        return compute_epsilon(prior + [(noise_multiplier, sample_rate, t)], delta, accountant) <= target_epsilon

    if not ok(0):
        return 0
    hi = 1
    while ok(hi):
        if upper is not None and hi >= upper:
            return upper
        hi *= 2
        if hi > 10**9:
            return hi
    lo = hi // 2  # ok(lo) holds, ok(hi) fails
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo if upper is None else min(lo, upper)


__all__ = [
    "ACCOUNTANTS",
    "REPORTED_ACCOUNTANTS",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "calibrate_noise_multiplier",
    "check_accountant",
    "compute_epsilon",
    "gdp_epsilon",
    "gdp_mu",
    "max_steps_within_budget",
]
