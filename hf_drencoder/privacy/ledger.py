"""The privacy ledger of one training run: the mechanism's parameters, the accountant and the budget."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .accounting import PrivacyAccountant, PrivacyBudgetError, check_accountant
from .calibration import calibrate_noise_multiplier, max_steps_within_budget

# What every log line and report carries, one key per accountant (GDP's mu; epsilon_gdp is in the report only).
EPSILON_KEYS = ("epsilon", "epsilon_rdp", "epsilon_prv", "epsilon_pld", "mu_gdp")


@dataclass
class PrivacyLedger:
    """What a private run has promised and spent.

    ``record_step`` is the only way a release is counted; it refuses a release that would exceed
    ``target_epsilon`` (the run is stopped before that by PrivacyCallback; this is the hard guard).
    """

    delta: float
    sample_rate: float
    max_grad_norm: float
    accountant_name: str = "prv"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    unit: str = "example"
    disabled: bool = False
    # sensitivity of the released sum in units of max_grad_norm: 1 for add/remove-one of a clipped vector;
    # 2 for replace-one (fixed-size sampling). The accountant is given noise_multiplier / sensitivity.
    sensitivity: float = 1.0
    neighbouring: str = "add/remove one"
    # (n, k): each release is on exactly k of n drawn without replacement (sample_rate = k / n), accounted under
    # replace-one adjacency by the accountants that have that analysis (WITHOUT_REPLACEMENT_ACCOUNTANTS); None: Poisson.
    without_replacement: tuple[int, int] | None = None
    accountant: PrivacyAccountant = field(init=False)
    max_total_steps: int | None = field(default=None, init=False)
    prior_steps: int = field(default=0, init=False)
    _cache: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if not (self.sensitivity >= 1.0 and math.isfinite(self.sensitivity)):
            raise ValueError(f"sensitivity must be >= 1 (in units of max_grad_norm), got {self.sensitivity}")
        if self.without_replacement is not None:
            n, k = (int(v) for v in self.without_replacement)
            self.without_replacement = (n, k)
            if not (1 <= k <= n) or abs(self.sample_rate - k / n) > 1e-12:
                raise ValueError(f"sampling {k} of {n} without replacement is rate {k / n:.6g}, not {self.sample_rate}")
            if not self.disabled:
                check_accountant(self.accountant_name, without_replacement=True)
        self.accountant = PrivacyAccountant(self.delta, self.accountant_name)

    @property
    def accounted_noise_multiplier(self) -> float:
        """What the accountant is given: noise std over the sensitivity of the released sum."""
        return self.noise_multiplier / self.sensitivity

    @property
    def steps(self) -> int:
        """Training releases so far (the history may also hold releases made before training, e.g. stage 1)."""
        return self.accountant.steps - self.prior_steps

    def calibrate(self, planned_steps: int) -> None:
        """Fix the noise multiplier (solving for it when only ``target_epsilon`` is given) and the step at
        which the budget is spent. Releases already in the history (stage 1, a resumed run) are paid for."""
        if self.disabled:
            return
        prior = list(self.accountant.history)
        if self.noise_multiplier is None:
            if self.target_epsilon is None:
                raise PrivacyBudgetError("neither target_epsilon nor noise_multiplier is set")
            remaining = max(planned_steps - self.steps, 1)
            self.noise_multiplier = self.sensitivity * calibrate_noise_multiplier(
                self.target_epsilon, self.delta, self.sample_rate, remaining, self.accountant_name, prior,
                without_replacement=self.without_replacement,
            )
        if self.target_epsilon is not None:
            more = max_steps_within_budget(
                self.target_epsilon, self.delta, self.accounted_noise_multiplier, self.sample_rate, self.accountant_name,
                prior, upper=max(planned_steps - self.steps, 1), without_replacement=self.without_replacement,
            )
            self.max_total_steps = self.steps + more
            if more == 0:
                raise PrivacyBudgetError(
                    f"target_epsilon={self.target_epsilon} is already spent (epsilon={self.accountant.epsilon():.3f} "
                    f"after {self.steps} steps): not one more step fits in the budget"
                )

    def record_prior_releases(self, history, source: str) -> None:
        """Add releases made before training (e.g. the stage-1 statistics a codec's prior was built from) to the
        history, so that calibration and every reported epsilon pay for them."""
        if self.disabled:
            return
        if self.steps:
            raise PrivacyBudgetError(f"{source}: prior releases must be recorded before the first training step")
        for entry in history:
            sigma, q, steps = entry[:3]
            if not (sigma > 0 and math.isfinite(sigma)):
                raise PrivacyBudgetError(
                    f"{source} was released with noise multiplier {sigma}: without noise it has no finite epsilon"
                )
            if self.without_replacement is not None and len(entry) == 3 and float(q) < 1:
                raise PrivacyBudgetError(
                    f"{source} was released on a Poisson sample (q={float(q):.4g}, add/remove adjacency), which cannot be "
                    "composed with releases sampled without replacement (replace-one): account it without "
                    "amplification first, as (sigma / 2, 1.0, steps)"
                )
            self.accountant.step(float(sigma), float(q), int(steps), without_replacement=tuple(entry[3:]) or None)
            self.prior_steps += int(steps)
        self.invalidate()

    def invalidate(self) -> None:
        """Forget cached metrics (after the history changed outside ``record_step``)."""
        self._cache = None

    def budget_allows_step(self) -> bool:
        return self.max_total_steps is None or self.steps < self.max_total_steps

    def record_step(self) -> None:
        """Count one release of the Gaussian mechanism at (noise_multiplier, sample_rate)."""
        if self.disabled:
            return
        if self.noise_multiplier is None:
            raise PrivacyBudgetError("a private step was taken before the noise multiplier was calibrated")
        if not self.budget_allows_step():
            raise PrivacyBudgetError(
                f"this step would exceed target_epsilon={self.target_epsilon} (budget spent after "
                f"{self.max_total_steps} steps); refusing to release it"
            )
        self.accountant.step(self.accounted_noise_multiplier, self.sample_rate, without_replacement=self.without_replacement)

    def metrics(self) -> dict:
        """The numbers that go into every log: epsilon per accountant, mu of GDP, the mechanism's parameters."""
        if self._cache is not None and self._cache[0] == self.accountant.steps:
            return dict(self._cache[1])
        if self.disabled:
            eps = {k: math.inf for k in EPSILON_KEYS}
        else:
            rep = self.accountant.report()
            eps = {k: rep[k] for k in EPSILON_KEYS}
        out = {
            **eps,
            "noise_multiplier": 0.0 if self.disabled else float(self.noise_multiplier or 0.0),
            "sample_rate": self.sample_rate,
            "privacy_steps": self.steps,
        }
        self._cache = (self.accountant.steps, out)
        return dict(out)

    def report(self) -> dict:
        """The privacy report of the run (what a model card or a closing log states)."""
        m = self.metrics()
        return {
            "epsilon": m["epsilon"],
            "epsilon_rdp": m["epsilon_rdp"],
            "epsilon_prv": m["epsilon_prv"],
            "epsilon_pld": m["epsilon_pld"],
            "epsilon_gdp": math.inf if self.disabled else self.accountant.epsilon("gdp"),
            "mu_gdp": m["mu_gdp"],
            "accountant": self.accountant_name,
            "delta": self.delta,
            "noise_multiplier": m["noise_multiplier"],
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "max_grad_norm": self.max_grad_norm,
            "privacy_unit": self.unit,
            "neighbouring": self.neighbouring,
            "sampling": self.sampling_description(),
            "sensitivity": self.sensitivity * self.max_grad_norm,
            "target_epsilon": self.target_epsilon,
            "dp_enabled": not self.disabled,
            "history": [list(h) for h in self.accountant.history],
        }

    def sampling_description(self) -> str:
        if self.without_replacement is not None:
            n, k = self.without_replacement
            return f"{k} of {n} without replacement per release"
        return "full batch" if self.sample_rate >= 1 else f"Poisson at rate {self.sample_rate:.6g}"

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "unit": self.unit,
            "disabled": self.disabled,
            "prior_steps": self.prior_steps,
            "sensitivity": self.sensitivity,
            "without_replacement": list(self.without_replacement) if self.without_replacement is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what a checkpoint spent. The history is taken as is: it can only make epsilon larger.

        The remaining steps are released by the checkpoint's mechanism: a resume that asks for another noise
        multiplier, clipping norm or sampling rate (expected batch or dataset size) is refused rather than
        silently keeping the checkpoint's values."""
        if bool(state.get("disabled")) != self.disabled:
            raise PrivacyBudgetError("the checkpoint was written with a different disable_dp setting")
        if float(state.get("sensitivity", 1.0)) != self.sensitivity:
            raise PrivacyBudgetError("the checkpoint was written under another sampling scheme (sensitivity); resume with the same one")
        saved_wor = tuple(state["without_replacement"]) if state.get("without_replacement") else None
        saved_rate = state.get("sample_rate")
        if saved_wor is None and self.without_replacement is not None and self.sensitivity == 2.0 and saved_rate == 1.0:
            # a state written when fixed-size sampling was accounted without amplification: its (sigma / 2, 1, T)
            # entries are Gaussian mechanisms under replace-one, which compose with the releases that follow
            saved_wor, saved_rate = self.without_replacement, self.sample_rate
        if saved_wor != self.without_replacement:
            raise PrivacyBudgetError(
                f"the checkpoint was written with sampling {saved_wor or 'Poisson'}, this run asks for "
                f"{self.without_replacement or 'Poisson'}: resume with the same sampling scheme"
            )
        if not self.disabled:
            saved = {"per_sample_max_grad_norm": state.get("max_grad_norm"), "sample rate": saved_rate}
            asked = {"per_sample_max_grad_norm": self.max_grad_norm, "sample rate": self.sample_rate}
            if self.noise_multiplier is not None:
                saved["noise_multiplier"], asked["noise_multiplier"] = state.get("noise_multiplier"), self.noise_multiplier
            changed = [
                f"{k} {saved[k]:.6g} -> {asked[k]:.6g}" for k in saved
                if saved[k] is not None and not math.isclose(float(saved[k]), float(asked[k]), rel_tol=1e-9)
            ]
            if changed:
                raise PrivacyBudgetError(
                    "resuming with another mechanism than the checkpoint's (" + "; ".join(changed) + "). The sample rate "
                    "is expected batch (per_device_train_batch_size x gradient_accumulation_steps x processes) / "
                    "dataset size. Resume with the checkpoint's settings, or start a new run from the checkpoint's "
                    "adapter with prior_privacy_report pointing at it"
                )
        self.accountant = PrivacyAccountant.from_state_dict(state["accountant"])
        self.accountant.delta = self.delta
        self.accountant.accountant = self.accountant_name
        self.prior_steps = int(state.get("prior_steps", 0))
        if state.get("noise_multiplier") is not None:
            self.noise_multiplier = float(state["noise_multiplier"])
        self._cache = None
