"""The one-run bound for a mechanism family given by a trade-off curve (f-DP), here Gaussian DP: pure functions of
numbers, after Mahloujifar, Melis and Chaudhuri (2024, "Auditing f-Differential Privacy in One Run").

Setting (the same game as `.estimator`): m canaries, each included independently with probability 1/2; the
auditor makes exactly r guesses (the k+ highest scores IN, the k- lowest OUT) and gets C of them right. The
hypothesis tested is that the run is f-DP with respect to every canary (whatever the other canaries do):
telling "canary i in" from "canary i out" from the run's output, any test with false-positive rate a has
power at most fbar(a) = 1 - f(a), in both directions. For mu-GDP, fbar(a) = Phi(Phi^-1(a) + mu).

The bound, derived as follows (the argument of Mahloujifar et al., written out so it can be checked here).
Let D_l = P[C = l] and, for j >= 0, X_j = E[C 1{C >= j}] / m (correct guesses in the event C >= j, per canary)
and Y_j = E[(r - C) 1{C >= j}] / m (wrong ones). For canary i with the others' membership fixed, the test
"guess IN on i and at least j - 1 of the other guesses right" is correct on i with C >= j when i is in, and
wrong on i with C >= j - 1 when i is out (and likewise for OUT guesses). f-DP bounds the first by fbar of the
second; averaging over i, over the sign and over the others' membership (fbar is concave) gives

    X_j <= fbar(Y_{j-1})    for j = 1, ..., r.                                                    (*)

So P[C >= v] is at most the largest tau = sum_{l >= v} D_l over all distributions D on {0..r} that satisfy (*).
That maximum is found in closed form: moving all mass of {C >= v} to C = v only relaxes (*); below v, the least
total mass that satisfies (*) is reached by taking each Y_i as small as (*) allows, from i = v - 1 down to 0
(the total mass and every X_j increase with every Y_i), that is Y_i = max(Y_{i+1}, fbar^-1(X_{i+1})) and
X_i = X_{i+1} + i/(r - i) (Y_i - Y_{i+1}). tau is possible iff that least mass is at most 1
(`fdp_minimal_mass`), and the possible tau form an interval [0, tau*]: `fdp_p_value` is tau*.

`gdp_mu_lower_bound` is the largest mu that the observation rejects at level beta: with probability at
least 1 - beta, the run is not mu'-GDP with respect to its canaries for any mu' below it. `gdp_epsilon_at`
turns mu into the epsilon at delta of the mu-GDP trade-off curve (Dong, Roth and Su 2019), for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence


_N = NormalDist()


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _phi_inv(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return _N.inv_cdf(p)


def gdp_power(alpha: float, mu: float) -> float:
    """fbar(alpha) = 1 - f(alpha) for mu-GDP: the largest power of a test with false-positive rate alpha."""
    if alpha <= 0.0:
        return 0.0
    if alpha >= 1.0:
        return 1.0
    return _phi(_phi_inv(alpha) + mu)


def gdp_power_inverse(power: float, mu: float) -> float:
    """The least false-positive rate a test needs to reach ``power`` against a mu-GDP mechanism."""
    if power <= 0.0:
        return 0.0
    if power >= 1.0:
        return 1.0
    return _phi(_phi_inv(power) - mu)


def fdp_minimal_mass(m: int, r: int, v: int, tau: float, power_inverse) -> float:
    """The least total probability a distribution of C (correct guesses out of r, m canaries) needs to put
    ``tau`` on {C >= v} while meeting (*) of the module docstring; ``power_inverse`` is fbar^-1.
    ``tau`` is a possible value of P[C >= v] under the hypothesis iff this is <= 1."""
    if not (1 <= v <= r <= m):
        raise ValueError(f"need 1 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    x = v * tau / m                # X_v: all the mass of {C >= v} at C = v
    y = (r - v) * tau / m          # Y_v
    mass = tau
    for i in range(v - 1, -1, -1):
        y_i = max(y, power_inverse(x))  # (*) for j = i + 1
        if y_i > y:
            d = m * (y_i - y) / (r - i)  # D_i, the mass at C = i
            mass += d
            if mass > 1.0:
                return mass
            x += i * d / m
            y = y_i
    return mass


def fdp_p_value(m: int, r: int, v: int, power_inverse, tol: float = 1e-12) -> float:
    """The largest P[C >= v] possible for a mechanism whose power curve is fbar (``power_inverse`` = fbar^-1):
    a valid p-value for "the run is f-DP with respect to each canary" after v of r guesses were right.
    Bisection on tau (the possible values form an interval); returns an upper end, so it never understates."""
    if v == 0:
        return 1.0
    if fdp_minimal_mass(m, r, v, 1.0, power_inverse) <= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0  # lo possible, hi impossible
    while hi - lo > tol * max(hi, 1e-300) and hi > 1e-300:
        mid = (lo + hi) / 2
        if fdp_minimal_mass(m, r, v, mid, power_inverse) <= 1.0:
            lo = mid
        else:
            hi = mid
    return hi


def gdp_p_value(m: int, r: int, v: int, mu: float) -> float:
    """`fdp_p_value` for mu-GDP."""
    if not (mu >= 0):
        raise ValueError(f"mu must be >= 0, got {mu}")
    return fdp_p_value(m, r, v, lambda p: gdp_power_inverse(p, mu))


def gdp_rejects(m: int, r: int, v: int, mu: float, beta: float) -> bool:
    """True when v correct of r guesses (m canaries) reject "mu-GDP with respect to each canary" at level beta:
    P[C >= v] < beta is the only possibility, i.e. tau = beta needs more than total probability 1."""
    if v == 0:
        return False
    return fdp_minimal_mass(m, r, v, beta, lambda p: gdp_power_inverse(p, mu)) > 1.0


def gdp_mu_lower_bound(m: int, r: int, v: int, beta: float = 0.05, tol: float = 1e-6) -> float:
    """The largest mu rejected at level ``beta`` (0 when none is): with probability >= 1 - beta over the
    canaries' inclusion and the run's randomness, the run is not mu'-GDP with respect to its canaries for any
    mu' below the returned value. The rejected mu form an interval from 0 (a larger mu allows more power);
    bisection to ``tol`` from below, so the returned value is always a rejected one (or 0)."""
    if not (0 < beta < 1):
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if v == 0 or not gdp_rejects(m, r, v, 0.0, beta):
        return 0.0
    lo, hi = 0.0, 1.0
    while gdp_rejects(m, r, v, hi, beta):
        lo, hi = hi, 2 * hi
        if hi > 64:  # fbar^-1 underflows long before: every guess right is then all it can show
            return lo
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if gdp_rejects(m, r, v, mid, beta):
            lo = mid
        else:
            hi = mid
    return lo


def gdp_epsilon_at(mu: float, delta: float) -> float:
    """epsilon at ``delta`` of the mu-GDP trade-off curve (opacus' ``eps_from_mu``), 0 for mu = 0."""
    from ..privacy.accounting import gdp_epsilon

    return gdp_epsilon(mu, delta)


@dataclass
class GDPOutcome:
    """The best (k+, k-) candidate for the GDP bound: ``mu_lower_bound`` at level beta / ``candidates_tried``."""

    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    mu_lower_bound: float
    candidates_tried: int


def gdp_bound_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
) -> GDPOutcome:
    """`gdp_mu_lower_bound` from canary scores (higher = more likely a member) and the true membership, with
    the guess rule of `lower_bound_from_scores`: every (k+, k-) in ``guesses`` (default
    `guesses_for`) is tested at level (1 - confidence) / len(guesses) and the best is returned,
    so the returned mu is a lower bound with probability >= ``confidence`` (union bound)."""
    from .estimator import best_guess, checked_scores, guesses_for

    checked_scores(scores, included)
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return GDPOutcome(*best_guess(
        scores, included, guesses, guesses_for,
        lambda m, r, v, beta: gdp_mu_lower_bound(m, r, v, beta) if r else 0.0, confidence,
    ))
