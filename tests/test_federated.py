"""Federated mode: partitions, the party/server privacy mechanics, end-to-end tiny runs, failures, resume."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import default_data_collator

from conftest import make_cls_dataset, make_tiny_bert
from hf_drencoder.codec import GradientCodec, LoraLayout
from hf_drencoder.codec.priors import GaussianPrior
from hf_drencoder.federated import (
    FederatedArguments,
    FederatedServer,
    FederatedSimulation,
    NonLinearCodecError,
    aggregate,
    check_linear_codec,
    partition_indices,
    privatize_update,
)
from hf_drencoder.privacy import compute_epsilon, gdp_mu, make_generator


def fed_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "fed"), num_parties=6, parties_per_round=3, num_rounds=2, local_steps=2,
                local_batch_size=4, local_learning_rate=0.1, noise_multiplier=1.0, noise_seed=0, sampling_seed=0,
                disable_tqdm=True, eval_every=1, lora_target_modules=["query", "value"])
    base.update(kw)
    return FederatedArguments(**base)


# ---- partitions -------------------------------------------------------------------------------------------

def _labelled(n, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return Dataset.from_dict({"x": list(range(n)), "labels": rng.integers(0, num_classes, n).tolist()})


def test_iid_partition_is_a_seeded_balanced_split():
    data = _labelled(103, 4)
    parts = partition_indices(data, 10, "iid", seed=1)
    assert sorted(len(p) for p in parts) == [10] * 7 + [11] * 3
    assert sorted(i for p in parts for i in p) == list(range(103))
    assert parts == partition_indices(data, 10, "iid", seed=1)
    assert parts != partition_indices(data, 10, "iid", seed=2)


def test_dirichlet_partition_sizes_and_label_skew():
    data = _labelled(2000, 4)
    labels = np.asarray(data["labels"])

    def dominant_share(parts):  # mean over parties of the share of their most frequent class
        return np.mean([np.bincount(labels[p], minlength=4).max() / len(p) for p in parts])

    skewed = partition_indices(data, 20, "dirichlet", alpha=0.1, seed=0)
    near_iid = partition_indices(data, 20, "dirichlet", alpha=1000.0, seed=0)
    for parts in (skewed, near_iid):
        assert sorted(i for p in parts for i in p) == list(range(2000))  # disjoint and complete
        assert min(len(p) for p in parts) >= 1
    assert dominant_share(skewed) > 0.75
    assert dominant_share(near_iid) < 0.4  # global class shares are ~0.25
    # alpha large: every party holds ~1/20 of every class (Dirichlet proportions concentrate at 1/N)
    for c in range(4):
        n_c = (labels == c).sum()
        counts = np.array([(labels[p] == c).sum() for p in near_iid])
        assert np.abs(counts - n_c / 20).max() < 0.35 * n_c / 20
    # alpha small: a class sits with few parties
    class0 = np.sort([(labels[p] == 0).sum() for p in skewed])[::-1]
    assert class0[:3].sum() > 0.6 * class0.sum()
    assert skewed == partition_indices(data, 20, "dirichlet", alpha=0.1, seed=0)


def test_equal_size_dirichlet_partition_gives_thousands_of_small_skewed_parties():
    # 1,000 parties on 5,500 rows: the per-class Dirichlet split cannot give every party a row (shown at 200 parties
    # of 2 rows, where its 1,000 redraws are quick), this one can
    data = _labelled(5500, 8)
    labels = np.asarray(data["labels"])
    with pytest.raises(ValueError, match="raise alpha"):
        partition_indices(_labelled(400, 8), 200, "dirichlet", alpha=0.5, seed=0)
    parts = partition_indices(data, 1000, "dirichlet_equal_size", alpha=0.5, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(5500))  # disjoint and complete
    assert sorted({len(p) for p in parts}) == [5, 6]
    dominant = np.mean([np.bincount(labels[p], minlength=8).max() / len(p) for p in parts])
    iid = partition_indices(data, 1000, "iid", seed=0)
    dominant_iid = np.mean([np.bincount(labels[p], minlength=8).max() / len(p) for p in iid])
    assert dominant > dominant_iid + 0.2  # label skew, against ~0.4 for an IID split of 5-6 rows
    near_iid = partition_indices(data, 1000, "dirichlet_equal_size", alpha=1e4, seed=0)
    assert abs(np.mean([np.bincount(labels[p], minlength=8).max() / len(p) for p in near_iid]) - dominant_iid) < 0.05
    assert parts == partition_indices(data, 1000, "dirichlet_equal_size", alpha=0.5, seed=0)
    assert parts != partition_indices(data, 1000, "dirichlet_equal_size", alpha=0.5, seed=1)


def test_dirichlet_partition_refuses_an_impossible_split():
    with pytest.raises(ValueError, match="raise alpha"):
        partition_indices(_labelled(30, 3), 25, "dirichlet", alpha=0.01, seed=0)
    with pytest.raises(ValueError, match="fewer parties"):
        partition_indices(_labelled(5, 2), 6, "iid")


# ---- the mechanism ----------------------------------------------------------------------------------------

def test_normalised_sum_has_sensitivity_at_most_C():
    C = 1.0
    for k in range(0, 60):
        bound = C * (math.sqrt(k) - (k - 1) / math.sqrt(k + 1)) if k else C
        assert bound <= C + 1e-12
        # worst case: k aligned updates of norm C, the added one opposite
        e = torch.zeros(5, dtype=torch.float64)
        e[0] = 1.0
        b, u = k * C * e, -C * e
        f_without = b / math.sqrt(k) if k else torch.zeros(5)
        gap = float(((b + u) / math.sqrt(k + 1) - f_without).norm())
        assert gap == pytest.approx(bound, rel=1e-6)
        # random clipped updates never exceed the bound
        g = torch.Generator().manual_seed(k)
        for _ in range(20):
            vs = torch.randn(k + 1, 5, generator=g, dtype=torch.float64)
            vs = vs / vs.norm(dim=1, keepdim=True) * torch.rand(k + 1, 1, generator=g, dtype=torch.float64) * C
            f_with = vs.sum(0) / math.sqrt(k + 1)
            f_wo = vs[:k].sum(0) / math.sqrt(k) if k else torch.zeros(5)
            assert float((f_with - f_wo).norm()) <= bound + 1e-6


def test_privatize_update_clips_then_adds_noise():
    u = torch.full((400,), 1.0)  # norm 20
    clipped = privatize_update(u, 0.5, 0.0, None)
    assert float(clipped.norm()) == pytest.approx(0.5, rel=1e-4)
    noised = privatize_update(torch.zeros(200_000), 0.5, 2.0, make_generator("cpu", 0))
    assert float(noised.std()) == pytest.approx(1.0, rel=0.01)


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_aggregate_noise_std_is_sigma_C_whatever_the_number_of_parties(k):
    sigma, C, dim = 1.3, 0.5, 40_000
    layout = LoraLayout(["w.lora_A.x"], [(dim,)])
    server = FederatedServer(layout, num_parties=40, sample_rate=0.25, max_norm=C, noise_multiplier=sigma, noise_seed=k)
    messages = [privatize_update(torch.zeros(dim), C, sigma, make_generator("cpu", 100 + i)) for i in range(k)]
    r = aggregate(messages, lambda: server.phantom_message(0))
    assert float(r.std()) == pytest.approx(sigma * C, rel=0.02)
    if k > 1:  # a plain sum would reveal k through its noise variance
        assert float(torch.stack(messages).sum(0).std()) == pytest.approx(math.sqrt(k) * sigma * C, rel=0.02)
    # what the server applies: R / sqrt(E[k]) at the public noise level sigma C / sqrt(q N)
    from hf_drencoder.federated import PartyMessage

    update = server.aggregate_round([PartyMessage(i, m, "update") for i, m in enumerate(messages)], 0)
    assert float(update.std()) == pytest.approx(sigma * C / math.sqrt(10), rel=0.02)
    assert server.decode_noise_std == pytest.approx(sigma * C / math.sqrt(10))


def _codec(layout, **kw):
    prior = GaussianPrior(layout, torch.zeros(layout.dim), torch.linspace(0.1, 1.0, layout.dim))
    return GradientCodec.from_prior(prior, 1 / 8, **kw)


def test_only_linear_codecs_are_accepted():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))
    layout = LoraLayout.from_model(model)
    check_linear_codec(_codec(layout, temporal_rho=0.8), noise_std=0.1)
    check_linear_codec(_codec(layout, temporal_window=2), noise_std=0.1)
    with pytest.raises(NonLinearCodecError, match="lora_rank"):
        check_linear_codec(_codec(layout, lora_rank=1))


def test_arguments_refuse_what_cannot_be_accounted(tmp_path):
    with pytest.raises(ValueError, match="Poisson sampling only"):
        fed_args(tmp_path, party_sampling="fixed", codec="auto")
    with pytest.raises(ValueError, match="whole parties_per_round"):
        fed_args(tmp_path, party_sampling="fixed", parties_per_round=2.5)
    with pytest.raises(ValueError, match="1/num_parties"):
        fed_args(tmp_path, target_delta=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        fed_args(tmp_path, target_epsilon=3.0)


# ---- end to end -------------------------------------------------------------------------------------------

def _adapter(sim):
    return sim._global_flat().clone()


def test_federated_run_without_codec(tmp_path):
    args = fed_args(tmp_path, num_rounds=3)
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args, eval_dataset=make_cls_dataset(n=12, seed=1))
    before = _adapter(sim)
    history = sim.run()
    assert [h["round"] for h in history] == [1, 2, 3]
    dim = sim.layout.dim
    for h in history:
        assert h["uplink_bytes_per_party"] == 4 * dim
        assert h["uplink_bytes"] == 4 * dim * h["num_received"]
        assert set(h["received"]) <= set(range(6)) and h["failed"] == []
        assert math.isfinite(h["eval_loss"])
    q = 0.5
    last = history[-1]
    for acc in ("rdp", "prv"):
        assert last[f"epsilon_{acc}"] == pytest.approx(compute_epsilon([(1.0, q, 3)], 1 / 6, acc), rel=1e-9)
    assert last["mu_gdp"] == pytest.approx(gdp_mu([(1.0, q, 3)]))
    assert last["epsilon"] == last["epsilon_prv"]
    # against the server each message is a plain Gaussian mechanism: mu^2 = (messages of the busiest party) / sigma^2
    busiest = int(sim.participation.max())
    assert last["epsilon_server_view_busiest"] == pytest.approx(compute_epsilon([(1.0, 1.0, busiest)], 1 / 6, "gdp"))
    # what is published bounds every party (one that sent a message in each round) and names no sample
    assert last["epsilon_server_view"] == pytest.approx(compute_epsilon([(1.0, 1.0, 3)], 1 / 6, "gdp"))
    assert sim.privacy_report()["epsilon_server_view"] == last["epsilon_server_view"]
    assert not torch.equal(before, _adapter(sim))
    sim.save_model()
    assert (tmp_path / "fed" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "fed" / "privacy_report.json").is_file()


def test_a_failing_party_is_left_out_and_the_round_still_counts(tmp_path):
    data = make_cls_dataset(n=36)
    data = data.add_column("party", [i // 6 for i in range(36)])
    partitions = [list(range(6 * i, 6 * i + 6)) for i in range(6)]
    calls = {"n": 0}

    def collator(rows):
        if rows[0]["party"] == 0:
            calls["n"] += 1
            if calls["n"] % 2 == 0:  # party 0 raises on its second local batch, after one local step
                raise RuntimeError("corrupt batch")
        return default_data_collator(rows)

    args = fed_args(tmp_path, parties_per_round=6, num_rounds=1, eval_every=0)  # q = 1: everyone is sampled
    sim = FederatedSimulation(make_tiny_bert(), data, args, data_collator=collator, partitions=partitions)
    start = _adapter(sim)
    (h,) = sim.run()
    assert h["failed"] == [0] and sorted(h["received"]) == [1, 2, 3, 4, 5] and h["num_received"] == 5
    assert h["epsilon_prv"] == pytest.approx(compute_epsilon([(1.0, 1.0, 1)], 1 / 6, "prv"), rel=1e-9)
    # the global state is exactly what the five other parties' messages give
    ref = FederatedSimulation(make_tiny_bert(), data, args, data_collator=default_data_collator, partitions=partitions)
    ref._setup()
    assert torch.equal(_adapter(ref), start)
    messages = [ref.party_step(pid, 0) for pid in range(1, 6)]
    assert torch.equal(_adapter(ref), start)  # party steps leave the global adapter untouched
    expected = start + ref.server.aggregate_round(messages, 0)
    assert torch.allclose(_adapter(sim), expected, atol=1e-6)


def test_fixed_size_sampling_is_accounted_as_sampling_without_replacement(tmp_path):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from hf_drencoder.privacy.accounting import RDP_ORDERS

    args = fed_args(tmp_path, party_sampling="fixed", parties_per_round=2, num_rounds=3, eval_every=0,
                    noise_multiplier=3.0, accountant="rdp")
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)
    history = sim.run()
    sampled = [h["parties"] for h in history]
    assert all(len(p) == 2 == len(set(p)) for p in sampled)  # exactly k distinct parties every round
    # replace-one adjacency, sensitivity 2C: each round is a sample of 2 of 6 without replacement at multiplier sigma / 2
    assert sim.ledger.accountant.history == [(1.5, 2 / 6, 3, 6, 2)]
    report = sim.privacy_report()
    independent = RdpAccountant(orders=RDP_ORDERS, neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    independent.compose(dp_accounting.SampledWithoutReplacementDpEvent(6, 2, dp_accounting.GaussianDpEvent(1.5)), 3)
    assert report["epsilon"] == report["epsilon_rdp"] == pytest.approx(independent.get_epsilon(1 / 6), rel=1e-9)
    # amplification: below the bound without it (each round the Gaussian mechanism at sigma / 2, q = 1)
    assert report["epsilon_rdp"] < compute_epsilon([(1.5, 1.0, 3)], 1 / 6, "rdp")
    # no PRV, PLD or GDP analysis of this sampling: reported as unbounded, never as a small number
    assert report["epsilon_prv"] == report["epsilon_pld"] == report["mu_gdp"] == math.inf
    assert report["neighbouring"].startswith("replace-one party") and report["sensitivity"] == 2.0
    assert report["sampling"] == "2 of 6 without replacement per release"
    # a target epsilon is met with the parties' sigma twice the accountant's
    target = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48),
                                 fed_args(tmp_path / "t", party_sampling="fixed", parties_per_round=2, num_rounds=3,
                                          eval_every=0, noise_multiplier=None, target_epsilon=4.0, accountant="rdp"))
    target._setup()
    assert target.server.noise_multiplier == target.ledger.noise_multiplier
    sigma = target.ledger.accounted_noise_multiplier
    assert sigma == pytest.approx(target.ledger.noise_multiplier / 2)
    assert 0.97 * 4.0 <= compute_epsilon([(sigma, 2 / 6, 3, 6, 2)], 1 / 6, "rdp") <= 4.0


def test_fixed_size_sampling_needs_an_accountant_that_analyses_it(tmp_path):
    for name in ("prv", "pld"):
        with pytest.raises(ValueError, match="accountant='rdp'"):
            fed_args(tmp_path, party_sampling="fixed", parties_per_round=2, accountant=name)
    # all parties in every round is no sampling at all: the Gaussian mechanism at q = 1, which every accountant has
    fed_args(tmp_path, party_sampling="fixed", parties_per_round=6, accountant="prv")


def test_a_state_saved_when_fixed_size_was_accounted_without_amplification_resumes(tmp_path):
    from hf_drencoder.federated.accounting import client_level_ledger

    args = fed_args(tmp_path, party_sampling="fixed", parties_per_round=2, num_rounds=5, accountant="rdp")
    ledger = client_level_ledger(args)
    old = {"accountant": {"delta": 1 / 6, "accountant": "prv", "history": [[0.5, 1.0, 3]]}, "noise_multiplier": 1.0,
           "sample_rate": 1.0, "max_grad_norm": 1.0, "unit": "party", "disabled": False, "prior_steps": 0,
           "sensitivity": 2.0}
    ledger.load_state_dict(old)
    spent = ledger.metrics()["epsilon"]
    assert spent == pytest.approx(compute_epsilon([(0.5, 1.0, 3)], 1 / 6, "rdp"))
    ledger.record_step()  # the next round is a sample without replacement; the earlier ones stay as they were counted
    assert ledger.accountant.history == [(0.5, 1.0, 3), (0.5, 2 / 6, 1, 6, 2)]
    assert ledger.metrics()["epsilon"] > spent
    # a Poisson state cannot continue as a fixed-size run
    with pytest.raises(Exception, match="same sampling scheme|sensitivity"):
        client_level_ledger(args).load_state_dict({**old, "sensitivity": 1.0, "sample_rate": 2 / 6})
