"""The audit's estimators against independent computations, the noise check, and the power of white-box Dirac
canaries through DRTrainer in a reduced form of benchmarks/audit.py (3 seeds, 20,000 canaries, 1 step).

Thresholds of the reduced power test, at reported epsilon 4 (the accountant's epsilon for a canary), delta 1e-5,
with the Gaussian-DP bound (the one the verdict uses for every-step gradient canaries): correct noise -> the
bound stays <= 4 in every seed and its median is >= 2 (an ideal audit of a Gaussian with m = 20,000 reaches a
median of 2.9, at most 3.3 over 10 seeds); noise secretly that of epsilon 8 -> the bound alone exceeds 4 in
every seed (ideal audit: at least 4.7 over 10 seeds), so every seed FAILS on the bound, not only on the noise
check. The full benchmark measures 10 seeds at m = 50,000.
"""

import math
import statistics

from statistics import NormalDist

import numpy as np
import pytest
from scipy.stats import beta as beta_dist
from scipy.stats import binom

from conftest import dr_args, make_cls_dataset
from hf_drencoder import DRTrainer
from hf_drencoder.audit import (
    epsilon_lower_bound,
    guesses_for,
    make_input_canaries,
    noise_check,
    run_audit,
)
from hf_drencoder.audit.estimator import FIXED_GUESS_FRACTION, count_correct, expected_gaussian_bound
from hf_drencoder.audit.estimator_fdp import (
    fdp_p_value,
    gdp_bound_from_scores,
    gdp_epsilon_at,
    gdp_mu_lower_bound,
    gdp_p_value,
    gdp_power,
    gdp_power_inverse,
)
from hf_drencoder.privacy import calibrate_noise_multiplier
from hf_drencoder.privacy.accounting import gdp_epsilon
from hf_drencoder.privacy.mechanism import GaussianGradientMechanism

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("quiet_library_logs")


def logit(q):
    return math.log(q / (1 - q))


# ---- the estimator ----


@pytest.mark.parametrize("r,v", [(10, 10), (100, 90), (200, 150), (1000, 700), (3200, 3000)])
def test_pure_dp_bound_is_the_clopper_pearson_limit(r, v):
    # delta = 0: P[Bin(r, q) >= v] = I_q(v, r - v + 1) (the binomial tail as a regularised incomplete beta), so
    # the largest rejected q is the Beta(v, r - v + 1) quantile at beta, and eps = logit(q): computed here without
    # the audit's bisection or its binomial sums.
    b = 0.05
    assert epsilon_lower_bound(r, r, v, 0.0, b) == pytest.approx(max(0.0, logit(beta_dist.ppf(b, v, r - v + 1))), abs=1e-6)


def test_delta_term_costs_what_the_formula_says():
    # all r guesses right: p(eps) = q^r + 2 m delta max_i P[r - i <= Bin(r, q) < r] / i, here summed term by term
    # from the binomial coefficients (log space). At the returned eps the p-value is beta (to the bisection's
    # precision), and the delta term makes the bound weaker than at delta = 0.
    m, r, b = 20_000, 640, 0.05
    eps = epsilon_lower_bound(m, r, r, DELTA, b)
    q = 1 / (1 + math.exp(-eps))

    def pmf(j):  # P[Bin(r, q) = r - j]: j wrong guesses
        return math.exp(math.lgamma(r + 1) - math.lgamma(j + 1) - math.lgamma(r - j + 1)
                        + (r - j) * math.log(q) + j * math.log1p(-q))

    acc, alpha = 0.0, 0.0
    for i in range(1, r + 1):
        acc += pmf(i)
        alpha = max(alpha, acc / i)
    assert q**r + 2 * m * DELTA * alpha == pytest.approx(b, rel=1e-5)
    assert eps < epsilon_lower_bound(m, r, r, 0.0, b)


def test_fixed_guess_rule_for_many_canaries():
    assert guesses_for(100_000) == [(1600, 1600)] and FIXED_GUESS_FRACTION == 0.016
    assert len(guesses_for(1000)) > 1  # the Bonferroni grid below 10^4 canaries
    # an ideal audit of the Gaussian mechanism with 10^5 canaries: the ceiling the white-box audit can reach
    mu4 = 0.9249  # gdp_epsilon(mu4, 1e-5) = 4
    assert gdp_epsilon(mu4, DELTA) == pytest.approx(4.0, abs=1e-3)
    ideal = [expected_gaussian_bound(100_000, mu4, DELTA, seed=s) for s in range(3)]
    assert all(2.1 < b < 2.6 for b in ideal)


# ---- the Gaussian-DP (f-DP) bound ----


def pure_dp_power_inverse(eps):
    # fbar(a) = min(e^eps a, 1 - e^-eps (1 - a)) for (eps, 0)-DP; its inverse
    return lambda p: max(p * math.exp(-eps), 1 - (1 - p) * math.exp(eps), 0.0)


