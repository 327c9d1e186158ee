"""The one-run privacy audit: the epsilon lower bound as a pure function, and audits of real DRTrainer runs that
must find leakage when there is no privacy, stay below the accountant when there is, and catch a mechanism
whose noise, clipping or accounting is broken."""

import json
import math

import numpy as np
import pytest
from scipy.stats import binom

from conftest import dr_args, make_cls_dataset, make_lm_dataset, make_tiny_bert, make_tiny_llama
from hf_drencoder import DRTrainer, PrivacyAuditError
from hf_drencoder.audit import (
    audit_p_value,
    count_correct,
    default_guess_grid,
    epsilon_lower_bound,
    lower_bound_from_scores,
    run_audit,
)
from hf_drencoder.cli import main
from hf_drencoder.privacy import compute_epsilon
from hf_drencoder.privacy import mechanism as mechanism_module
from hf_drencoder.privacy.ledger import PrivacyLedger
from hf_drencoder.privacy.mechanism import GaussianGradientMechanism

DELTA = 1e-5


pytestmark = pytest.mark.usefixtures("quiet_library_logs")


# ---- the statistics ----


def reference_p_value(m, r, v, eps, delta):
    """Steinke, Nasr and Jagielski (2023), Appendix D, written as a plain loop."""
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(binom.pmf(k, r, q) for k in range(v, r + 1))
    alpha, acc = 0.0, 0.0
    for i in range(1, v + 1):
        acc += binom.pmf(v - i, r, q)
        alpha = max(alpha, acc / i)
    return min(tail + 2 * m * delta * alpha, 1.0)


@pytest.mark.parametrize("m,r,v,eps,delta", [
    (100, 100, 90, 1.0, 1e-5), (1000, 200, 150, 0.5, 1e-3), (50, 20, 20, 3.0, 0.0), (500, 300, 120, 0.2, 1e-4),
])
def test_p_value_matches_the_papers_formula(m, r, v, eps, delta):
    assert audit_p_value(m, r, v, eps, delta) == pytest.approx(reference_p_value(m, r, v, eps, delta), rel=1e-9)


@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_without_delta_has_a_closed_form(r):
    # P[Bin(r, q) >= r] = q^r = beta  =>  q = beta^(1/r), eps = log(q / (1 - q))
    beta = 0.05
    q = beta ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, beta) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_bound_is_the_largest_rejected_epsilon():
    m, r, v, beta = 400, 200, 150, 0.05
    eps = epsilon_lower_bound(m, r, v, 0.0, beta)
    q = lambda e: 1 / (1 + math.exp(-e))  # noqa: E731
    assert binom.sf(v - 1, r, q(eps)) < beta <= binom.sf(v - 1, r, q(eps + 1e-6))
    # delta only weakens the bound; more correct guesses strengthen it; chance-level guessing gives nothing
    assert epsilon_lower_bound(m, r, v, 1e-3, beta) < eps < epsilon_lower_bound(m, r, v + 10, 0.0, beta)
    assert epsilon_lower_bound(m, r, r // 2, 0.0, beta) == 0.0
    assert epsilon_lower_bound(m, 0, 0, 0.0, beta) == 0.0


def test_bound_holds_with_the_stated_confidence_on_randomized_response():
    # eps0-randomized response is the worst case of the theorem: each guess is right with prob e^eps0/(1+e^eps0).
    # The bound may exceed eps0 in at most a fraction beta of runs.
    eps0, m, beta, trials = 1.0, 200, 0.05, 400
    rng = np.random.default_rng(0)
    correct = rng.binomial(m, 1 / (1 + math.exp(-eps0)), size=trials)
    bounds = np.array([epsilon_lower_bound(m, m, int(v), 0.0, beta) for v in correct])
    exceed = float(np.mean(bounds > eps0))
    assert exceed <= beta + 3 * math.sqrt(beta * (1 - beta) / trials)
    assert np.median(bounds) > 0.5 * eps0  # and it is not vacuous


def test_guesses_and_the_bonferroni_correction():
    included = np.array([True, False, True, False, True, True])
    scores = np.array([5.0, 0.0, 4.0, 1.0, 3.0, -1.0])  # the last member scores lowest
    assert count_correct(scores, included, 2, 2) == (4, 3)
    assert count_correct(scores, included, 3, 0) == (3, 3)
    grid = default_guess_grid(1000)
    assert len(set(grid)) == len(grid) and all(kp + km <= 1000 for kp, km in grid)
    # perfectly separated scores: every candidate is all-correct; the best r = m is paid for with beta / K
    rng = np.random.default_rng(1)
    inc = rng.random(1000) < 0.5
    sc = np.where(inc, 10.0, 0.0) + rng.normal(0, 0.1, 1000)
    out = lower_bound_from_scores(sc, inc, DELTA, 0.95, guesses=[(int(inc.sum()), int((~inc).sum()))])
    assert (out.guesses, out.correct) == (1000, 1000)
    assert out.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(1000, 1000, 1000, DELTA, 0.05))
    best = lower_bound_from_scores(sc, inc, DELTA, 0.95)
    assert best.candidates_tried == len(default_guess_grid(1000))
    assert best.correct == best.guesses
    assert best.epsilon_lower_bound == pytest.approx(
        epsilon_lower_bound(1000, best.guesses, best.guesses, DELTA, 0.05 / best.candidates_tried))
    assert best.epsilon_lower_bound < out.epsilon_lower_bound
    with pytest.raises(ValueError, match="finite"):
        lower_bound_from_scores(np.array([np.nan, 1.0]), np.array([True, False]), DELTA)


