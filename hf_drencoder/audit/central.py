"""The central runner: one DRTrainer run with canaries, and the bound against the accountant's epsilon."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

from ..privacy.accounting import compute_epsilon, gdp_mu
from .canaries import CANARY_TYPES, GradientCanaries, input_canary_scores, make_input_canaries
from .estimator import guesses_for, lower_bound_from_scores, noise_check
from .estimator_fdp import gdp_bound_from_scores, gdp_epsilon_at
from .result import AuditResult, PrivacyAuditError, comparison_note, verdict


def _training_history(ledger, extra_skip: int = 0) -> list[tuple[float, float, int]]:
    """The ledger's history without the releases made before training (stage-1 statistics: the ledger's
    ``prior_steps`` plus ``extra_skip`` more), in which no gradient canary takes part."""
    skip, out = getattr(ledger, "prior_steps", 0) + extra_skip, []
    for sigma, q, n in ledger.accountant.history:
        take = min(n, skip)
        skip -= take
        if n - take:
            out.append((sigma, q, n - take))
    return out


def _canary_epsilon(trainer, canary_type: str, sampling: str) -> tuple[float, float]:
    """(epsilon for the canaries, the run's reported epsilon), at the run's delta and headline accountant.

    Input canaries are training rows: the reported epsilon (stage 1 included) is theirs. Gradient canaries take
    part in the training releases the ledger counted, with the data's rate q (``poisson``) or in every one
    (``every_step``: q = 1); the epsilon is computed from those history entries, so a release the ledger
    recorded with a wrong noise multiplier or not at all shows up as a bound above it.
    """
    ledger = trainer.ledger
    if ledger.disabled:
        return math.inf, math.inf
    reported = ledger.accountant.epsilon()
    if canary_type == "input":
        return reported, reported
    history = _training_history(ledger)
    if sampling == "every_step":
        history = [(sigma, 1.0, n) for sigma, _, n in history]
    with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q) = -inf at q = 1 and handles it
        return compute_epsilon(history, ledger.delta, ledger.accountant_name), reported


def run_audit(
    build_trainer: Callable,
    train_dataset,
    canary_type: str = "gradient",
    num_canaries: int = 256,
    canary_sampling: str = "every_step",
    observe: str = "release",
    direction: str = "random",
    canary_scale: float = 1.0,
    canary_dataset=None,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    check: bool = True,
    noise_check_level: float = 1e-6,
) -> AuditResult:
    """Train once with canaries and return the audit's lower bound next to the accountant's epsilon.

    Args:
        build_trainer: ``train_dataset -> DRTrainer``, exactly as the user builds theirs (model, arguments,
            codec, hooks). It is called once, with ``train_dataset`` (gradient canaries) or with ``train_dataset``
            plus the included input canaries; the audit calls ``train()``.
        canary_type: ``gradient`` (white box) or ``input`` (black box).
        canary_dataset: input canaries to use instead of `make_input_canaries`' random ones (same columns).
        confidence: the bound holds with at least this probability (1 - beta). Every-step gradient canaries are
            tested with the Gaussian-DP bound (`estimator_fdp`) against the mu the ledger's noise
            multipliers give them; other canaries with the (epsilon, delta) bound (`estimator`).
        guesses: (k+, k-) candidates; default `guesses_for`: one pair fixed in advance from
            10^4 canaries on, else `default_guess_grid`, paid for with a Bonferroni correction.
        check: raise `PrivacyAuditError` when the lower bound exceeds the accountant's epsilon, or (gradient
            canaries) when the released noise is measurably below the accounted noise.
        noise_check_level: level of that noise test (`noise_check`); the run's false-alarm
            probability is at most ``1 - confidence + noise_check_level``.
    """
    if canary_type not in CANARY_TYPES:
        raise ValueError(f"canary_type={canary_type!r} is unknown: choose one of {', '.join(CANARY_TYPES)}")
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if canary_type == "gradient":
        canaries = GradientCanaries(num_canaries, canary_sampling, observe, direction, canary_scale, seed)
        trainer = build_trainer(train_dataset)
        canaries.attach(trainer)
        trainer.train()
        if canaries.releases == 0:
            raise RuntimeError("no release was observed: the canaries were not installed in the mechanism")
        if trainer.dp_enabled and trainer.ledger.steps < canaries.releases:
            raise PrivacyAuditError(
                f"the mechanism released {canaries.releases} steps but the ledger counted {trainer.ledger.steps}: "
                "a release was not accounted"
            )
        scores, included, num_canaries = canaries.scores, canaries.included, canaries.num_canaries
        noise = _noise_check(trainer, canaries, noise_check_level)
    else:
        noise = None
        from datasets import concatenate_datasets

        canary_sampling, observe = "dataset", "final_model_loss"
        if canary_dataset is None:
            if num_canaries < 1:
                raise ValueError("num_canaries must be >= 1 for input canaries (or pass canary_dataset=)")
            canary_dataset = make_input_canaries(train_dataset, num_canaries, seed)
        num_canaries = len(canary_dataset)
        included = (torch.rand(num_canaries, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).numpy()
        members = canary_dataset.select(np.flatnonzero(included).tolist())
        trainer = build_trainer(concatenate_datasets([train_dataset, members]) if len(members) else train_dataset)
        trainer.train()
        scores = input_canary_scores(trainer, canary_dataset)

    report = trainer.privacy_report()
    eps_canary, eps_reported = _canary_epsilon(trainer, canary_type, canary_sampling)
    if guesses is None:
        guesses = guesses_for(len(scores))
    outcome = lower_bound_from_scores(scores, included, report["delta"], confidence, guesses)
    # Every-step gradient canaries with DP: each canary's releases are Gaussian mechanisms of sensitivity C, so
    # the ledger claims exactly mu-GDP for them (mu = sqrt(sum 1 / sigma_t^2)); the GDP bound tests that claim
    # with the whole trade-off curve. Other canaries (Poisson-sampled, input rows) keep the (epsilon, delta) bound.
    mu_canary = mu_bound = None
    best = outcome
    bound, epsilon_bound = "eps_delta", outcome.epsilon_lower_bound
    if canary_type == "gradient" and canary_sampling == "every_step" and trainer.dp_enabled:
        mu_canary = gdp_mu([(sigma, 1.0, n) for sigma, _, n in _training_history(trainer.ledger)])
        best = gdp_bound_from_scores(scores, included, confidence, guesses)
        mu_bound, bound = best.mu_lower_bound, "gdp"
        epsilon_bound = gdp_epsilon_at(mu_bound, report["delta"])
    passed, message = verdict(epsilon_bound, eps_canary, confidence, noise, mu_bound, mu_canary)
    steps = report["steps"] if report["dp_enabled"] else trainer.state.global_step
    result = AuditResult(
        canary_type=canary_type, canary_sampling=canary_sampling, observe=observe, num_canaries=num_canaries,
        num_included=int(np.sum(included)), guesses=best.guesses, correct=best.correct,
        abstentions=num_canaries - best.guesses, k_plus=best.k_plus, k_minus=best.k_minus,
        candidates_tried=best.candidates_tried, confidence=confidence, delta=report["delta"],
        epsilon_lower_bound=epsilon_bound, epsilon_accountant=eps_canary, epsilon_reported=eps_reported,
        accountant=report["accountant"], noise_multiplier=report["noise_multiplier"],
        sample_rate=report["sample_rate"], steps=steps, dp_enabled=report["dp_enabled"], passed=passed,
        message=message, comparison=comparison_note(canary_type, canary_sampling, eps_canary, eps_reported, steps),
        noise_ratio=None if noise is None else noise.ratio, noise_p_value=None if noise is None else noise.p_value,
        noise_check_passed=None if noise is None else noise.passed, bound=bound,
        epsilon_lower_bound_eps_delta=outcome.epsilon_lower_bound, mu_lower_bound=mu_bound, mu_accountant=mu_canary,
        report=report,
    )
    if check and not passed:
        raise PrivacyAuditError(message, result)
    return result



def _noise_check(trainer, canaries: GradientCanaries, level: float):
    """The released noise against the noise multipliers the ledger recorded for the same releases (None without
    DP). Reads the ledger, not the mechanism: a mechanism that draws less noise than it reports is what it finds."""
    if not trainer.dp_enabled or not canaries.release_sum_squares:
        return None
    sigmas = [s for s, _, n in _training_history(trainer.ledger) for _ in range(n)]
    observed = canaries.release_sum_squares
    if len(sigmas) < len(observed):
        return None  # the accounting check in run_audit reports this
    return noise_check(observed, canaries.release_dims, sigmas[: len(observed)], level)
