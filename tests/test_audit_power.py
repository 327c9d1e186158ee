"""The audit's estimator against independent computations, the noise check, and the power of white-box Dirac
canaries through DRTrainer in a reduced form of benchmarks/audit.py (3 seeds, 20,000 canaries, 1 step).

Thresholds of the reduced power test, at reported epsilon 4 (the accountant's epsilon for a canary), delta 1e-5:
correct noise -> the bound stays <= 4 in every seed and its median is >= 1.8 (an ideal audit of a Gaussian with
m = 20,000 reaches a median of 2.2); noise secretly that of epsilon 8 -> every seed FAILS, and the bound itself
is at least 1 above the correct-noise bound of the same seed (the full benchmark measures 10 seeds at m = 10^5).
"""

import logging
import math
import statistics

import numpy as np
import pytest
from scipy.stats import beta as beta_dist

from conftest import dr_args, make_cls_dataset
from hf_drencoder import DRTrainer
from hf_drencoder.audit import (
    epsilon_lower_bound,
    guesses_for,
    lower_bound_from_scores,
    make_input_canaries,
    noise_check,
    run_audit,
)
from hf_drencoder.audit.estimator import FIXED_GUESS_FRACTION, expected_gaussian_bound
from hf_drencoder.privacy import calibrate_noise_multiplier
from hf_drencoder.privacy.accounting import gdp_epsilon
from hf_drencoder.privacy.mechanism import GaussianGradientMechanism

DELTA = 1e-5


@pytest.fixture(autouse=True)
def quiet():
    logging.getLogger("hf_drencoder").setLevel(logging.ERROR)


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
                       noise_seed=100 + seed, lora_r=48, lora_target_modules=["query", "value"])
        return DRTrainer(model=make_model(), args=args, train_dataset=train)

    res = run_audit(build, make_cls_dataset(n=32), num_canaries=M, direction="dirac", seed=seed, check=False)
    monkeypatch.undo()
    return res


def test_white_box_power_at_reported_epsilon_4(tmp_path, monkeypatch):
    ok = [audit(tmp_path, s, 4.0, monkeypatch) for s in SEEDS]
    bad = [audit(tmp_path, s, 8.0, monkeypatch) for s in SEEDS]
    for r in ok + bad:
        assert r.epsilon_accountant == pytest.approx(4.0, abs=0.02) and r.guesses == 2 * round(0.016 * M)
    bounds = [r.epsilon_lower_bound for r in ok]
    assert max(bounds) <= 4.0 and statistics.median(bounds) >= 1.8 and all(r.passed for r in ok)
    assert all(0.97 <= r.noise_ratio < 1.05 for r in ok)  # measured on the coordinates without a canary
    assert not any(r.passed for r in bad)
    assert all(b.epsilon_lower_bound >= o.epsilon_lower_bound + 1.0 for o, b in zip(ok, bad))
    assert all(r.noise_ratio < 0.65 and not r.noise_check_passed for r in bad)  # 0.555 x the accounted noise
    assert "not with the run's reported epsilon" in ok[0].table()