# ---- audits of DRTrainer runs ----

STEPS, SIGMA_Q1 = 5, math.sqrt(5) / 0.5  # every-step canaries: mu = sqrt(T) / sigma = 0.5, epsilon ~ 2 at 1e-5


def bert_builder(tmp_path, **kw):
    def build(train):
        args = dr_args(tmp_path, target_delta=DELTA, max_steps=STEPS, logging_steps=100, **kw)
        return DRTrainer(model=make_tiny_bert(), args=args, train_dataset=train)

    return build


def no_noise(monkeypatch):
    # The mechanism stops adding noise; the ledger and accountant still report a finite epsilon.
    monkeypatch.setattr(GaussianGradientMechanism, "noise_std", property(lambda self: 0.0))


def test_without_privacy_the_audit_finds_a_large_lower_bound(tmp_path):
    # observe="update": read from the gradient the optimizer gets (no codec here, so the same as the release)
    res = run_audit(bert_builder(tmp_path, disable_dp=True), make_cls_dataset(n=64), num_canaries=256,
                    observe="update")
    assert not res.dp_enabled and res.epsilon_accountant == math.inf and res.passed
    assert res.epsilon_lower_bound > 3.0
    assert res.guesses + res.abstentions == 256 and res.correct >= 0.95 * res.guesses


def test_noise_disabled_is_caught_with_poisson_canaries_against_the_reported_epsilon(tmp_path, monkeypatch):
    no_noise(monkeypatch)
    with pytest.raises(PrivacyAuditError) as e:
        run_audit(bert_builder(tmp_path, noise_multiplier=2.0), make_cls_dataset(n=64), num_canaries=256,
                  canary_sampling="poisson", direction="dirac")
    res = e.value.result
    assert res.epsilon_accountant == res.epsilon_reported == pytest.approx(
        compute_epsilon([(2.0, 8 / 64, STEPS)], DELTA, "prv"))
    assert res.epsilon_lower_bound > res.epsilon_accountant


def test_clipping_bypassed_is_caught_by_oversized_canaries(tmp_path, monkeypatch):
    # Canaries of norm 10 C: clipped, they are ordinary examples; unclipped, they leak 10x what is accounted.
    clipped = run_audit(bert_builder(tmp_path, noise_multiplier=SIGMA_Q1), make_cls_dataset(n=64), num_canaries=256,
                        canary_scale=10.0)
    assert clipped.passed
    monkeypatch.setattr(mechanism_module, "clip_and_sum", lambda gs, c, mode="flat", *rest: (
        [g.float().sum(0) for g in gs], gs[0].new_zeros(gs[0].shape[0])))
    with pytest.raises(PrivacyAuditError):
        run_audit(bert_builder(tmp_path, noise_multiplier=SIGMA_Q1), make_cls_dataset(n=64), num_canaries=256,
                  canary_scale=10.0)


def test_a_release_the_ledger_did_not_count_is_caught(tmp_path, monkeypatch):
    original = PrivacyLedger.record_step
    calls = []

    def skip_every_other(self):
        calls.append(1)
        if len(calls) % 2:
            original(self)

    monkeypatch.setattr(PrivacyLedger, "record_step", skip_every_other)
    with pytest.raises(PrivacyAuditError, match="not accounted"):
        run_audit(bert_builder(tmp_path, noise_multiplier=SIGMA_Q1), make_cls_dataset(n=64), num_canaries=16)


