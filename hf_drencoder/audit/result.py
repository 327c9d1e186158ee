"""What an audit reports: the result record, the verdict and the sentence that explains the comparison."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


class PrivacyAuditError(RuntimeError):
    """The audit measured more privacy loss than the accountant reports: a bug or a wrong accounting.
    ``result`` holds the `AuditResult`."""

    def __init__(self, message: str, result: "AuditResult | None" = None):
        super().__init__(message)
        self.result = result


def _every(n: int, what: str) -> str:
    """'the one release' / 'all 20 releases'."""
    return f"the one {what}" if n == 1 else f"all {n} {what}s"


def comparison_note(canary_type: str, sampling: str, eps_canary: float, eps_reported: float, steps: int) -> str:
    """One sentence saying which epsilon the bound is compared with, and why that is not always the run's."""
    if canary_type == "gradient" and sampling == "every_step":
        return (f"The bound is compared with epsilon={eps_canary:.3f}, what the accountant gives a canary that is in "
                f"{_every(steps, 'release')} (sample rate 1), not with the run's reported epsilon={eps_reported:.3f} "
                "for examples sampled at rate q: a bound above the reported epsilon but below the canaries' is no "
                "contradiction.")
    if canary_type == "party" and sampling == "every_step":
        return (f"The bound is compared with epsilon={eps_canary:.3f}, what the client-level accountant gives a party "
                f"in {_every(steps, 'round')} (rate 1), not with the run's reported epsilon={eps_reported:.3f}.")
    return (f"The bound is compared with the run's epsilon={eps_canary:.3f}: the canaries are sampled like the "
            "training examples.")


def verdict(lower_bound: float, eps_canary: float, confidence: float, noise=None,
            mu_bound: float | None = None, mu_canary: float | None = None) -> tuple[bool, str]:
    """(passed, message). FAIL when the bound exceeds the canaries' epsilon, or when the released noise is
    measurably smaller than the accounted noise (``noise``: a `NoiseCheck` or None).

    With ``mu_bound`` and ``mu_canary`` (the Gaussian-DP bound, `.estimator_fdp`) the bound is a test of
    "the canaries' releases are ``mu_canary``-GDP", which is what the ledger's noise multipliers claim: FAIL when
    ``mu_bound > mu_canary``; ``lower_bound`` is then the epsilon at delta of ``mu_bound``, shown for reading."""
    gdp = mu_bound is not None and mu_canary is not None
    if gdp and mu_bound > mu_canary:
        return False, (
            f"FAIL: with confidence {confidence}, the run leaked more than its accounted noise allows about a canary "
            f"(Gaussian DP mu >= {mu_bound:.3f} > the ledger's mu={mu_canary:.3f}; epsilon >= {lower_bound:.3f}, the "
            f"accountant's epsilon={eps_canary:.3f}). Noise was skipped or too small, clipping was bypassed, or "
            "a release was not accounted: do not trust this configuration's reported epsilon."
        )
    if not gdp and lower_bound > eps_canary:
        return False, (
            f"FAIL: with confidence {confidence}, the run leaked more than epsilon={eps_canary:.3f} about a canary "
            f"(lower bound {lower_bound:.3f} > accountant's epsilon). Noise was skipped or too small, "
            "clipping was bypassed, or a release was not accounted: do not trust this configuration's reported epsilon."
        )
    if noise is not None and not noise.passed:
        return False, (
            f"FAIL: the released noise is {noise.ratio:.3f} times the noise the accountant counted (p-value "
            f"{noise.p_value:.2g} over {noise.dof} released coordinates): the run leaked more than the accountant's "
            f"epsilon={eps_canary:.3f} even though the bound ({lower_bound:.3f}) does not show it. Do not trust this "
            "configuration's reported epsilon."
        )
    shown = f"the audit's lower bound {lower_bound:.3f} does not exceed the accountant's {eps_canary:.3f}"
    if gdp:
        shown = (f"the audit's lower bound {lower_bound:.3f} (Gaussian DP mu >= {mu_bound:.3f}) does not exceed "
                 f"the accountant's {eps_canary:.3f} (mu={mu_canary:.3f})")
    return True, (
        f"PASS: {shown}. This does not prove the run private: a correct and a subtly wrong implementation "
        "can both give a lower bound below epsilon."
    )


