"""epsilon against published reference values, calibration and the budget search."""

import math

import pytest
from opacus.accountants.utils import get_noise_multiplier

from hf_drencoder.privacy import (
    PrivacyAccountant,
    PrivacyBudgetError,
    calibrate_noise_multiplier,
    compute_epsilon,
    gdp_epsilon,
    gdp_mu,
    max_steps_within_budget,
)


def test_rdp_matches_opacus_published_vector():
    # opacus' README/tutorial vector: sigma 1.5, q 0.04, 2250 steps, delta 1e-5 -> epsilon 7.3291
    assert compute_epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.3291, rel=0.01)


def test_rdp_matches_tf_privacy_published_vector():
    # TF-Privacy compute_dp_sgd_privacy: n 60000, batch 150, sigma 1.3, 15 epochs, delta 1e-5 -> 0.7242
    q = 150 / 60000
    steps = 15 * 60000 // 150
    assert compute_epsilon([(1.3, q, steps)], 1e-5, "rdp") == pytest.approx(0.7242, rel=0.01)


def test_three_accountants_on_design_vector():
    # DESIGN.md section 6: sigma 1, q 0.01, 1000 steps, delta 1e-5
    h = [(1.0, 0.01, 1000)]
    assert compute_epsilon(h, 1e-5, "rdp") == pytest.approx(2.1014, rel=0.01)
    assert compute_epsilon(h, 1e-5, "prv") == pytest.approx(1.8384, rel=0.01)
    assert compute_epsilon(h, 1e-5, "gdp") == pytest.approx(1.6177, rel=0.01)
    # PRV is an upper bound: never below an independent PLD value (1.8282) for the same mechanism
    assert compute_epsilon(h, 1e-5, "prv") >= 1.8282


def test_gdp_is_exact_at_full_batch():
    # q = 1: T Gaussian mechanisms of multiplier sigma are exactly sqrt(T)/sigma-GDP
    assert gdp_mu([(2.0, 1.0, 16)]) == pytest.approx(2.0)
    # and a mu-GDP mechanism's (eps, delta) curve is the Gaussian mechanism's: compare with PRV at q = 1
    eps_gdp = gdp_epsilon(gdp_mu([(1.0, 1.0, 4)]), 1e-5)
    assert eps_gdp == pytest.approx(compute_epsilon([(1.0, 1.0, 4)], 1e-5, "prv"), rel=0.01)


def test_gdp_composes_heterogeneous_history():
    h = [(2.0, 1.0, 4), (1.0, 1.0, 1)]
    assert gdp_mu(h) == pytest.approx(math.sqrt(4 / 4 + 1))


def test_accountant_history_merges_and_round_trips():
    acc = PrivacyAccountant(1e-5, "rdp")
    for _ in range(10):
        acc.step(1.0, 0.01)
    acc.step(2.0, 0.5, 3)
    assert acc.history == [(1.0, 0.01, 10), (2.0, 0.5, 3)]
    assert acc.steps == 13
    again = PrivacyAccountant.from_state_dict(acc.state_dict())
    assert again.epsilon() == acc.epsilon()
    assert acc.epsilon() > compute_epsilon([(1.0, 0.01, 10)], 1e-5, "rdp")


def test_calibration_hits_target_from_below_and_agrees_with_opacus():
    for accountant in ("rdp", "prv"):
        sigma = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 500, accountant)
        eps = compute_epsilon([(sigma, 0.01, 500)], 1e-5, accountant)
        assert 0.98 * 3.0 <= eps <= 3.0
        ref = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.01, steps=500, accountant=accountant)
        assert sigma == pytest.approx(ref, rel=0.02)


def test_calibration_pays_for_prior_releases():
    alone = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 500, "rdp")
    with_stage1 = calibrate_noise_multiplier(3.0, 1e-5, 0.01, 500, "rdp", prior_history=[(5.0, 1.0, 2)])
    assert with_stage1 > alone
    assert compute_epsilon([(5.0, 1.0, 2), (with_stage1, 0.01, 500)], 1e-5, "rdp") <= 3.0


def test_unreachable_budget_is_refused_with_advice():
    with pytest.raises(PrivacyBudgetError, match="cannot be reached"):
        calibrate_noise_multiplier(1e-6, 1e-5, 1.0, 10**6, "rdp")
    with pytest.raises(PrivacyBudgetError, match="already spent"):
        calibrate_noise_multiplier(0.5, 1e-5, 0.01, 10, "rdp", prior_history=[(0.5, 1.0, 10)])


def test_max_steps_within_budget_is_the_last_step_that_fits():
    t = max_steps_within_budget(2.0, 1e-5, 1.0, 0.01, "rdp")
    assert compute_epsilon([(1.0, 0.01, t)], 1e-5, "rdp") <= 2.0
    assert compute_epsilon([(1.0, 0.01, t + 1)], 1e-5, "rdp") > 2.0


def test_bad_accountant_and_delta_are_refused():
    with pytest.raises(ValueError, match="unknown accountant"):
        compute_epsilon([(1.0, 0.1, 1)], 1e-5, "moments")
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon([(1.0, 0.1, 1)], 0.0, "rdp")


def test_gdp_epsilon_matches_opacus_and_handles_weak_guarantees():
    from opacus.accountants.analysis.gdp import eps_from_mu

    for mu in (0.1, 0.5, 1.0, 3.0):
        assert gdp_epsilon(mu, 1e-5) == pytest.approx(eps_from_mu(mu=mu, delta=1e-5), rel=1e-6)
    assert math.isfinite(gdp_epsilon(25.0, 1e-5)) and gdp_epsilon(25.0, 1e-5) > gdp_epsilon(20.0, 1e-5) > 280
    # beyond opacus' search range (epsilon > 500) the answer is "unbounded", never a small number
    assert gdp_epsilon(40.0, 1e-5) == math.inf


def test_prv_that_cannot_be_computed_reports_infinity():
    # sigma 1e-6: PRV's grid would need petabytes; the answer must be "unbounded", never a crash or a small number
    assert compute_epsilon([(1e-6, 0.125, 3)], 1 / 64, "prv") == math.inf
    assert compute_epsilon([(1e-6, 0.125, 3)], 1 / 64, "rdp") > 1e6
    assert gdp_mu([(1e-6, 0.125, 3)]) == math.inf and compute_epsilon([(1e-6, 0.125, 3)], 1 / 64, "gdp") == math.inf
