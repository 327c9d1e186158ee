"""Noise shares: each party adds 1/m of the aggregate's noise, the server tops up below m messages and scales by
sqrt(m / max(k, m)). The aggregate's noise, its sensitivity, the accounting and the server's view, numerically."""

import math

import pytest
import torch

from hf_drencoder.codec.layout import LoraLayout
from hf_drencoder.federated import FederatedSimulation, PartyMessage
from hf_drencoder.federated.party import privatize_update
from hf_drencoder.federated.server import FederatedServer, aggregate_sensitivity
from hf_drencoder.privacy.accounting import compute_epsilon
from hf_drencoder.privacy.noise import make_generator

from conftest import make_cls_dataset, make_tiny_bert
from test_federated import fed_args


def _f(vs: torch.Tensor, m: int) -> torch.Tensor:
    """f(S) = sqrt(m / max(k, m)) * sum of the k clipped updates (rows of vs)."""
    k = vs.shape[0]
    return vs.sum(0) * math.sqrt(m / max(k, m)) if k else torch.zeros(vs.shape[1], dtype=vs.dtype)


@pytest.mark.parametrize("m", [1, 2, 5, 20, 100])
def test_the_scaled_sum_has_sensitivity_h_of_m_and_it_is_attained(m):
    C = 1.0
    h = aggregate_sensitivity(m)
    assert 1.0 <= h < 1.5
    e = torch.zeros(4, dtype=torch.float64)
    e[0] = 1.0
    worst = 0.0
    for k in range(0, 3 * m + 3):
        # aligned updates of norm C and the added one opposite: the case that attains the bound at k = m
        b = torch.stack([C * e] * k) if k else torch.zeros(0, 4, dtype=torch.float64)
        gap = float((_f(torch.cat([b, -C * e[None]]), m) - _f(b, m)).norm())
        assert gap <= h * C + 1e-9
        worst = max(worst, gap)
        g = torch.Generator().manual_seed(1000 * m + k)
        for _ in range(10):  # random clipped updates never exceed it either
            vs = torch.randn(k + 1, 4, generator=g, dtype=torch.float64)
            vs = vs / vs.norm(dim=1, keepdim=True) * torch.rand(k + 1, 1, generator=g, dtype=torch.float64) * C
            assert float((_f(vs, m) - _f(vs[:k], m)).norm()) <= h * C + 1e-9
    assert worst == pytest.approx(h * C, rel=1e-9)
    if m > 1:
        assert h > 1.0  # the scaling costs something: accounting at C alone would under-report epsilon


@pytest.mark.parametrize("k", [0, 3, 10, 25])
def test_the_aggregate_noise_is_the_same_whoever_answers(k):
    sigma, C, dim, m = 1.3, 0.5, 40_000, 10
    layout = LoraLayout(["w.lora_A.x"], [(dim,)])
    server = FederatedServer(layout, num_parties=40, sample_rate=0.25, max_norm=C, noise_multiplier=sigma, noise_seed=k,
                             noise_shares=m)
    h = aggregate_sensitivity(m)
    assert server.party_noise_multiplier == pytest.approx(sigma * h / math.sqrt(m))
    messages = [privatize_update(torch.zeros(dim), C, server.party_noise_multiplier, make_generator("cpu", 100 + i))
                for i in range(k)]
    for msg in messages:  # each party's own noise: 1/m of the aggregate's variance
        assert float(msg.std()) == pytest.approx(h * sigma * C / math.sqrt(m), rel=0.02)
    r = server.noised_aggregate(messages, 0)
    assert float(r.std()) == pytest.approx(h * sigma * C, rel=0.02)  # noise std = multiplier x sensitivity
    update = server.aggregate_round([PartyMessage(i, x, "update") for i, x in enumerate(messages)], 0)
    assert server.update_scale == pytest.approx(math.sqrt(m * 10))
    assert float(update.std()) == pytest.approx(h * sigma * C / math.sqrt(m * 10), rel=0.02)
    assert server.decode_noise_std == pytest.approx(h * sigma * C / math.sqrt(m * 10))


