"""Federated mode, what the server and the public learn: a failing party's error text stays in its own log, nothing
published depends on who took part, and local noise calibration (local DP at each party) is accounted as such."""

import json
import logging
import math

import pytest
import torch
from transformers import default_data_collator

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder.federated import FederatedSimulation, privatize_update
from test_federated import fed_args


def _federation(tmp_path, name, failing=(), **kw):
    """6 parties of 6 rows; the collator of every party in ``failing`` raises an error that quotes its data."""
    data = make_cls_dataset(n=36).add_column("party", [i // 6 for i in range(36)])
    partitions = [list(range(6 * i, 6 * i + 6)) for i in range(6)]

    def collator(rows):
        if rows[0]["party"] in failing:
            raise IndexError(f"Target {rows[0]['labels'] + 7} is out of bounds.")
        return default_data_collator(rows)

    args = fed_args(tmp_path / name, **{"eval_every": 0, **kw})
    return FederatedSimulation(make_tiny_bert(), data, args, data_collator=collator, partitions=partitions)


# ---- a failing party ---------------------------------------------------------------------------------------

def test_a_failing_party_error_text_stays_in_its_own_log(tmp_path, caplog):
    sim = _federation(tmp_path, "f", failing={0}, parties_per_round=6, num_rounds=1)  # q = 1: party 0 is sampled
    with caplog.at_level(logging.INFO, logger="hf_drencoder"):  # (a command run earlier may have raised its level)
        (h,) = sim.run()
    assert h["failed"] == [0]
    server = [r.getMessage() for r in caplog.records if r.name == "hf_drencoder.federated.simulation"]
    party = [r.getMessage() for r in caplog.records if r.name == "hf_drencoder.federated.party"]
    assert any("party 0 is left out (party-error)" in line for line in server)
    assert not any("out of bounds" in line or "IndexError" in line for line in server)
    assert any("is out of bounds" in line for line in party)  # the party's own log has the full text


# ---- what is published -------------------------------------------------------------------------------------

def _published(sim, folder):
    sim.save_model(str(folder))
    history = json.loads((folder / "federated_history.json").read_text())
    report = json.loads((folder / "privacy_report.json").read_text())
    return history, report


def _without_update(records):
    # the privatised update itself (and so its norm) is what the run releases; everything else must match
    return [{k: v for k, v in r.items() if k != "update_norm"} for r in records]


def test_what_is_published_does_not_depend_on_who_took_part(tmp_path):
    """Three runs that differ only in who answered (every sampled party, none, or another sample with one failing
    party), with a stage-1 statistics round: the history and privacy report written next to the model are the
    same in every key and value except the update's norm, and the public history returned is too."""
    kw = dict(codec="auto", stats_rounds=1, codec_latent_ratio=1 / 16, num_rounds=2)
    runs = [_federation(tmp_path, "all", sampling_seed=0, **kw),
            _federation(tmp_path, "none", failing=set(range(6)), sampling_seed=0, **kw),
            _federation(tmp_path, "other", failing={0}, sampling_seed=7, **kw)]
    for sim in runs:
        sim.run()
    received = [[h["num_received"] for h in sim.history] for sim in runs]
    assert received[1] == [0, 0, 0] and received[0] != received[1] and any(received[0])
    assert [h["parties"] for h in runs[0].history] != [h["parties"] for h in runs[2].history]
    published = [_published(sim, tmp_path / f"model{i}") for i, sim in enumerate(runs)]
    (h0, r0), *others = published
    assert [set(r) for r in h0][0] >= {"stage", "uplink_bytes_per_party", "epsilon"}
    for h, r in others:
        assert [set(x) for x in h] == [set(x) for x in h0]
        assert _without_update(h) == _without_update(h0)
        assert r == r0
    for sim in runs[1:]:
        assert _without_update(sim.public_history()) == _without_update(runs[0].public_history())
    assert r0["epsilon_server_view"] > 0 and h0[0]["uplink_bytes_per_party"] > 0


# ---- local noise calibration -------------------------------------------------------------------------------

def _phi(x):
    return 0.5 * math.erfc(-x / math.sqrt(2))


def gaussian_composition_epsilon(sigma, rounds, delta):
    """epsilon(delta) of ``rounds`` Gaussian mechanisms with noise multiplier ``sigma`` (sensitivity 1), exactly: the
    composition is mu-GDP with mu = sqrt(rounds) / sigma, and delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)
    (Dong, Roth and Su 2019), solved for eps by bisection."""
    mu = math.sqrt(rounds) / sigma

    def delta_of(eps):
        return _phi(-eps / mu + mu / 2) - math.exp(eps) * _phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


def test_local_noise_calibration_is_local_dp_accounted_at_q_1(tmp_path):
    """noise_calibration='local': each party's message alone is a Gaussian mechanism with sensitivity C and noise
    sigma C, accounted without amplification (q = 1) over every round; the reported epsilon is that mechanism's."""
    C, rounds, delta = 0.5, 2, 1 / 6
    local = _federation(tmp_path, "local", noise_calibration="local", noise_multiplier=None, target_epsilon=4.0,
                        max_update_norm=C, num_rounds=rounds, parties_per_round=2)
    local._setup()
    sigma = local.ledger.noise_multiplier
    # calibrated for the message alone: the exact epsilon of 2 rounds at sigma is within the target, and tight
    assert 3.8 <= gaussian_composition_epsilon(sigma, rounds, delta) <= 4.0
    distributed = _federation(tmp_path, "dist", noise_multiplier=None, target_epsilon=4.0, max_update_norm=C,
                              num_rounds=rounds, parties_per_round=2)
    distributed._setup()
    assert sigma > 1.5 * distributed.ledger.noise_multiplier  # no amplification by sampling or by others' noise

    # the noise in one message: std sigma C, mean 0 (all 6 parties' messages of round 1, 6 x 2147 coordinates)
    noise = []
    for pid in range(6):
        clipped = privatize_update(local._local_update(pid, 0), C, 0.0, None)
        noise.append(local.party_step(pid, 0).payload - clipped)
    noise = torch.cat(noise)
    assert float(noise.std()) == pytest.approx(sigma * C, rel=0.03)
    assert abs(float(noise.mean())) < 0.05 * sigma * C

    local.run()
    report = local.privacy_report()
    assert local.ledger.accountant.history == [(sigma, 1.0, rounds)]
    assert report["noise_calibration"] == "local" and report["sample_rate"] == 1.0
    assert "local DP" in report["neighbouring"] and report["sensitivity"] == C
    exact = gaussian_composition_epsilon(sigma, rounds, delta)
    assert report["epsilon_gdp"] == pytest.approx(exact, rel=1e-6)  # GDP is exact at q = 1
    assert exact - 1e-3 <= report["epsilon"] <= exact + 0.05  # PRV's upper bound
    # against the server nothing is amplified either: the same mechanism
    assert report["epsilon_server_view"] == pytest.approx(exact, rel=1e-6)
    # the distributed default states what its epsilon trusts
    assert distributed.privacy_report()["noise_calibration"] == "distributed"
    assert "every sampled party adds its noise" in distributed.privacy_report()["trust"]


def test_a_state_is_resumed_only_with_the_same_noise_calibration(tmp_path):
    first = _federation(tmp_path, "a", num_rounds=1)
    first.run()
    again = _federation(tmp_path, "b", noise_calibration="local", num_rounds=2,
                        resume_from_checkpoint=str(tmp_path / "a" / "fed" / "last-state"))
    with pytest.raises(ValueError, match="noise_calibration"):
        again.run()
