"""The one-run bound as pure functions of numbers (Steinke, Nasr and Jagielski 2023, "Privacy auditing with one
(1) training run"): nothing here knows about training, so a reader can check it against the paper on one page.

Setting (their Section 3): m canaries, each included independently with probability 1/2. The auditor scores
them, guesses the k+ highest-scored IN and the k- lowest-scored OUT and abstains on the rest; r = k+ + k-
guesses, v of them correct. If the mechanism is (eps, delta)-DP with respect to every canary, then

    P[v correct or more] <= P[Bin(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Bin(r, q) < v] / i,
    q = e^eps / (1 + e^eps)                                                   (their Theorem 5.2, Appendix D)

`audit_p_value` is that right-hand side; `epsilon_lower_bound` is the largest eps it rejects at
level beta. `noise_check` is a separate white-box test of the released noise scale. For canaries whose
privacy is that of a Gaussian mechanism, `.estimator_fdp` tests the whole trade-off curve instead (tighter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under the hypothesis that the run is (epsilon, delta)-DP for each of m canaries (each
    included with probability 1/2), that an auditor making r guesses gets at least v of them right.

    With q = e^eps / (1 + e^eps) (the accuracy of eps-randomized response) this is
    P[Binomial(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i
    (Steinke, Nasr and Jagielski 2023, Appendix D), capped at 1.
    """
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not (epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not (0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0:
        return min(tail, 1.0)
    # partial[i-1] = P[v - i <= Bin < v] for i = 1..v
    partial = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(partial / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest epsilon rejected at level ``beta``: with probability >= 1 - beta over the canaries'
    inclusion and the run's randomness, the run is not (eps', delta)-DP for any eps' below the returned value.
    0 when nothing can be rejected. Bisection to 1e-9 from below (the returned value is always a rejected one).
    """
    if not (0 < beta < 1):
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    if audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # cannot happen for finite r (q^r -> 1); a guard against an endless loop
            return lo
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if audit_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def default_guess_grid(m: int) -> list[tuple[int, int]]:
    """Candidate (k+, k-) pairs: r = 100%, 90%, ..., 30%, 25%, 20%, 15%, 10%, 5% of the m canaries, split evenly between IN and OUT
    or all IN (input canaries are usually recognised as members, seldom as non-members). Trying K candidates
    costs a Bonferroni factor K on beta, which `lower_bound_from_scores` applies."""
    grid = []
    for frac in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05):
        r = int(round(m * frac))
        if r < 1:
            break
        for pair in ((r - r // 2, r // 2), (r, 0)):
            if pair not in grid:
                grid.append(pair)
    return grid


@dataclass
class GuessOutcome:
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    candidates_tried: int


def count_correct(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> tuple[int, int]:
    """Guess the k+ highest-scored canaries IN and the k- lowest-scored OUT. Returns (guesses, correct).
    Ties are broken by canary index (a fixed rule that does not look at membership)."""
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k+ ({k_plus}) + k- ({k_minus}) <= m ({m})")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    guessed_in, guessed_out = order[:k_plus], order[m - k_minus:] if k_minus else order[:0]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_plus + k_minus, correct


def checked_scores(scores, included) -> tuple[np.ndarray, np.ndarray]:
    """Canary scores and membership as arrays, refused unless 1-d, of one length, and finite."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-d and of the same length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite (a NaN score would be ranked arbitrarily)")
    return scores, included


def best_guess(scores, included, guesses, default_grid, bound, confidence: float):
    """The guess rule both bounds share: every (k+, k-) in ``guesses`` (default ``default_grid(m)``) is scored by
    ``bound(m, r, v, beta)`` at level beta = (1 - confidence) / len(guesses) (union bound), and the best is
    returned as ``(k+, k-, r, v, value, number tried)``."""
    scores, included = checked_scores(scores, included)
    m = len(scores)
    grid = list(guesses) if guesses is not None else default_grid(m)
    if not grid:
        raise ValueError("no (k+, k-) candidates to try")
    beta = (1.0 - confidence) / len(grid)
    best = None
    for k_plus, k_minus in grid:
        r, v = count_correct(scores, included, k_plus, k_minus)
        value = bound(m, r, v, beta)
        if best is None or value > best[4]:
            best = (k_plus, k_minus, r, v, value, len(grid))
    return best


def lower_bound_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
) -> GuessOutcome:
    """The one-run audit's bound from canary scores (higher = more likely a member) and the true membership.

    Every (k+, k-) in ``guesses`` (default `default_guess_grid`) is tried at level
    (1 - confidence) / len(guesses), and the best is returned: by the union bound the returned epsilon is a
    lower bound with probability >= ``confidence``. Give one pair to avoid the correction.
    """
    k_plus, k_minus, r, v, eps, tried = best_guess(
        scores, included, guesses, default_guess_grid,
        lambda m, r, v, beta: epsilon_lower_bound(m, r, v, delta, beta), confidence,
    )
    return GuessOutcome(k_plus, k_minus, r, v, eps, tried)


