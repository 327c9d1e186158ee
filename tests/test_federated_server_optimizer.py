"""The server optimizer of federated mode (FedAvg, FedAvgM, FedAdam), its resume, and the documented defaults."""

import math
import re
from pathlib import Path

import pytest
import torch

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder.federated import FederatedArguments, FederatedSimulation
from hf_drencoder.federated.cli import FEDERATED_DEFAULTS
from hf_drencoder.federated.server_optimizer import ServerOptimizer
from test_federated import _adapter, fed_args

ROOT = Path(__file__).resolve().parent.parent
# the accountants cost seconds per round at these tiny sampling rates; the optimizer is the same with or without DP
NO_DP = dict(disable_dp=True, noise_multiplier=None)


def test_fedadam_step_matches_a_hand_computation():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerOptimizer("fedadam", lr=lr, betas=(b1, b2), tau=tau)
    x = torch.tensor([1.0, -2.0, 0.5, 0.0])
    deltas = [torch.tensor([0.2, -0.1, 0.0, 3.0]), torch.tensor([-0.4, 0.3, 1e-4, 3.0])]
    m = torch.zeros(4, dtype=torch.float64)
    v = torch.zeros(4, dtype=torch.float64)
    expected = x.double()
    for t, d in enumerate(deltas, start=1):
        x = opt.step(x, d)
        g = -d.double()  # the pseudo-gradient is the negative update
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        expected = expected - lr * m_hat / (v_hat.sqrt() + tau)
        torch.testing.assert_close(x.double(), expected, rtol=1e-6, atol=1e-7)
    # first step: about lr * sign(delta) where |delta| >> tau, smaller where it is not
    assert float(expected[3] - 0.0) > 0


def test_server_momentum_is_fedavgm_and_zero_momentum_is_plain_fedavg():
    x = torch.tensor([1.0, 2.0, 3.0])
    d1, d2 = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.05, 0.05, -0.5])
    plain = ServerOptimizer("fedavg", lr=1.0, momentum=0.0)
    assert torch.equal(plain.step(x, d1), x + d1) and plain.state_tensors() == {}
    fedavgm = ServerOptimizer("fedavg", lr=0.5, momentum=0.9)
    y1 = fedavgm.step(x, d1)
    y2 = fedavgm.step(y1, d2)
    torch.testing.assert_close(y1, x + 0.5 * d1)
    torch.testing.assert_close(y2, y1 + 0.5 * (0.9 * d1 + d2))


def test_the_simulation_applies_plain_fedavg_with_momentum_0_and_lr_1(tmp_path):
    # the global adapter moves by exactly the decoded aggregate of the round's messages
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48),
                              fed_args(tmp_path, num_rounds=1, eval_every=0, server_momentum=0.0, server_learning_rate=1.0,
                                       **NO_DP))
    sim._setup()
    start = _adapter(sim)
    parties = sim.server.sample_parties(0)
    assert parties
    expected = sim.server.aggregate_round([sim.party_step(p, 0) for p in parties], 0)
    sim.run()
    assert torch.equal(_adapter(sim), start + expected)


def test_linear_server_lr_schedule_decays_from_lr_to_lr_over_rounds():
    opt = ServerOptimizer("fedavg", lr=2.0, schedule="linear", num_rounds=4)
    assert [opt.lr_at(t) for t in range(6)] == [2.0, 1.5, 1.0, 0.5, 0.5, 0.5]  # past the plan: stays at lr / R
    x, d = torch.tensor([1.0, -1.0]), torch.tensor([0.25, 0.5])
    assert torch.equal(opt.step(x, d, 0), x + 2.0 * d) and torch.equal(opt.step(x, d, 3), x + 0.5 * d)
    with pytest.raises(ValueError, match="round index"):
        opt.step(x, d)
    # a stateful optimizer takes the round's rate too: FedAvgM b <- mu b + d, x <- x + lr_t b
    m = ServerOptimizer("fedavg", lr=1.0, momentum=0.5, schedule="linear", num_rounds=2)
    y1 = m.step(x, d, 0)
    y2 = m.step(y1, d, 1)
    torch.testing.assert_close(y1, x + d)
    torch.testing.assert_close(y2, y1 + 0.5 * (0.5 * d + d))
    assert ServerOptimizer("fedavg", lr=2.0).lr_at(7) == 2.0
    with pytest.raises(ValueError, match="planned number of rounds"):
        ServerOptimizer("fedavg", schedule="linear")


def test_the_simulation_decays_the_server_lr_by_round(tmp_path):
    """Round 2 of 2 under the linear schedule moves the adapter by lr / 2 times its aggregate, and the history
    records each round's rate."""
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48),
                              fed_args(tmp_path, num_rounds=2, eval_every=0, server_learning_rate=3.0,
                                       server_lr_schedule="linear", **NO_DP))
    sim.run_round()
    before = _adapter(sim)
    parties = sim.server.sample_parties(1)
    assert parties
    expected = sim.server.aggregate_round([sim.party_step(p, 1) for p in parties], 1)
    record = sim.run_round()
    torch.testing.assert_close(_adapter(sim), before + 1.5 * expected)
    assert record["server_learning_rate"] == 1.5 and sim.history[0]["server_learning_rate"] == 3.0
    with pytest.raises(ValueError, match="server_lr_schedule"):
        fed_args(tmp_path, server_lr_schedule="cosine")


