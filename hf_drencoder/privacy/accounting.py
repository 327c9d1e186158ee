"""Privacy accounting: one history of Gaussian-mechanism releases, read by four accountants.

Every release that touches private data (stage-1 statistics, each stage-2 optimizer step, each federated
round) is recorded as ``(noise_multiplier, sample_rate, num_steps)``: that many releases of the Gaussian
mechanism on a Poisson sample at rate q (add/remove-one adjacency; q = 1 is the Gaussian mechanism itself).
An entry ``(noise_multiplier, k / n, num_steps, n, k)`` is that many releases on a sample of exactly k of n
elements drawn without replacement, under replace-one adjacency (n public). The same history is handed to
opacus' RDP and PRV accountants, to dp-accounting's PLD accountant and to opacus' GDP functions, so the
reported values always describe the same sequence of mechanisms: nothing can be counted by one accountant and
forgotten by another.

Only upper bounds calibrate the noise, stop a run and give the headline ``epsilon``: RDP, PRV and PLD
(``ACCOUNTANTS``). GDP's central-limit approximation for q < 1 is not an upper bound (the noise it would
pick costs up to 4.8x the target for few steps), so it is reported as information only.

Sampling without replacement is accounted by dp-accounting's RDP analysis (Wang, Balle and Kasiviswanathan
2019, replace-one adjacency), the only one of these libraries that has it: PRV, PLD and GDP report infinity
(no bound) for such a history, and only ``accountant="rdp"`` may calibrate or headline it.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable

# Accountants that give an upper bound on epsilon: the only ones that may calibrate, stop or headline a run.
ACCOUNTANTS = ("rdp", "prv", "pld")
# Every accountant ``compute_epsilon`` can evaluate; "gdp" is information (an approximation for q < 1).
REPORTED_ACCOUNTANTS = ("rdp", "prv", "pld", "gdp")
# The accountants with an analysis of sampling without replacement (dp-accounting's RDP, replace-one).
WITHOUT_REPLACEMENT_ACCOUNTANTS = ("rdp",)

GDP_REFUSAL = (
    "accountant='gdp' cannot calibrate the noise, stop the run or give the headline epsilon: for Poisson "
    "subsampling (q < 1) GDP is a central-limit approximation, not an upper bound (the noise it picks can cost "
    "several times the target epsilon). Use accountant='prv' (default), 'pld' or 'rdp'; mu_gdp and epsilon_gdp are "
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

# PLD (dp-accounting) discretises the privacy loss with this interval, rounding pessimistically (connect-the-dots
# upper bound, tails cut at mass e^-50 counted as infinite loss): the value is an upper bound, within about 1% of
# the exact one for the histories of a training run.
PLD_DISCRETIZATION = 1e-4
# Its grid has (range of the composed privacy loss) / PLD_DISCRETIZATION points; above this many (a few hundred MB
# across the FFT buffers) it falls back to RDP, also an upper bound. Small noise over many releases makes the range
# grow: sigma 0.5 at q = 1 for 10,000 steps needs 34 million points.
_PLD_MAX_GRID_POINTS = 4_000_000


class PrivacyBudgetError(ValueError):
    """Raised when a privacy budget cannot be met (or would be exceeded)."""


def _validate_history(history: Iterable[tuple]) -> list[tuple]:
    """Normalised entries: ``(sigma, q, steps)`` (Poisson rate q) or ``(sigma, k / n, steps, n, k)`` (k of n without
    replacement; k = n is the Gaussian mechanism at q = 1 and becomes ``(sigma, 1.0, steps)``). Empty entries go."""
    out = []
    for entry in history:
        if len(entry) not in (3, 5):
            raise ValueError(
                f"a history entry is (sigma, q, steps) or (sigma, k/n, steps, n, k) (k of n without replacement); "
                f"got {tuple(entry)!r}"
            )
        sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"noise multiplier must be positive and finite, got {sigma}")
        if steps < 0:
            raise ValueError(f"number of steps must be >= 0, got {steps}")
        if len(entry) == 5:
            n, k = int(entry[3]), int(entry[4])
            if n != entry[3] or k != entry[4] or not (1 <= k <= n):
                raise ValueError(f"sampling without replacement needs whole numbers 1 <= k <= n, got n={entry[3]}, k={entry[4]}")
            if not math.isclose(q, k / n, rel_tol=1e-9):
                raise ValueError(f"a sample of k={k} of n={n} has rate {k / n:.6g}, not {q}")
            if steps:
                out.append((sigma, 1.0, steps) if k == n else (sigma, k / n, steps, n, k))
            continue
        if not (0 < q <= 1):
            raise ValueError(f"sample rate must be in (0, 1], got {q}")
        if steps:
            out.append((sigma, q, steps))
    return out


def _without_replacement(history: list[tuple]) -> bool:
    return any(len(h) == 5 for h in history)


def gdp_mu(history: Iterable[tuple[float, float, int]]) -> float:
    """mu of the composition under Gaussian DP (information only: never used to calibrate or stop).

    For full batches (q = 1) T steps of noise multiplier sigma are exactly mu = sqrt(T) / sigma. For Poisson
    subsampling (q < 1) only the central-limit approximation of Bu et al. (2020) is known (opacus'
    ``compute_mu_poisson``); it under-estimates epsilon for few steps. Independent mu-GDP mechanisms compose
    as sqrt(sum mu_i^2).
    """
    from opacus.accountants.analysis.gdp import compute_mu_poisson

    total = 0.0
    history = _validate_history(history)
    if _without_replacement(history):
        return math.inf  # no GDP analysis of sampling without replacement here
    for sigma, q, steps in history:
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


def compute_epsilon(history: Iterable[tuple], delta: float, accountant: str) -> float:
    """epsilon(delta) of a history of subsampled Gaussian mechanisms under ``accountant``.

    An empty history is 0. The PRV value is opacus' upper bound (``eps_upper``), never the estimate; the PLD value is
    dp-accounting's pessimistic estimate (an upper bound). A history with releases sampled without replacement is
    under replace-one adjacency: ``rdp`` evaluates it with dp-accounting's analysis of that sampling, the other
    accountants have none and report infinity.
    """
    if accountant not in REPORTED_ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(REPORTED_ACCOUNTANTS)}")
    if not (0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    history = _validate_history(history)
    if not history:
        return 0.0
    if _without_replacement(history):
        return _rdp_replace_one_epsilon(history, delta) if accountant in WITHOUT_REPLACEMENT_ACCOUNTANTS else math.inf
    if accountant == "gdp":
        return gdp_epsilon(gdp_mu(history), delta)
    if accountant == "rdp":
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(steps * _rdp_one_step(float(q), float(sigma)) for sigma, q, steps in history)
        eps, _ = get_privacy_spent(orders=RDP_ORDERS, rdp=rdp, delta=delta)
        return max(0.0, float(eps))
    if accountant == "pld":
        eps = _pld_epsilon(tuple(history), float(delta))
        # the grid would not fit in memory: RDP is also an upper bound, only looser, and is cheap for any history
        return compute_epsilon(history, delta, "rdp") if eps is None else eps
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


# ---- PLD (dp-accounting) ----------------------------------------------------------------------------------------
def _pld_one_step_points(sigma: float, q: float) -> float:
    """An over-estimate of the points of one release's PLD grid, without building it: the loss of the Gaussian
    mechanism is N(1/(2 sigma^2), 1/sigma^2) and its tails are cut at mass e^-50 (10 standard deviations)."""
    mu = 1.0 / sigma
    half_width = mu * mu / 2 + 10 * mu if q >= 1 else 10 * mu + mu * mu / 2
    return 2 * half_width / PLD_DISCRETIZATION


@functools.lru_cache(maxsize=16)
def _pld_one_step(sigma: float, q: float):
    """One release's PLD (pessimistic, connect-the-dots): its construction is most of the cost of a log line, and a
    history reuses the same (sigma, q) at every step. 16 cached grids are at most a few tens of MB."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q, pessimistic_estimate=True,
        value_discretization_interval=PLD_DISCRETIZATION,
    )


