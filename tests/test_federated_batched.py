"""Batched local training of several parties (parallel_parties > 1): the same updates as one party at a time,
each party's update independent of the other parties' rows, and refusals."""

import pytest
import torch
from transformers import default_data_collator

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder.federated import FederatedSimulation
from hf_drencoder.federated.batched import BatchedPartiesError, batched_local_updates, check_parties_independent
from hf_drencoder.federated.party import Party
from test_federated import fed_args


def _setup(tmp_path, **kw):
    base = dict(num_parties=6, parties_per_round=6, num_rounds=2, local_steps=3, local_batch_size=3,
                local_optimizer="adamw", local_learning_rate=1e-2, lora_target_modules=["query", "value"])
    args = fed_args(tmp_path, **{**base, **kw})
    # parties of 5, 6, ... rows: unequal sizes, batches that wrap around
    partitions = [list(range(sum(range(5, 5 + i)), sum(range(5, 6 + i)))) for i in range(6)]
    return FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=60), args, partitions=partitions)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_batched_updates_equal_one_party_at_a_time(tmp_path, optimizer):
    sim = _setup(tmp_path, local_optimizer=optimizer)
    sim._setup()
    before = sim._global_flat().clone()
    seq = [sim._local_update(p, 0) for p in range(6)]
    from hf_drencoder.federated.server import derive_seed

    seeds = [derive_seed(sim.args.seed, 0, p) for p in range(6)]
    got = batched_local_updates(sim.model, sim.params, sim.layout, sim.parties, seeds, steps=3, batch_size=3,
                                learning_rate=1e-2, optimizer=optimizer, task=sim.task, data_collator=default_data_collator)
    for a, b in zip(seq, got):
        assert float(a.norm()) > 0
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-5)  # Adam amplifies float rounding (1.8e-5 seen on AMD EPYC)
    assert torch.equal(sim._global_flat(), before)  # the model's adapter is left as it was


def test_a_party_update_does_not_depend_on_the_other_parties_rows(tmp_path):
    sim = _setup(tmp_path)
    sim._setup()
    from hf_drencoder.federated.server import derive_seed

    seeds = [derive_seed(0, 0, p) for p in range(6)]
    kw = dict(steps=3, batch_size=3, learning_rate=1e-2, optimizer="adamw", task=sim.task, data_collator=default_data_collator)
    alone = batched_local_updates(sim.model, sim.params, sim.layout, sim.parties[:1], seeds[:1], **kw)[0]
    other = Party(1, make_cls_dataset(n=7, seed=9), default_data_collator)  # another party 1, other rows
    for group in ([sim.parties[0], sim.parties[1]], [sim.parties[0], other]):
        together = batched_local_updates(sim.model, sim.params, sim.layout, group, seeds[:2], **kw)[0]
        torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_a_federation_with_parallel_parties_gives_the_same_adapter(tmp_path):
    one = _setup(tmp_path / "one")
    one.run()
    many = _setup(tmp_path / "many", parallel_parties=4)
    many.run()
    torch.testing.assert_close(many._global_flat(), one._global_flat(), rtol=1e-4, atol=1e-5)
    assert many.history[-1]["epsilon"] == one.history[-1]["epsilon"]


def test_a_failing_party_in_a_batch_is_left_out_alone(tmp_path):
    sim = _setup(tmp_path, parallel_parties=6)
    sim.parties[2].dataset = sim.parties[2].dataset.map(lambda r: {"labels": 99})  # out of range: raises
    rec = sim.run_round()
    assert rec["failed"] == [2] and sorted(rec["received"]) == [0, 1, 3, 4, 5]


def test_batching_is_refused_where_rows_influence_each_other(tmp_path):
    model = make_tiny_bert()
    model.bert.pooler.dense = torch.nn.Sequential(model.bert.pooler.dense, torch.nn.BatchNorm1d(32))
    parties = [Party(i, make_cls_dataset(n=6, seed=i), default_data_collator) for i in range(2)]
    with pytest.raises(Exception, match="BatchNorm"):
        check_parties_independent(model, parties, default_data_collator, "sequence_classification")


def test_batching_needs_linear_adapter_layers(tmp_path):
    from hf_drencoder.federated.batched import _owners

    emb = torch.nn.Embedding(4, 3)
    with pytest.raises(BatchedPartiesError, match="nn.Linear"):
        _owners(torch.nn.Sequential(emb), [emb.weight])


def test_parallel_parties_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="parallel_parties"):
        fed_args(tmp_path, parallel_parties=0)