def _fedadam(tmp_path, folder, **kw):
    args = fed_args(tmp_path / folder, eval_every=0, server_optimizer="fedadam", server_learning_rate=0.05, seed=0,
                    **NO_DP, **kw)
    return FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)


def test_resume_keeps_the_server_optimizer_state(tmp_path):
    whole = _fedadam(tmp_path, "whole", num_rounds=3)
    whole.run()
    first = _fedadam(tmp_path, "split", num_rounds=3)
    first.run(max_rounds=2)
    state = str(tmp_path / "split" / "fed" / "last-state")
    resumed = _fedadam(tmp_path, "resumed", num_rounds=3, resume_from_checkpoint=state)
    resumed.run()
    assert resumed.server_optimizer.state_tensors().keys() == whole.server_optimizer.state_tensors().keys()
    torch.testing.assert_close(_adapter(resumed), _adapter(whole), rtol=1e-6, atol=1e-7)
    # the optimizer is not a privacy setting, but a state is resumed only with the same one
    other = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48),
                                fed_args(tmp_path / "other", num_rounds=3, eval_every=0, resume_from_checkpoint=state, **NO_DP))
    with pytest.raises(ValueError, match="server_optimizer"):
        other.run()
    decayed = _fedadam(tmp_path, "decayed", num_rounds=3, resume_from_checkpoint=state, server_lr_schedule="linear")
    with pytest.raises(ValueError, match="server_lr_schedule"):
        decayed.run()
    assert whole.server_optimizer.describe()["server_tau"] == 1e-3


def test_server_optimizer_arguments_are_checked(tmp_path):
    assert fed_args(tmp_path).server_learning_rate == 1.0
    assert fed_args(tmp_path, server_optimizer="fedadam").server_learning_rate == 1e-2
    with pytest.raises(ValueError, match="server_beta1"):
        fed_args(tmp_path, server_momentum=0.9, server_optimizer="fedadam")
    with pytest.raises(ValueError, match="server_tau.*fedadam"):
        fed_args(tmp_path, server_tau=0.1)
    with pytest.raises(ValueError, match="unknown"):
        fed_args(tmp_path, server_optimizer="fedyogi")
    with pytest.raises(ValueError, match="server_momentum"):
        fed_args(tmp_path, server_momentum=1.0)


@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "server_learning_rate"), (dict(lr=float("nan")), "server_learning_rate"),
    (dict(momentum=1.0), "server_momentum"), (dict(kind="fedadam", momentum=0.9), "server_beta1"),
    (dict(kind="fedadam", betas=(0.9, 1.0)), "server_beta1"), (dict(kind="fedadam", tau=0.0), "server_tau"),
])
def test_a_server_optimizer_built_directly_checks_its_settings(kw, match):
    """The same checks as FederatedArguments': a ServerOptimizer built by hand never steps with a negative rate or
    a momentum of 1."""
    with pytest.raises(ValueError, match=match):
        ServerOptimizer(**kw)


def test_the_defaults_are_the_documented_ones():
    """docs/federated.md lists the local and server defaults in one line of ``name=value``; the arguments and the
    ``hf-drencoder federated`` command use the same values."""
    text = (ROOT / "docs" / "federated.md").read_text()
    line = re.search(r"<!-- federated-defaults -->\s*`([^`]+)`", text)
    assert line, "docs/federated.md lacks its defaults line"
    documented = dict(item.split("=") for item in line.group(1).split(", "))
    args = FederatedArguments(disable_dp=True)
    for name, value in documented.items():
        actual = getattr(args, name)
        expected = type(actual)(value.strip('"')) if not isinstance(actual, str) else value.strip('"')
        assert actual == expected, name
        if name in FEDERATED_DEFAULTS:
            assert FEDERATED_DEFAULTS[name] == actual, name
    assert {"local_optimizer", "local_learning_rate", "local_steps", "local_batch_size", "server_optimizer",
            "server_learning_rate"} <= documented.keys()
    assert math.isfinite(args.server_learning_rate)


def test_fedadam_warns_when_tau_is_large_against_the_clipping_norm(tmp_path, caplog):
    def warned(**kw):
        caplog.clear()
        sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=24),
                                  fed_args(tmp_path / str(len(caplog.records)), server_optimizer="fedadam", **kw))
        with caplog.at_level("WARNING", logger="hf_drencoder.federated.simulation"):
            sim._setup()
        return [r.getMessage() for r in caplog.records if "server_tau" in r.getMessage()]

    assert warned(max_update_norm=1.0) == []  # the default tau is for max_update_norm 1
    (message,) = warned(max_update_norm=0.1)
    assert "server_tau=0.001 is 0.01 x max_update_norm=0.1" in message and "= 0.0001" in message
    assert warned(max_update_norm=0.1, server_tau=1e-4) == []
