"""FFA-LoRA in federated mode (``lora_freeze_a``): A stays at its initialisation, only B and the head are sent, a
resumed federation trains against the same A, and Flower (one model per party) refuses it."""

import pytest
import torch

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder.federated import FederatedSimulation
from hf_drencoder.federated.flower import ClientLevelDPStrategy
from hf_drencoder.federated.flower_common import _refuse_freeze_a
from test_federated import fed_args

NO_DP = dict(disable_dp=True, noise_multiplier=None)


def _factors(sim, kind):
    return {n: p.detach().clone() for n, p in sim.model.named_parameters() if f"lora_{kind}." in n}


def _sim(tmp_path, folder, model_seed=0, **kw):
    model = make_tiny_bert()
    torch.manual_seed(model_seed)  # the LoRA factors are drawn when the simulation wraps the model
    return FederatedSimulation(model, make_cls_dataset(n=48), fed_args(tmp_path / folder, eval_every=0, seed=0, **kw))


def test_ffa_trains_b_and_the_head_and_sends_only_them(tmp_path):
    full = _sim(tmp_path, "full", num_rounds=1, **NO_DP)
    sim = _sim(tmp_path, "ffa", num_rounds=2, lora_freeze_a=True, **NO_DP)
    a0, b0 = _factors(sim, "A"), _factors(sim, "B")
    assert a0 and all((b == 0).all() for b in b0.values())  # peft starts B at zero
    history = sim.run()
    assert all(torch.equal(p, a0[n]) for n, p in _factors(sim, "A").items())
    assert any(not torch.equal(p, b0[n]) for n, p in _factors(sim, "B").items())
    a_values = sum(p.numel() for p in a0.values())
    assert sim.layout.dim == full.layout.dim - a_values
    assert not any("lora_A" in b.name for b in sim.layout.blocks)
    assert all(h["uplink_bytes_per_party"] == 4 * sim.layout.dim for h in history if h.get("stage") == "train")


def test_ffa_under_dp_logs_the_released_dimension(tmp_path, caplog):
    sim = _sim(tmp_path, "dp", num_rounds=1, lora_freeze_a=True, accountant="rdp")
    with caplog.at_level("WARNING", logger="hf_drencoder.federated.simulation"):
        sim.run()
    assert f"released dimension={sim.layout.dim} (lora_freeze_a" in caplog.text


def test_a_resumed_federation_trains_against_the_saved_a(tmp_path):
    whole = _sim(tmp_path, "whole", num_rounds=3, lora_freeze_a=True, **NO_DP)
    whole.run()
    first = _sim(tmp_path, "split", num_rounds=3, lora_freeze_a=True, **NO_DP)
    first.run(max_rounds=2)
    state = str(tmp_path / "split" / "fed" / "last-state")
    # a rebuilt model draws another A; the resumed run must replace it by the one B was trained against
    resumed = _sim(tmp_path, "resumed", model_seed=123, num_rounds=3, lora_freeze_a=True, resume_from_checkpoint=state,
                   **NO_DP)
    assert any(not torch.equal(p, _factors(whole, "A")[n]) for n, p in _factors(resumed, "A").items())
    resumed.run()
    for kind in ("A", "B"):
        mine, ref = _factors(resumed, kind), _factors(whole, kind)
        for n in ref:
            torch.testing.assert_close(mine[n], ref[n], rtol=1e-6, atol=1e-7)
    thawed = _sim(tmp_path, "thawed", num_rounds=3, resume_from_checkpoint=state, **NO_DP)
    with pytest.raises(ValueError, match="lora_freeze_a"):
        thawed.run()


def test_flower_refuses_ffa(tmp_path):
    sim = _sim(tmp_path, "layout", num_rounds=1, **NO_DP)
    with pytest.raises(ValueError, match="lora_freeze_a is not available on Flower"):
        ClientLevelDPStrategy(fed_args(tmp_path, lora_freeze_a=True), sim.layout)
    with pytest.raises(ValueError, match="lora_freeze_a is not available on Flower"):
        _refuse_freeze_a({"lora-freeze-a": "true"})
    _refuse_freeze_a({"lora-freeze-a": "false", "lora-r": 4})  # unset: nothing to refuse


def test_ffa_with_parallel_parties_gives_the_same_adapter(tmp_path):
    one = _sim(tmp_path, "one", num_rounds=2, lora_freeze_a=True, **NO_DP)
    one.run()
    many = _sim(tmp_path, "many", num_rounds=2, lora_freeze_a=True, parallel_parties=3, **NO_DP)
    many.run()
    torch.testing.assert_close(many._global_flat(), one._global_flat(), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(p, _factors(one, "A")[n]) for n, p in _factors(many, "A").items())
