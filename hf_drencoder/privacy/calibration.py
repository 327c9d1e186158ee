"""Noise calibration and budget stops: the sigma that keeps a planned run within a target epsilon, and the number of
further steps a budget still allows.

Both search over the whole history of releases (`hf_drencoder.privacy.accounting`), so that an earlier release
(stage-1 statistics) is paid for out of the same budget, and both answer only with a value whose epsilon was
evaluated by the chosen upper-bound accountant (RDP, PRV or PLD): Gaussian DP's closed form is a first guess only.
"""

from __future__ import annotations

import functools
import math

from .accounting import (
    PrivacyBudgetError,
    _validate_history,
    check_accountant,
    compute_epsilon,
    gdp_epsilon,
    gdp_mu,
)

# sigma above this is treated as "calibration failed": the budget cannot be met with the planned steps.
_MAX_NOISE_MULTIPLIER = 1e4


def _release(sigma: float, sample_rate: float, steps: int, without_replacement) -> tuple:
    return (sigma, sample_rate, steps) + (tuple(without_replacement) if without_replacement else ())


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "prv",
    prior_history=(),
    tolerance: float = 0.01,
    without_replacement: tuple[int, int] | None = None,
) -> float:
    """Smallest noise multiplier (to ``tolerance`` in epsilon, from below) such that ``prior_history`` plus
    ``steps`` releases at ``sample_rate`` stay within ``target_epsilon`` at ``delta``.

    The search runs over the whole history, so that an earlier release (stage-1 statistics) is paid for out of
    the same budget. It returns only a sigma whose epsilon was evaluated and found within the target. With
    ``without_replacement=(n, k)`` the releases are samples of exactly k of n (``sample_rate`` = k / n). Raises
    `PrivacyBudgetError` when no sigma can do it. Results are cached: the same question is answered once per
    process.
    """
    check_accountant(accountant, without_replacement is not None)
    if target_epsilon <= 0:
        raise PrivacyBudgetError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps < 1:
        raise PrivacyBudgetError(f"planned steps must be >= 1, got {steps}")
    prior = tuple(tuple(entry) for entry in _validate_history(prior_history))
    return _calibrate(float(target_epsilon), float(delta), float(sample_rate), int(steps), accountant, prior,
                      float(tolerance), tuple(int(v) for v in without_replacement) if without_replacement else None)


def _gdp_guess(target: float, delta: float, sample_rate: float, steps: int, prior: tuple) -> float | None:
    """Gaussian DP's sigma for the target (central-limit approximation for q < 1): a starting point only."""
    lo, hi = 1e-2, 1e3
    try:
        for _ in range(50):
            mid = math.sqrt(lo * hi)
            if gdp_epsilon(gdp_mu(list(prior) + [(mid, sample_rate, steps)]), delta) > target:
                lo = mid
            else:
                hi = mid
    except (ValueError, OverflowError, FloatingPointError):
        return None
    return hi if hi < 1e3 else None


@functools.lru_cache(maxsize=1024)
def _calibrate(target: float, delta: float, sample_rate: float, steps: int, accountant: str, prior: tuple,
               tolerance: float, without_replacement: tuple | None) -> float:
    """The search of `calibrate_noise_multiplier`, on a bracket [lo, hi] with eps(lo) > target >= eps(hi).

    Each PRV, PLD or RDP evaluation can take seconds, so the search starts from Gaussian DP's sigma (a cheap
    closed form, used only as a first guess: every sigma returned was evaluated under ``accountant``) and the
    next sigma is interpolated (log epsilon linear in log sigma, aimed just inside the tolerance window) rather
    than halved. Bisection takes over where interpolation cannot be used.
    """
    def eps(sigma):
        return compute_epsilon(list(prior) + [_release(sigma, sample_rate, steps, without_replacement)], delta,
                               accountant)

    def too_large(sigma):
        if sigma > _MAX_NOISE_MULTIPLIER:
            raise PrivacyBudgetError(
                f"target_epsilon={target} cannot be reached with {steps} steps at sample rate "
                f"{sample_rate:.4g} (delta={delta:.3g}, accountant={accountant}): even noise multiplier "
                f"{_MAX_NOISE_MULTIPLIER:g} exceeds it. Train fewer steps, use a smaller batch, or raise "
                "target_epsilon."
            )

    already = compute_epsilon(list(prior), delta, accountant)
    if already >= target:
        raise PrivacyBudgetError(
            f"the releases made before training already spent epsilon={already:.3f} >= target_epsilon="
            f"{target}: raise target_epsilon or release fewer statistics"
        )
    aim = target * (1 - tolerance / 2)
    first = (_gdp_guess(target, delta, sample_rate, steps, prior) if without_replacement is None else None) or 10.0
    e_first = eps(first)
    if e_first <= target:
        lo, e_lo, hi, e_hi = 0.0, math.inf, first, e_first
    else:
        lo, e_lo = first, e_first
        hi = first * (min(max(e_first / aim, 1.1), 4.0) if math.isfinite(e_first) else 2.0)
        too_large(hi)
        e_hi = eps(hi)
        while e_hi > target:
            lo, e_lo, hi = hi, e_hi, 2 * hi
            too_large(hi)
            e_hi = eps(hi)
    if target - e_hi < tolerance * target:
        return hi
    while True:
        if 0 < e_hi and math.isfinite(e_lo) and lo > 0:
            t = (math.log(e_lo) - math.log(aim)) / (math.log(e_lo) - math.log(e_hi))
            mid = math.exp(math.log(lo) + min(max(t, 0.05), 0.95) * (math.log(hi) - math.log(lo)))
        elif lo == 0 and e_hi > 0:
            mid = hi * max(0.05, min(0.95, e_hi / aim))  # epsilon roughly proportional to 1 / sigma
        else:
            mid = (lo + hi) / 2
        e = eps(mid)
        if e <= target:
            hi, e_hi = mid, e
            if target - e < tolerance * target:
                return hi
        else:
            lo, e_lo = mid, e
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
    without_replacement: tuple[int, int] | None = None,
) -> int:
    """Largest number of further releases at (noise_multiplier, sample_rate) whose total stays within
    ``target_epsilon``: the step at which a budget-limited run must stop. Capped at ``upper`` if given.
    ``without_replacement=(n, k)``: the releases are samples of exactly k of n."""
    check_accountant(accountant, without_replacement is not None)
    prior = list(prior_history)

    def ok(t):
        release = _release(noise_multiplier, sample_rate, t, without_replacement)
        return compute_epsilon(prior + [release], delta, accountant) <= target_epsilon

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


__all__ = ["calibrate_noise_multiplier", "max_steps_within_budget"]
