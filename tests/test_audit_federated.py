"""The one-run audit in federated mode: canary parties sent through the parties' own privatisation and the
server's aggregation. It must find leakage without DP, stay below the client-level accountant with DP, and
catch parties whose noise is switched off while the ledger still reports a finite epsilon."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder import PrivacyAuditError
from hf_drencoder.audit import FederatedCanaries, run_federated_audit
from hf_drencoder.cli import main
from hf_drencoder.codec import GradientCodec
from hf_drencoder.codec.priors import GaussianPrior
from hf_drencoder.federated import FederatedArguments, FederatedSimulation
from hf_drencoder.federated import party as party_module
from hf_drencoder.privacy import compute_epsilon

DELTA, ROUNDS, M = 1e-5, 3, 256
SIGMA = math.sqrt(ROUNDS) / 0.5  # every-round canaries: mu = sqrt(T) / sigma = 0.5, epsilon ~ 2 at 1e-5


pytestmark = pytest.mark.usefixtures("quiet_library_logs")


def simulation(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "fed"), num_parties=8, parties_per_round=2, num_rounds=ROUNDS, local_steps=1,
                local_batch_size=4, local_learning_rate=0.1, local_optimizer="sgd", noise_multiplier=SIGMA,
                target_delta=DELTA, noise_seed=0, sampling_seed=0, disable_tqdm=True, eval_every=0, lora_target_modules=["query", "value"])
    base.update(kw)
    return FederatedSimulation(make_tiny_bert(), make_cls_dataset(32), FederatedArguments(**base))


def no_party_noise(monkeypatch):
    # the bug: parties (real and canary) skip their noise while the ledger still counts (sigma, q) per round
    monkeypatch.setattr(party_module, "gaussian_noise_like", lambda t, std, g: torch.zeros_like(t, dtype=torch.float32))


def test_dp_off_the_audit_has_power(tmp_path):
    res = run_federated_audit(simulation(tmp_path, disable_dp=True, noise_multiplier=None), num_canaries=M)
    assert res.passed and res.canary_type == "party" and not res.dp_enabled
    assert res.epsilon_accountant == math.inf and res.steps == ROUNDS
    assert res.correct == res.guesses >= 0.85 * M  # canaries and non-canaries separate perfectly
    assert res.epsilon_lower_bound > 3.0  # the ceiling for 256 canaries at 95% is about 3.65


def test_dp_on_the_bound_stays_below_the_client_level_accountant(tmp_path):
    res = run_federated_audit(simulation(tmp_path), num_canaries=M)
    assert res.passed and res.dp_enabled and res.steps == ROUNDS
    # every-round canaries are compared with the client-level accountant at q = 1; the run reports rate q
    with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q) at q = 1
        assert res.epsilon_accountant == pytest.approx(compute_epsilon([(SIGMA, 1.0, ROUNDS)], DELTA, "prv"))
    assert res.epsilon_reported == pytest.approx(compute_epsilon([(SIGMA, 2 / 8, ROUNDS)], DELTA, "prv"))
    assert 1.5 < res.epsilon_accountant < 2.5
    assert res.epsilon_lower_bound < res.epsilon_accountant


def test_party_noise_disabled_is_caught(tmp_path, monkeypatch):
    no_party_noise(monkeypatch)
    with pytest.raises(PrivacyAuditError, match="FAIL") as err:
        run_federated_audit(simulation(tmp_path), num_canaries=M)
    res = err.value.result
    assert math.isfinite(res.epsilon_accountant) and res.epsilon_lower_bound > res.epsilon_accountant + 1


def test_poisson_canaries_catch_missing_noise_against_the_reported_epsilon(tmp_path, monkeypatch):
    no_party_noise(monkeypatch)
    res = run_federated_audit(simulation(tmp_path), num_canaries=M, canary_sampling="poisson", check=False)
    assert res.epsilon_accountant == pytest.approx(res.epsilon_reported)
    assert not res.passed and res.epsilon_lower_bound > res.epsilon_reported


def test_canary_messages_are_aggregated_like_parties_messages(tmp_path, monkeypatch):
    # R = sum / sqrt(k): k must count the canaries' messages, and they must come from the parties' privatize_update
    from hf_drencoder.federated import server as server_module

    sim = simulation(tmp_path, num_rounds=2)
    canaries = FederatedCanaries(16, seed=1)
    canaries.attach(sim)
    norms, ks = [], []
    privatize, aggregate = party_module.privatize_update, server_module.aggregate

    def spy_privatize(update, *a, **kw):
        norms.append(float(update.norm()))
        return privatize(update, *a, **kw)

    def spy_aggregate(payloads, phantom):
        ks.append(len(payloads))
        return aggregate(payloads, phantom)

    monkeypatch.setattr(party_module, "privatize_update", spy_privatize)
    monkeypatch.setattr(server_module, "aggregate", spy_aggregate)
    sim.run()
    included = int(canaries.included.sum())
    assert included > 0
    assert ks == [rec["num_received"] + included for rec in sim.history]
    assert sum(n == pytest.approx(1.0, rel=1e-5) for n in norms) == 2 * included  # |u_i| = C, every round
    with pytest.raises(ValueError, match="fresh federation"):
        FederatedCanaries(4).attach(sim)


def test_cli_federated_mode_exits_1_on_missing_noise(tmp_path, monkeypatch, capsys):
    out = tmp_path / "audit.json"
    argv = ["audit", "--mode", "federated", "--model", "tiny-bert", "--train_examples", "32", "--num_parties", "8",
            "--parties_per_round", "2", "--num_rounds", str(ROUNDS), "--local_steps", "1", "--num_canaries", "128",
            "--noise_multiplier", str(SIGMA), "--output_dir", str(tmp_path / "o"), "--audit_output", str(out)]
    no_party_noise(monkeypatch)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 1
    bad = json.loads(out.read_text())
    assert bad["canary_type"] == "party" and bad["steps"] == ROUNDS and bad["num_canaries"] == 128
    assert not bad["passed"] and bad["epsilon_lower_bound"] > bad["epsilon_accountant"]
    assert "FAIL" in capsys.readouterr().out


def test_with_a_codec_canaries_are_scored_on_the_latent_aggregate(tmp_path, monkeypatch):
    # a ready codec whose prior cost one party-level release: it is in the ledger but holds no canary, so the
    # canaries' epsilon is that of the training rounds only; canary messages are latents, aggregated and decoded once
    def sim(folder):
        s = simulation(tmp_path / folder)
        prior = GaussianPrior(s.layout, torch.zeros(s.layout.dim), torch.linspace(0.1, 1.0, s.layout.dim))
        s.codec_spec = GradientCodec.from_prior(prior, 1 / 4, stage1_privacy={"history": [[2.0, 0.25, 1]], "unit": "party"})
        return s

    res = run_federated_audit(sim("ok"), num_canaries=128)
    assert res.report["codec_latent_dim"] is not None
    with np.errstate(divide="ignore"):
        assert res.epsilon_accountant == pytest.approx(compute_epsilon([(SIGMA, 1.0, ROUNDS)], DELTA, "prv"))
    assert res.epsilon_reported == pytest.approx(compute_epsilon([(2.0, 0.25, 1), (SIGMA, 0.25, ROUNDS)], DELTA, "prv"))
    assert res.passed and res.epsilon_lower_bound < res.epsilon_accountant
    no_party_noise(monkeypatch)
    bad = run_federated_audit(sim("bad"), num_canaries=128, check=False)
    assert not bad.passed and bad.epsilon_lower_bound > bad.epsilon_accountant