def _pmfs(pld):
    # the "remove" and "add" directions (one object when the PLD is symmetric, as at q = 1)
    return [pld._pmf_remove] if pld._symmetric else [pld._pmf_remove, pld._pmf_add]


@functools.lru_cache(maxsize=64)
def _pld_epsilon(history: tuple, delta: float) -> float | None:
    """epsilon of a Poisson history by dp-accounting's PLD, or None when its grid would exceed
    ``_PLD_MAX_GRID_POINTS`` (checked before anything large is built). Cached per history: a log line and the
    report that follows it ask for the same one."""
    from dp_accounting.pld import common

    # q = 1 releases are Gaussian mechanisms: together exactly one of multiplier (sum steps / sigma^2)^-1/2
    full = sum(steps / sigma**2 for sigma, q, steps in history if q >= 1)
    parts = [(sigma, q, steps) for sigma, q, steps in history if q < 1]
    if full:
        parts.append((full**-0.5, 1.0, 1))
    if any(_pld_one_step_points(sigma, q) > _PLD_MAX_GRID_POINTS for sigma, q, _ in parts):
        return None
    total = [0] * 2
    plds = []
    for sigma, q, steps in parts:
        one = _pld_one_step(sigma, q)
        for i, pmf in enumerate(_pmfs(one) * (2 // len(_pmfs(one)))):
            if not hasattr(pmf, "_probs"):
                return None  # a sparse grid (not produced for these mechanisms): no size estimate, no attempt
            lo, hi = common.compute_self_convolve_bounds(pmf._probs, steps, 1e-15) if steps > 1 else (0, pmf.size - 1)
            total[i] += hi - lo + 1
        plds.append((one, steps))
    if max(total) > _PLD_MAX_GRID_POINTS:
        return None
    composed = None
    for one, steps in plds:
        part = one.self_compose(steps) if steps > 1 else one
        composed = part if composed is None else composed.compose(part)
    try:
        return max(0.0, float(composed.get_epsilon_for_delta(delta)))
    except (OverflowError, ValueError):
        return math.inf


# ---- sampling without replacement (dp-accounting's RDP, replace-one) ------------------------------------------
@functools.lru_cache(maxsize=256)
def _rdp_without_replacement_one_step(n: int, k: int, sigma: float):
    """RDP at every order of ``RDP_ORDERS`` of one release on k of n drawn without replacement, under replace-one
    adjacency (dp-accounting's bound, Wang, Balle and Kasiviswanathan 2019, Theorem 27), and never above the
    Gaussian mechanism's own alpha / (2 sigma^2): subsampling cannot cost more than releasing on the whole data,
    and at small sigma that bound is the tighter of the two. Both are RDP bounds at each order, so is their minimum."""
    import numpy as np
    from dp_accounting import GaussianDpEvent, NeighboringRelation, SampledWithoutReplacementDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant(orders=RDP_ORDERS, neighboring_relation=NeighboringRelation.REPLACE_ONE)
    acc.compose(SampledWithoutReplacementDpEvent(n, k, GaussianDpEvent(sigma)))
    full = np.array(RDP_ORDERS, dtype=np.float64) / (2 * sigma**2)
    return np.minimum(np.asarray(acc._rdp, dtype=np.float64), full)


def _rdp_replace_one_epsilon(history: list[tuple], delta: float) -> float:
    """epsilon of a replace-one history: releases sampled without replacement, and Gaussian mechanisms without
    sampling (q = 1, whose multiplier already is noise over the replace-one sensitivity). A Poisson release (q < 1)
    is analysed under add/remove adjacency and cannot be composed into it: refused."""
    import numpy as np
    from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon as rdp_to_epsilon

    mixed = [h for h in history if len(h) == 3 and h[1] < 1]
    if mixed:
        raise ValueError(
            f"the history mixes Poisson-sampled releases {mixed[0]} (add/remove-one adjacency) with releases sampled "
            "without replacement (replace-one): no accountant here composes the two. Account the Poisson releases "
            "without amplification, as (sigma / 2, 1.0, steps) (replace-one sensitivity 2C)"
        )
    rdp = np.zeros(len(RDP_ORDERS))
    for h in history:
        if len(h) == 5:
            rdp = rdp + h[2] * _rdp_without_replacement_one_step(h[3], h[4], h[0])
        else:
            rdp = rdp + h[2] * np.array(RDP_ORDERS, dtype=np.float64) / (2 * h[0] ** 2)
    eps, _ = rdp_to_epsilon(RDP_ORDERS, rdp, delta)
    return max(0.0, float(eps))


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
    A saved history of ``(sigma, q, steps)`` entries loads as Poisson releases, as it was written.
    """

    def __init__(self, delta: float, accountant: str = "prv", history=None):
        check_accountant(accountant)
        self.delta = float(delta)
        self.accountant = accountant
        self.history: list[tuple] = []
        for entry in _validate_history(history or []):
            self._append(entry)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1,
             without_replacement: tuple[int, int] | None = None) -> None:
        """Count ``num_steps`` releases at (noise_multiplier, sample_rate): Poisson sampling, or with
        ``without_replacement=(n, k)`` exactly k of n drawn without replacement (sample_rate = k / n)."""
        entry = (noise_multiplier, sample_rate, num_steps) + (tuple(without_replacement) if without_replacement else ())
        for e in _validate_history([entry]):
            self._append(e)

    def _append(self, entry: tuple) -> None:
        last = self.history[-1] if self.history else None
        if last is not None and last[:2] == entry[:2] and last[3:] == entry[3:]:
            self.history[-1] = last[:2] + (last[2] + entry[2],) + last[3:]
        else:
            self.history.append(entry)

    @property
    def steps(self) -> int:
        return sum(h[2] for h in self.history)

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
            "epsilon_pld": self.epsilon("pld"),
            "epsilon_gdp": self.epsilon("gdp"),
            "mu_gdp": self.mu_gdp(),
        }

    def state_dict(self) -> dict:
        return {"delta": self.delta, "accountant": self.accountant, "history": [list(h) for h in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "PrivacyAccountant":
        return cls(delta=state["delta"], accountant=state["accountant"], history=[tuple(h) for h in state["history"]])


def check_accountant(accountant: str, without_replacement: bool = False) -> None:
    """Refuse an accountant that is not an upper bound (GDP) or unknown, or, for releases sampled without
    replacement, one that has no analysis of that sampling; with the fix."""
    if accountant == "gdp":
        raise ValueError(GDP_REFUSAL)
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    if without_replacement and accountant not in WITHOUT_REPLACEMENT_ACCOUNTANTS:
        raise ValueError(
            f"accountant={accountant!r} has no analysis of sampling without replacement (a fixed number of elements "
            "per release): opacus' PRV and dp-accounting's PLD implement Poisson sampling only. Use accountant='rdp' "
            "(dp-accounting's RDP bound for sampling without replacement, replace-one adjacency)"
        )


__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "REPORTED_ACCOUNTANTS",
    "WITHOUT_REPLACEMENT_ACCOUNTANTS",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "check_accountant",
    "compute_epsilon",
    "gdp_epsilon",
    "gdp_mu",
]
