"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, 2023).

The audit inserts m canaries, includes each one independently with probability 1/2, runs the private training
the user runs (DRTrainer with its clipping, noise, codec and accountant), scores each canary, guesses the
top-scored k+ as members and the bottom-scored k- as non-members (abstaining on the rest), and turns the number
of correct guesses into a lower bound on epsilon that holds with probability at least ``confidence``. A bound
above the epsilon the accountant gives the canaries is impossible for a correct implementation except with
probability 1 - confidence (docs/audit.md).

One file per job:

* `.estimator` -- the mathematics: the p-value and the bound of the paper, the guess rule, the noise check
  (pure functions of numbers);
* `.estimator_fdp` -- the Gaussian-DP bound (the whole trade-off curve, after Mahloujifar, Melis and
  Chaudhuri 2024), used for every-step gradient canaries;
* `.canaries` -- gradient canaries (white box, inserted through the mechanism's ``add_per_sample``) and
  input canaries (black box, training rows scored by the final model's loss);
* `.central` -- `run_audit`, one DRTrainer run;
* `.federated` -- `run_federated_audit`, canary parties in a FederatedSimulation;
* `.result` -- `AuditResult`, the verdict and its explanation;
* `.command` -- ``hf-drencoder audit``.
"""

from .canaries import GradientCanaries, input_canary_scores, make_input_canaries
from .central import run_audit
from .command import main
from .estimator import (
    NoiseCheck,
    audit_p_value,
    count_correct,
    default_guess_grid,
    epsilon_lower_bound,
    guesses_for,
    lower_bound_from_scores,
    noise_check,
)
from .estimator_fdp import gdp_bound_from_scores, gdp_mu_lower_bound, gdp_p_value
from .federated import FederatedCanaries, run_federated_audit
from .result import AuditResult, PrivacyAuditError

__all__ = [
    "AuditResult",
    "FederatedCanaries",
    "GradientCanaries",
    "NoiseCheck",
    "PrivacyAuditError",
    "audit_p_value",
    "count_correct",
    "default_guess_grid",
    "epsilon_lower_bound",
    "gdp_bound_from_scores",
    "gdp_mu_lower_bound",
    "gdp_p_value",
    "guesses_for",
    "input_canary_scores",
    "lower_bound_from_scores",
    "main",
    "make_input_canaries",
    "noise_check",
    "run_audit",
    "run_federated_audit",
]