@pytest.mark.parametrize("m,r,v,eps", [(1000, 100, 80, 1.0), (1000, 1000, 700, 0.5), (10_000, 200, 190, 2.0),
                                       (50_000, 1600, 1500, 2.0)])
def test_fdp_bound_with_the_pure_dp_curve_is_valid_and_close_to_the_binomial_tail(m, r, v, eps):
    # Randomized response on each canary is eps-DP and makes every guess right independently with probability
    # q = e^eps / (1 + e^eps): P[C >= v] is then exactly the binomial tail, so a valid bound for the eps-DP curve
    # is never below it; the f-DP bound is within 20% of it.
    tail = binom.sf(v - 1, r, 1 / (1 + math.exp(-eps)))
    p = fdp_p_value(m, r, v, pure_dp_power_inverse(eps))
    assert tail <= p <= 1.2 * tail


def test_fdp_bound_is_the_optimum_of_its_convex_program():
    # The bound is the largest P[C >= v] over distributions D of C with X_j <= fbar(Y_{j-1}) (estimator_fdp).
    # Solved here independently as a linear program, fbar replaced by 400 of its tangents (an outer approximation:
    # the LP optimum is at least the true one, and close to it): it must agree with the closed-form solution.
    from scipy.optimize import linprog

    m, r, mu = 200, 30, 1.0
    ys = np.concatenate([np.logspace(-12, -0.001, 400)])
    z = np.array([NormalDist().inv_cdf(y) for y in ys])
    slope = np.exp(-mu * z - mu**2 / 2)  # fbar'(y) for mu-GDP
    icpt = np.array([gdp_power(y, mu) for y in ys]) - slope * ys
    lev = np.arange(r + 1)
    for v in (22, 26, 29):
        rows, rhs = [], []
        for j in range(1, r + 1):
            x = np.where(lev >= j, lev, 0) / m
            y = np.where(lev >= j - 1, r - lev, 0) / m
            for a, b in zip(icpt, slope):
                rows.append(x - b * y)
                rhs.append(a)
        lp = linprog(-(lev >= v).astype(float), A_ub=np.array(rows), b_ub=np.array(rhs),
                     A_eq=np.ones((1, r + 1)), b_eq=[1.0], bounds=(0, None), method="highs")
        closed = gdp_p_value(m, r, v, mu)
        assert lp.status == 0 and -lp.fun == pytest.approx(closed, rel=1e-3, abs=1e-9)


def test_gdp_bound_is_valid_on_the_gaussian_mechanism():
    # scores N(mu * included, 1): the Gaussian mechanism, exactly mu-GDP for each canary. The bound on P[C >= v]
    # is never below the simulated frequency, and mu is wrongly rejected in far fewer than 5% of runs.
    m, mu, k, runs = 2000, 1.0, 50, 600
    rng = np.random.default_rng(3)
    correct = []
    for _ in range(runs):
        inc = rng.random(m) < 0.5
        correct.append(count_correct(rng.normal(0, 1, m) + mu * inc, inc, k, k)[1])
    correct = np.array(correct)
    for v in (95, 97, 99):
        freq = np.mean(correct >= v)
        assert freq <= gdp_p_value(m, 2 * k, v, mu) + 3 * math.sqrt(max(freq, 1 / runs) / runs)
    assert np.mean([gdp_mu_lower_bound(m, 2 * k, int(v), 0.05) > mu for v in correct]) < 0.05
    assert gdp_power_inverse(gdp_power(0.01, mu), mu) == pytest.approx(0.01)


def test_gdp_bound_of_an_ideal_audit_separates_epsilon_4_from_8():
    # the ideal audit of a Gaussian mechanism with 50,000 canaries (the benchmark's m): the (epsilon, delta) bound
    # cannot tell epsilon 8 from 4 reliably (its median at 8 is about 4.2); the Gaussian-DP bound can
    mu4, mu8 = 0.9249, 1.6660  # gdp_epsilon(mu, 1e-5) = 4 and 8
    assert gdp_epsilon_at(mu4, DELTA) == pytest.approx(4.0, abs=2e-3)
    assert gdp_epsilon_at(mu8, DELTA) == pytest.approx(8.0, abs=2e-3)
    at4 = [expected_gaussian_bound(50_000, mu4, DELTA, seed=s, method="gdp") for s in range(3)]
    at8 = [expected_gaussian_bound(50_000, mu8, DELTA, seed=s, method="gdp") for s in range(3)]
    assert all(2.5 < b < 3.6 for b in at4) and all(b > 5.0 for b in at8)
    old8 = [expected_gaussian_bound(50_000, mu8, DELTA, seed=s) for s in range(3)]
    assert all(g > o + 1.0 for g, o in zip(at8, old8))
    scores, inc = np.arange(10.0), np.arange(10) % 2 == 0
    with pytest.raises(ValueError):
        gdp_bound_from_scores(scores, inc[:5])