@dataclass
class AuditResult:
    """What one audit run measured. ``epsilon_accountant`` is the accountant's epsilon for the canaries in this
    run (``epsilon_reported`` with q = 1 for every-step gradient canaries), the number the bound must not exceed.
    ``noise_ratio`` is the released noise over the accounted noise (white-box gradient canaries; None otherwise).

    ``bound`` says which test ``epsilon_lower_bound`` comes from: ``gdp`` (every-step gradient canaries with DP:
    the Gaussian-DP bound ``mu_lower_bound`` against the ledger's ``mu_accountant``, shown as the epsilon at delta
    of that mu) or ``eps_delta`` (the (epsilon, delta) bound, for every other kind of canary).
    ``epsilon_lower_bound_eps_delta`` is the (epsilon, delta) bound of the same guesses, always computed."""

    canary_type: str
    canary_sampling: str
    observe: str
    num_canaries: int
    num_included: int
    guesses: int
    correct: int
    abstentions: int
    k_plus: int
    k_minus: int
    candidates_tried: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    epsilon_accountant: float
    epsilon_reported: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    dp_enabled: bool
    passed: bool
    message: str
    comparison: str = ""
    noise_ratio: float | None = None
    noise_p_value: float | None = None
    noise_check_passed: bool | None = None
    bound: str = "eps_delta"
    epsilon_lower_bound_eps_delta: float | None = None
    mu_lower_bound: float | None = None
    mu_accountant: float | None = None
    report: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def f(x):
            return "inf" if x == math.inf else f"{x:.4f}" if isinstance(x, float) else str(x)

        rows = [
            ("canaries", f"{self.num_canaries} {self.canary_type} ({self.canary_sampling}, observe={self.observe}), "
                         f"{self.num_included} included"),
            ("guesses", f"{self.guesses} (k+={self.k_plus}, k-={self.k_minus}), {self.correct} correct, "
                        f"{self.abstentions} abstentions"),
            ("confidence", f"{self.confidence} ({self.candidates_tried} (k+, k-) candidates, Bonferroni)"),
            ("delta", f"{self.delta:.3g}"),
            ("epsilon lower bound", f(self.epsilon_lower_bound) + (
                f" (Gaussian DP: mu >= {self.mu_lower_bound:.4f}, the ledger's mu = {f(self.mu_accountant)})"
                if self.bound == "gdp" else " ((epsilon, delta) bound)")),
        ]
        if self.bound == "gdp" and self.epsilon_lower_bound_eps_delta is not None:
            rows.append(("(epsilon, delta) bound", f"{f(self.epsilon_lower_bound_eps_delta)} (no assumption on the "
                                                   "mechanism's trade-off curve; weaker)"))
        rows += [
            ("epsilon accountant", f"{f(self.epsilon_accountant)} ({self.accountant}, for the canaries)"),
            ("epsilon reported", f"{f(self.epsilon_reported)} (the run's, q={self.sample_rate:.4g})"),
            ("noise multiplier", f(self.noise_multiplier)),
        ]
        if self.noise_ratio is not None:
            rows.append(("released noise", f"{self.noise_ratio:.4f} x accounted (p={self.noise_p_value:.2g}, "
                                           f"{'ok' if self.noise_check_passed else 'TOO SMALL'})"))
        rows += [("steps", str(self.steps)), ("result", "PASS" if self.passed else "FAIL")]
        w = max(len(k) for k, _ in rows)
        text = "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
        return text + (f"\n{self.comparison}" if self.comparison else "") + f"\n{self.message}"