def test_the_signal_is_the_mean_update_and_noise_falls_by_sqrt_m_over_h():
    dim, C, sigma = 1000, 1.0, 1.0
    layout = LoraLayout(["w.lora_A.x"], [(dim,)])
    u = torch.zeros(dim)
    u[0] = 0.5
    for m in (1, 10):
        server = FederatedServer(layout, num_parties=100, sample_rate=0.1, max_norm=C, noise_multiplier=0.0,
                                 noise_shares=m)
        server.noise_multiplier = 1e-12  # the DP code path, with no noise: the signal alone
        update = server.aggregate_round([PartyMessage(i, u.clone(), "update") for i in range(10)], 0)
        assert float(update[0]) == pytest.approx(0.5, rel=1e-6)  # k = q N: the mean clipped update
    one = FederatedServer(layout, 100, 0.1, C, sigma, noise_shares=1).decode_noise_std
    ten = FederatedServer(layout, 100, 0.1, C, sigma, noise_shares=10).decode_noise_std
    assert one / ten == pytest.approx(math.sqrt(10) / aggregate_sensitivity(10))


def test_noise_shares_1_is_the_plain_normalised_sum_value_for_value():
    from hf_drencoder.federated import aggregate

    dim, C, sigma = 500, 1.0, 0.7
    layout = LoraLayout(["w.lora_A.x"], [(dim,)])
    server = FederatedServer(layout, 20, 0.25, C, sigma, noise_seed=3)
    assert server.party_noise_multiplier == sigma and server.update_scale == pytest.approx(math.sqrt(5))
    g = torch.Generator().manual_seed(0)
    for k in (0, 1, 4):
        msgs = [torch.randn(dim, generator=g) for _ in range(k)]
        expected = torch.stack(msgs).sum(0) / math.sqrt(k) if k else aggregate([], lambda: server.phantom_message(2))
        assert torch.equal(server.noised_aggregate(msgs, 2), expected)
    assert float(server.phantom_message(2).std()) == pytest.approx(sigma * C, rel=0.15)


def test_a_run_with_noise_shares_accounts_the_aggregate_and_reports_the_messages(tmp_path):
    m = 3
    args = fed_args(tmp_path, num_rounds=3, noise_shares=m)
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)
    history = sim.run()
    report = sim.privacy_report()
    h = aggregate_sensitivity(m)
    # the released aggregate: multiplier sigma = 1 at q = 0.5 over 3 rounds, as without shares
    assert history[-1]["epsilon_prv"] == pytest.approx(compute_epsilon([(1.0, 0.5, 3)], 1 / 6, "prv"), rel=1e-9)
    # each message alone: multiplier h / sqrt(m) against the server, in every round it answered
    assert report["party_noise_multiplier"] == pytest.approx(h / math.sqrt(m))
    assert report["epsilon_server_view"] == pytest.approx(compute_epsilon([(h / math.sqrt(m), 1.0, 3)], 1 / 6, "gdp"))
    assert report["epsilon_server_view"] > compute_epsilon([(1.0, 1.0, 3)], 1 / 6, "gdp")
    assert report["noise_shares"] == m and report["aggregate_sensitivity"] == pytest.approx(h)
    assert "top-up" in report["aggregation"] and "noise_shares=3" in report["trust"]


def test_noise_shares_are_refused_where_they_are_not_analysed(tmp_path):
    with pytest.raises(ValueError, match="local"):
        fed_args(tmp_path, noise_shares=4, noise_calibration="local")
    with pytest.raises(ValueError, match="Poisson"):
        fed_args(tmp_path, noise_shares=4, party_sampling="fixed", accountant="rdp")
    with pytest.raises(ValueError, match="whole number"):
        fed_args(tmp_path, noise_shares=0)
    layout = LoraLayout(["w.lora_A.x"], [(8,)])
    with pytest.raises(ValueError, match="Poisson"):
        FederatedServer(layout, 10, 0.5, 1.0, 1.0, fixed_size=True, noise_shares=2)


def test_a_state_resumes_only_with_the_same_noise_shares(tmp_path):
    args = fed_args(tmp_path, num_rounds=2, noise_shares=2)
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)
    sim.run(max_rounds=1)
    state = str(tmp_path / "fed" / "last-state")
    again = fed_args(tmp_path, num_rounds=2, noise_shares=1, resume_from_checkpoint=state)
    with pytest.raises(ValueError, match="noise_shares"):
        FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), again).run()