def test_noise_check_is_valid_and_sensitive():
    rng = np.random.default_rng(0)
    d, sigma = 5000, 1.3

    def sq(std, signal=0.0, steps=3):
        return [float(np.sum((signal + rng.normal(0, std, d)) ** 2)) for _ in range(steps)]

    # false alarms at level 0.05 happen in about 5% of correct runs (chi-square, exact)
    alarms = np.mean([not noise_check(sq(sigma), d, [sigma] * 3, 0.05).passed for _ in range(300)])
    assert alarms < 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)
    ok = noise_check(sq(sigma), d, [sigma] * 3)
    assert ok.passed and ok.ratio == pytest.approx(1.0, abs=0.02) and ok.dof == 3 * d
    assert noise_check(sq(sigma, signal=0.5), d, [sigma] * 3).ratio > 1.02  # signal only adds
    low = noise_check(sq(0.95 * sigma), d, [sigma] * 3)
    assert not low.passed and low.ratio == pytest.approx(0.95, abs=0.02)


# ---- input canaries for a classifier: rare tokens, flipped labels ----


def test_classifier_input_canaries_use_rare_tokens_and_flipped_labels():
    data = make_cls_dataset(n=64)
    seen = {t for row in data["input_ids"] for t in row}
    can = make_input_canaries(data, 50, seed=0, vocab_size=1000)
    flat = [t for row in can["input_ids"] for t in row[1:-1]]
    assert not set(flat) & seen and len(set(flat)) > 100
    # each canary is a copy of some row with its label changed: no canary keeps the label of its source row
    sources = {tuple(r[:1] + r[-1:]): lab for r, lab in zip(data["input_ids"], data["labels"])}
    for row, label in zip(can["input_ids"], can["labels"]):
        assert sources[tuple(row[:1] + row[-1:])] != label


# ---- power through DRTrainer: Dirac canaries, every step, release read by the auditor ----

M, SEEDS = 20_000, (0, 1, 2)


def make_model():
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64))


def audit(tmp_path, seed, real_epsilon, monkeypatch):
    sigma = calibrate_noise_multiplier(4.0, DELTA, 1.0, 1, "prv")
    factor = calibrate_noise_multiplier(real_epsilon, DELTA, 1.0, 1, "prv") / sigma
    original = GaussianGradientMechanism.noise_std
    # the bug: the mechanism draws less noise than the ledger records
    monkeypatch.setattr(GaussianGradientMechanism, "noise_std", property(lambda self: original.fget(self) * factor))

    def build(train):
        args = dr_args(tmp_path, target_delta=DELTA, max_steps=1, logging_steps=100, noise_multiplier=sigma,
                       noise_seed=100 + seed, default_lora_r=48, default_lora_target_modules=["query", "value"])
        return DRTrainer(model=make_model(), args=args, train_dataset=train)

    res = run_audit(build, make_cls_dataset(n=32), num_canaries=M, direction="dirac", seed=seed, check=False)
    monkeypatch.undo()
    return res


def test_white_box_power_at_reported_epsilon_4(tmp_path, monkeypatch):
    ok = [audit(tmp_path, s, 4.0, monkeypatch) for s in SEEDS]
    bad = [audit(tmp_path, s, 8.0, monkeypatch) for s in SEEDS]
    for r in ok + bad:
        # calibrated within 1% below the target (docs/privacy.md)
        assert 0.99 * 4.0 <= r.epsilon_accountant <= 4.0 and r.guesses == 2 * round(0.016 * M)
        assert r.bound == "gdp" and r.mu_accountant == pytest.approx(0.9225, rel=0.01)
        assert r.epsilon_lower_bound == pytest.approx(gdp_epsilon_at(r.mu_lower_bound, DELTA))
        assert r.epsilon_lower_bound_eps_delta < r.epsilon_lower_bound  # the (epsilon, delta) bound, weaker
    bounds = [r.epsilon_lower_bound for r in ok]
    assert max(bounds) <= 4.0 and statistics.median(bounds) >= 2.0 and all(r.passed for r in ok)
    assert all(r.mu_lower_bound <= r.mu_accountant for r in ok)
    assert all(0.97 <= r.noise_ratio < 1.05 for r in ok)  # measured on the coordinates without a canary
    # the bound alone catches the under-reported noise, in every seed
    assert all(r.epsilon_lower_bound > 4.0 and r.mu_lower_bound > r.mu_accountant and not r.passed for r in bad)
    assert all("Gaussian DP mu >=" in r.message and "FAIL" in r.message for r in bad)
    assert all(r.noise_ratio < 0.65 and not r.noise_check_passed for r in bad)  # 0.561 x the accounted noise
    assert "not with the run's reported epsilon" in ok[0].table() and "the one release" in ok[0].table()