# For many canaries the audit guesses on a fixed fraction of them, chosen in advance (so no correction is paid):
# for the Gaussian mechanism (every released coordinate is one Gaussian observation of a Dirac canary) the
# bound is best with k+ = k- = 1.6% of m, measured over m = 1e4 .. 1e5 and epsilon 2 .. 8 (docs/audit.md).
FIXED_GUESS_MIN_CANARIES = 10_000
FIXED_GUESS_FRACTION = 0.016


def guesses_for(m: int) -> list[tuple[int, int]]:
    """The (k+, k-) candidates a run with m canaries tries by default: one fixed pair, k+ = k- =
    ``FIXED_GUESS_FRACTION * m``, from ``FIXED_GUESS_MIN_CANARIES`` canaries on (no Bonferroni cost: with many
    canaries the best fraction hardly moves); the `default_guess_grid` below that."""
    if m >= FIXED_GUESS_MIN_CANARIES:
        k = max(1, int(round(FIXED_GUESS_FRACTION * m)))
        return [(k, k)]
    return default_guess_grid(m)


@dataclass
class NoiseCheck:
    """What `noise_check` measured: ``ratio`` is the released noise scale over the accounted one
    (>= 1 up to chance for a correct mechanism: the released signal only adds to it)."""

    ratio: float
    p_value: float
    dof: int
    level: float
    passed: bool


def noise_check(sum_squares: Sequence[float], dims: int, sigmas: Sequence[float], level: float = 1e-6) -> NoiseCheck:
    """Tests the noise of T releases against the accounted noise multipliers.

    ``sum_squares[t]`` is ||release_t||^2 in units of C^2 (the release as a sum, before division by the batch),
    ``dims`` the released dimension d, ``sigmas[t]`` the noise multiplier the ledger recorded for release t.
    If release t is s_t + N(0, sigma_t^2 C^2 I) with any s_t independent of the noise, then
    sum_t ||release_t||^2 / sigma_t^2 is a non-central chi-square with dT degrees of freedom, stochastically
    larger than the central one; so P[chi2(dT) <= observed] is a valid p-value for "less noise than accounted".
    FAIL below ``level`` (a small level: the test is powerful, with dT in the millions a 1% shortfall shows).
    It checks the scale of the noise only, not that it is fresh or independent.
    """
    from scipy.stats import chi2

    sum_squares, sigmas = np.asarray(sum_squares, dtype=np.float64), np.asarray(sigmas, dtype=np.float64)
    if sum_squares.shape != sigmas.shape or sum_squares.ndim != 1 or len(sum_squares) == 0:
        raise ValueError("need one accounted noise multiplier per release")
    if dims < 1 or not np.all(sigmas > 0):
        raise ValueError("dims must be >= 1 and noise multipliers > 0")
    dof = int(dims * len(sum_squares))
    stat = float(np.sum(sum_squares / sigmas**2))
    p = float(chi2.cdf(stat, dof))
    return NoiseCheck(ratio=math.sqrt(stat / dof), p_value=p, dof=dof, level=level, passed=p >= level)


def expected_gaussian_bound(m: int, mu: float, delta: float, beta: float = 0.05, seed: int = 0,
                            guesses: Sequence[tuple[int, int]] | None = None, method: str = "eps_delta") -> float:
    """The bound an ideal audit reaches on a mu-GDP mechanism: m scores N(mu * included, 1), guessed with
    `guesses_for`. What the audit can show at best for a correct Gaussian mechanism (its ceiling).
    ``method``: ``eps_delta`` (the (eps, delta) bound of this module) or ``gdp`` (the epsilon at ``delta`` of the
    GDP bound of `.estimator_fdp`)."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    scores = rng.normal(0.0, 1.0, m) + mu * included
    grid = guesses if guesses is not None else guesses_for(m)
    if method == "gdp":
        from .estimator_fdp import gdp_bound_from_scores, gdp_epsilon_at

        return gdp_epsilon_at(gdp_bound_from_scores(scores, included, 1 - beta, grid).mu_lower_bound, delta)
    if method != "eps_delta":
        raise ValueError(f"method={method!r} is unknown: choose eps_delta or gdp")
    return lower_bound_from_scores(scores, included, delta, 1 - beta, grid).epsilon_lower_bound