def test_latent_noise_space_is_audited_where_it_adds_noise(tmp_path, monkeypatch):
    # noise_space="latent": the mechanism clips and noises codec latents; the canaries are placed there
    import torch

    from hf_drencoder.codec import GaussianPrior, GradientCodec, LoraLayout

    from hf_drencoder.lora import wrap_with_lora

    peft_model = wrap_with_lora(make_tiny_bert(), None, r=8, alpha=16, dropout=0.0, target_modules=None)
    layout = LoraLayout.from_model(peft_model)
    prior = GaussianPrior(layout, torch.zeros(layout.dim), torch.full((layout.dim,), 1e-4),
                          meta={"privacy_history": [[1.5, 0.25, 2]]})
    codec = GradientCodec.from_prior(prior, 1 / 4, lora_rank=0)
    assert codec.latent_dim >= 128

    def build(train):
        args = dr_args(tmp_path, target_delta=DELTA, max_steps=STEPS, logging_steps=100, noise_space="latent",
                       noise_multiplier=SIGMA_Q1)
        return DRTrainer(model=make_tiny_bert(), args=args, train_dataset=train, codec=codec)

    ok = run_audit(build, make_cls_dataset(n=64), num_canaries=128)
    # the stage-1 release (no canary takes part in it) is not in the canaries' epsilon; it is in the reported one
    assert ok.epsilon_accountant == pytest.approx(compute_epsilon([(SIGMA_Q1, 1.0, STEPS)], DELTA, "prv"))
    assert ok.report["history"][0] == [1.5, 0.25, 2]
    no_noise(monkeypatch)
    with pytest.raises(PrivacyAuditError):
        run_audit(build, make_cls_dataset(n=64), num_canaries=128)
    with pytest.raises(ValueError, match="observe='release'"):
        run_audit(build, make_cls_dataset(n=64), num_canaries=16, observe="update")


def llama_builder(tmp_path, steps, **kw):
    def build(train):
        args = dr_args(tmp_path, target_delta=DELTA, max_steps=steps, per_device_train_batch_size=16,
                       learning_rate=3e-2, logging_steps=100, **kw)
        return DRTrainer(model=make_tiny_llama(), args=args, train_dataset=train)

    return build


def test_input_canaries_black_box(tmp_path):
    data = make_lm_dataset(n=64)
    off = run_audit(llama_builder(tmp_path, 30, disable_dp=True), data, canary_type="input", num_canaries=128)
    assert off.epsilon_lower_bound > 1.0 and off.canary_type == "input" and off.passed
    on = run_audit(llama_builder(tmp_path, 4, noise_multiplier=1.0), data, canary_type="input", num_canaries=64)
    assert on.epsilon_accountant == on.epsilon_reported and math.isfinite(on.epsilon_reported)
    assert on.passed and on.epsilon_lower_bound < min(on.epsilon_reported, off.epsilon_lower_bound)


# ---- the command ----


def cli_args(tmp_path, *extra):
    return ["audit", "--output_dir", str(tmp_path / "out"), "--train_examples", "64", "--per_device_train_batch_size",
            "8", "--max_steps", str(STEPS), "--noise_multiplier", str(SIGMA_Q1), "--num_canaries", "256",
            "--noise_seed", "0", "--audit_output", str(tmp_path / "audit.json"), *extra]


def test_with_privacy_the_bound_stays_below_the_accountant_cli(tmp_path, capsys):
    main(cli_args(tmp_path))
    out = capsys.readouterr().out
    assert "epsilon lower bound" in out and "PASS" in out
    res = json.loads((tmp_path / "audit.json").read_text())
    for key in ("epsilon_lower_bound", "epsilon_accountant", "epsilon_reported", "num_canaries", "correct", "guesses",
                "abstentions", "confidence"):
        assert key in res
    # every-step canaries are compared with the accountant at q = 1 for the steps the ledger counted
    assert res["epsilon_accountant"] == pytest.approx(compute_epsilon([(SIGMA_Q1, 1.0, STEPS)], DELTA, "prv"))
    assert 1.5 < res["epsilon_accountant"] < 2.5
    assert res["epsilon_reported"] == pytest.approx(compute_epsilon([(SIGMA_Q1, 8 / 64, STEPS)], DELTA, "prv"))
    assert res["passed"] and res["epsilon_lower_bound"] < res["epsilon_accountant"]
    assert res["num_canaries"] == 256 and res["confidence"] == 0.95 and res["steps"] == STEPS
    assert res["guesses"] + res["abstentions"] == 256


def test_noise_disabled_inside_the_mechanism_is_caught_cli(tmp_path, monkeypatch, capsys):
    no_noise(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(cli_args(tmp_path))
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "leaked more than" in captured.err
    res = json.loads((tmp_path / "audit.json").read_text())
    assert not res["passed"] and math.isfinite(res["epsilon_accountant"])
    assert res["epsilon_lower_bound"] > res["epsilon_accountant"] + 1.0


def test_cli_defaults_dirac_canaries_on_most_coordinates_and_writes_infinity_as_null(tmp_path, capsys):
    main(["audit", "--output_dir", str(tmp_path / "out"), "--train_examples", "64", "--per_device_train_batch_size",
          "8", "--max_steps", "2", "--disable_dp", "--audit_output", str(tmp_path / "audit.json")])
    text = (tmp_path / "audit.json").read_text()
    res = json.loads(text)  # standard JSON: no Infinity
    assert "Infinity" not in text and res["epsilon_accountant"] is None and res["epsilon_reported"] is None
    assert res["non_finite"]["epsilon_accountant"] == "inf"
    # as many Dirac canaries as 90% of the noised coordinates (the built-in tiny-bert has 2,147)
    assert res["num_canaries"] == int(0.9 * 2147) and res["bound"] == "eps_delta" and res["passed"]
