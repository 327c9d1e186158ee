"""Federated mode end to end with a codec from the parties' stage-1 statistics, and resuming a federation."""

import pytest
import torch

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder.federated import FederatedSimulation
from hf_drencoder.privacy import PrivacyBudgetError, compute_epsilon
from test_federated import _adapter, fed_args


def test_federated_run_with_codec_from_the_parties(tmp_path):
    args = fed_args(tmp_path, codec="auto", stats_rounds=1, stats_noise_multiplier=2.0, codec_latent_ratio=1 / 16)
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args, eval_dataset=make_cls_dataset(n=12, seed=1))
    history = sim.run()
    stats, train = history[0], history[1:]
    assert stats["stage"] == "statistics" and [h["round"] for h in train] == [1, 2]
    assert sim.codec is not None and sim.codec.lowrank_payload == 0
    # the head (modules_to_save) travels raw next to the latent of the LoRA part
    assert sim.codec.raw_dim == 99 and sim.codec.latent_dim == round((sim.layout.dim - 99) / 16) + 99
    for h in train:
        assert h["uplink_bytes_per_party"] == sim.codec.payload_bytes
        assert h["uplink_bytes"] == sim.codec.payload_bytes * h["num_received"]
    if stats["num_received"]:
        assert stats["uplink_bytes_per_party"] == sim._statistics.nbytes
    # stage 1 is paid for out of the same client-level accountant
    expected = [(2.0, 0.5, 1), (1.0, 0.5, 2)]
    for acc in ("rdp", "prv"):
        assert train[-1][f"epsilon_{acc}"] == pytest.approx(compute_epsilon(expected, 1 / 6, acc), rel=1e-9)
    assert sim.privacy_report()["statistics_rounds"] == 1



def test_resume_continues_the_accountant(tmp_path):
    args = fed_args(tmp_path, num_rounds=3, eval_every=0)
    first = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)
    h1 = first.run(max_rounds=2)
    assert [h["round"] for h in h1] == [1, 2]
    state = tmp_path / "fed" / "last-state"
    adapter_after_2 = _adapter(first)

    # a different noise_multiplier on the command line is refused, not silently replaced by the state's
    changed = fed_args(tmp_path, num_rounds=3, eval_every=0, noise_multiplier=50.0, resume_from_checkpoint=str(state))
    with pytest.raises(PrivacyBudgetError, match="another mechanism.*noise_multiplier 1 -> 50"):
        FederatedSimulation(make_tiny_bert(seed=3), make_cls_dataset(n=48), changed)._setup()
    args2 = fed_args(tmp_path, num_rounds=3, eval_every=0, resume_from_checkpoint=str(state))
    second = FederatedSimulation(make_tiny_bert(seed=3), make_cls_dataset(n=48), args2)
    second._setup()
    assert torch.equal(_adapter(second), adapter_after_2)
    assert second.ledger.noise_multiplier == 1.0
    history = second.run()
    assert [h["round"] for h in history] == [1, 2, 3]
    eps = [h["epsilon"] for h in history]
    assert eps == sorted(eps) and eps[2] > eps[1]
    assert eps[-1] == pytest.approx(compute_epsilon([(1.0, 0.5, 3)], 1 / 6, "prv"), rel=1e-9)

    with pytest.raises(PrivacyBudgetError, match="no federation_state"):
        FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48),
                            fed_args(tmp_path, resume_from_checkpoint=str(tmp_path))).run()


@pytest.mark.parametrize("codec", ["auto", "subspace"])
def test_a_full_size_codec_at_tiny_noise_applies_the_same_update_as_no_codec(tmp_path, codec):
    # checks the plumbing: latents aggregated by sum/sqrt(k), scaled by 1/sqrt(qN), decoded at sigma C/sqrt(qN)
    def update(spec):
        args = fed_args(tmp_path, parties_per_round=6, num_rounds=1, eval_every=0, noise_multiplier=1e-5, codec=spec,
                        stats_rounds=1, stats_noise_multiplier=1e-5, codec_latent_ratio=1.0)
        sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)
        sim._setup()
        start = _adapter(sim)
        sim.run()
        return _adapter(sim) - start

    plain, coded = update(None), update(codec)
    assert float(plain.norm()) > 0
    assert torch.allclose(coded, plain, atol=1e-3 * float(plain.abs().max()))


def test_a_ready_codec_must_say_what_its_prior_cost_at_party_level(tmp_path):
    from test_federated import _codec

    def setup(codec):
        sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), fed_args(tmp_path, codec=codec))
        sim._setup()
        return sim

    layout = setup(None).layout
    with pytest.raises(PrivacyBudgetError, match="stage1_privacy is unknown"):
        setup(_codec(layout))
    example_level = _codec(layout, stage1_privacy={"history": [[1.0, 0.1, 3]], "unit": "example"})
    with pytest.raises(PrivacyBudgetError, match="'example'-level"):
        setup(example_level)
    party_level = setup(_codec(layout, stage1_privacy={"history": [[3.0, 0.5, 2]], "unit": "party"}))
    assert party_level.ledger.accountant.history[0] == (3.0, 0.5, 2)  # paid in the client-level ledger
    public = setup(_codec(layout).mark_public("hand-made prior in a test"))
    assert public.ledger.accountant.history == []


def test_what_is_written_next_to_the_model_does_not_say_who_took_part(tmp_path):
    import json

    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), fed_args(tmp_path, eval_every=0))
    sim.run()
    sim.save_model(str(tmp_path / "model"))
    for path in (tmp_path / "fed" / "federated_history.json", tmp_path / "model" / "federated_history.json"):
        for record in json.loads(path.read_text()):
            assert not {"parties", "received", "failed", "num_received", "uplink_bytes"} & set(record)
            assert "epsilon" in record and "uplink_bytes_per_party" in record
    state = json.loads((tmp_path / "fed" / "last-state" / "federation_state.json").read_text())
    assert "sampling_seed" not in json.dumps(state)  # a saved state cannot replay who was sampled
    assert "parties" in state["history"][0]  # the server keeps its own log
