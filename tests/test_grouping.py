"""Group-level privacy: Poisson sampling over groups, group tags through real collators, and the sensitivity of the
clipped sum to one whole group, measured on real per-example gradients."""

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from scipy.stats import chi2
from torch.utils.data import DataLoader

from hf_drencoder.losses import per_sample_losses
from hf_drencoder.privacy import (
    EMPTY_BATCH_KEY,
    GROUP_INDEX_KEY,
    EmptyBatchCollator,
    GaussianGradientMechanism,
    GroupIndexCollator,
    GroupPoissonBatchSampler,
    group_rows,
    sum_by_group,
)
from hf_drencoder.privacy.per_sample import attach_grad_sample_hooks, pop_per_sample_gradients


def random_groups(num_groups, max_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size + 1, (num_groups,), generator=g).tolist()
    perm = torch.randperm(sum(sizes), generator=g).tolist()  # a group's rows are scattered over the dataset
    out, start = [], 0
    for s in sizes:
        out.append(sorted(perm[start : start + s]))
        start += s
    return out


# ---- group_rows ----

def test_group_rows_in_order_of_first_appearance():
    assert group_rows(["bob", "ann", "bob", "cy", "ann", "bob"]) == [[0, 2, 5], [1, 4], [3]]
    assert group_rows(torch.tensor([7, 3, 7])) == [[0, 2], [1]]
    assert group_rows(np.array([2, 2, 1])) == [[0, 1], [2]]


@pytest.mark.parametrize("missing", [None, float("nan"), np.float32("nan")])
def test_group_rows_refuses_missing_ids(missing):
    with pytest.raises(ValueError, match="row 1 has a missing group id"):
        group_rows([1, missing, 2])


def test_group_rows_refuses_unhashable_ids():
    with pytest.raises(TypeError, match="unhashable group id"):
        group_rows([[1], [2]])


# ---- the sampler ----

def test_sampler_validates_its_groups():
    with pytest.raises(ValueError, match="more than one group"):
        GroupPoissonBatchSampler([[0, 1], [1, 2]], 0.5, 10)
    with pytest.raises(ValueError, match="no rows"):
        GroupPoissonBatchSampler([[0], []], 0.5, 10)
    with pytest.raises(ValueError, match="max_rows_per_group"):
        GroupPoissonBatchSampler([[0]], 0.5, 10, max_rows_per_group=0)
    with pytest.raises(ValueError, match="sample_rate"):
        GroupPoissonBatchSampler([[0]], 0.0, 10)


@pytest.mark.parametrize("max_rows", [None, 2])
def test_process_shares_partition_one_global_draw_and_never_split_a_group(max_rows):
    groups = random_groups(40, 7, seed=1)
    owner = {r: k for k, rows in enumerate(groups) for r in rows}
    steps, micro, world = 150, 3, 2
    common = dict(sample_rate=0.3, steps_per_epoch=steps, seed=5, max_rows_per_group=max_rows)
    reference = list(GroupPoissonBatchSampler(groups, **common))  # one process, one micro-batch: the global draw
    shares = [list(GroupPoissonBatchSampler(groups, micro_batches=micro, num_replicas=world, rank=r, **common))
              for r in range(world)]
    assert all(len(s) == steps * micro for s in shares)
    empty_cells = 0
    for t in range(steps):
        cells = [shares[r][t * micro + m] for m in range(micro) for r in range(world)]
        union = [i for c in cells for i in c]
        assert sorted(union) == sorted(reference[t])  # the shares are exactly the global draw, no row twice
        cell_of = {}
        for c_id, cell in enumerate(cells):
            empty_cells += not cell
            for i in cell:
                assert cell_of.setdefault(owner[i], c_id) == c_id  # a group never spans micro-batches or processes
        if max_rows is None:
            for k in cell_of:
                assert set(groups[k]) <= set(union)  # a sampled group brings all its rows
        # it is the groups, not the rows, that are dealt out evenly to the micro-batches
        per_micro = [len({owner[i] for r in range(world) for i in shares[r][t * micro + m]}) for m in range(micro)]
        assert max(per_micro) - min(per_micro) <= 1
    assert empty_cells > 0  # empty shares happen, and are yielded as empty lists


def test_each_group_is_included_with_probability_q_independently():
    groups = random_groups(50, 9, seed=2)
    owner = {r: k for k, rows in enumerate(groups) for r in rows}
    q, steps = 0.08, 20_000
    s = GroupPoissonBatchSampler(groups, q, steps, micro_batches=2, seed=11)
    it = iter(s)
    hits = torch.zeros(steps, len(groups), dtype=torch.bool)
    for t in range(steps):
        for _ in range(2):
            for i in next(it):
                hits[t, owner[i]] = True
    rates = hits.float().mean(0)
    # each group: Binomial(20000, q) / 20000, s.e. sqrt(q(1-q)/T) = 0.0019; 5 s.e. whatever the group's size
    tol = 5 * math.sqrt(q * (1 - q) / steps)
    assert (rates - q).abs().max().item() < tol
    pooled_tol = 5 * math.sqrt(q * (1 - q) / hits.numel())
    assert abs(hits.float().mean().item() - q) < pooled_tol
    # independent across groups: the number of groups per step is Binomial(G, q), not a fixed batch
    counts = hits.sum(1).float()
    assert counts.var().item() == pytest.approx(len(groups) * q * (1 - q), rel=0.1)
    joint = (hits[:, 0] & hits[:, 1]).float().mean().item()
    assert joint == pytest.approx(q * q, abs=5 * math.sqrt(q * q / steps))
    first = list(itertools.islice(iter(s), 50))
    s.set_epoch(1)
    assert list(itertools.islice(iter(s), 50)) != first  # fresh draws each epoch
    s.set_epoch(0)
    assert list(itertools.islice(iter(s), 50)) == first  # replayable for resume


def test_max_rows_per_group_is_respected_and_uniform():
    groups = [[10, 11, 12, 13, 14, 15], [0, 1], [2]]
    k, steps = 2, 6_000
    s = GroupPoissonBatchSampler(groups, sample_rate=1.0, steps_per_epoch=steps, seed=3, max_rows_per_group=k)
    subsets = Counter()
    for batch in s:
        big = tuple(sorted(i for i in batch if i >= 10))
        assert len(big) == k and len(set(big)) == k
        assert sorted(i for i in batch if i < 10) == [0, 1, 2]  # groups with <= k rows keep all of them
        subsets[big] += 1
    # all C(6, 2) = 15 subsets, each with probability 1/15: chi-square test at p = 1e-4 (df 14)
    expected = steps / math.comb(6, 2)
    assert len(subsets) == math.comb(6, 2)
    stat = sum((c - expected) ** 2 / expected for c in subsets.values())
    assert chi2.sf(stat, df=math.comb(6, 2) - 1) > 1e-4
    # and a fresh choice every step (not a fixed cycle through the rows)
    batches = list(itertools.islice(iter(s), 40))
    assert len({tuple(sorted(b)) for b in batches}) > 5


# ---- the collator ----

def make_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")), pad_token="t0", unk_token="t1"
    )


def row(ids, label, user):
    return {"input_ids": list(ids), "attention_mask": [1] * len(ids), "labels": label, "user_id": user}


def test_group_index_with_padding_collator_in_order_of_first_appearance():
    from transformers import DataCollatorWithPadding

    features = [row([5, 6, 7], 0, "u2"), row([8], 1, "u1"), row([9, 9], 2, "u2"), row([4] * 5, 0, "u3"),
                row([3], 1, "u1")]
    batch = GroupIndexCollator(DataCollatorWithPadding(make_tokenizer()), "user_id")(features)
    assert batch[GROUP_INDEX_KEY].tolist() == [0, 1, 0, 2, 1]
    assert batch[GROUP_INDEX_KEY].dtype == torch.long
    assert "user_id" not in batch
    assert batch["input_ids"].shape == (5, 5)
    assert batch["attention_mask"].sum(1).tolist() == [3, 1, 2, 5, 1]
    assert all("user_id" in f for f in features)  # the rows themselves are left alone


def test_group_index_with_default_collator_and_empty_batches():
    from transformers import default_data_collator

    collate = GroupIndexCollator(default_data_collator, "user_id")
    batch = collate([row([1, 2], 0, 7), row([3, 4], 1, 3), row([5, 6], 1, 7)])
    assert batch[GROUP_INDEX_KEY].tolist() == [0, 1, 0]
    assert batch["labels"].tolist() == [0, 1, 1]
    assert set(batch) == {"input_ids", "attention_mask", "labels", GROUP_INDEX_KEY}
    assert EMPTY_BATCH_KEY in collate([])  # on its own
    assert EMPTY_BATCH_KEY in EmptyBatchCollator(collate)([])  # and inside EmptyBatchCollator


def test_group_index_refuses_packing_collators_and_missing_columns():
    from transformers import DataCollatorWithFlattening

    features = [{"input_ids": [5, 6, 7], "user_id": "a"}, {"input_ids": [8, 9], "user_id": "b"}]
    with pytest.raises(ValueError, match="one batch row per dataset row"):
        GroupIndexCollator(DataCollatorWithFlattening(), "user_id")(features)
    with pytest.raises(KeyError, match="no group column 'author'"):
        GroupIndexCollator(lambda f: f, "author")(features)


def test_sampler_and_collator_through_a_dataloader():
    from transformers import default_data_collator

    users = [f"u{i % 7}" for i in range(40)]
    ds = Dataset.from_dict({"input_ids": [[i, i + 1] for i in range(40)], "labels": [i % 3 for i in range(40)],
                            "user_id": users})
    groups = group_rows(ds["user_id"])
    sampler = GroupPoissonBatchSampler(groups, 0.4, steps_per_epoch=30, micro_batches=2, seed=0, max_rows_per_group=3)
    collate = EmptyBatchCollator(GroupIndexCollator(default_data_collator, "user_id"))
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate)
    seen_empty = False
    for batch in loader:
        if EMPTY_BATCH_KEY in batch:
            seen_empty = True
            continue
        idx = batch[GROUP_INDEX_KEY]
        rows = batch["input_ids"][:, 0].tolist()
        tags = {}
        for i, r in zip(idx.tolist(), rows):
            assert tags.setdefault(i, users[r]) == users[r]  # one index per user within the micro-batch
        assert sorted(tags) == list(range(len(tags)))
        assert max(Counter(idx.tolist()).values()) <= 3
    assert seen_empty


# ---- summing and the sensitivity of the clipped sum ----

def test_sum_by_group_matches_a_loop_and_accumulates_over_pieces():
    torch.manual_seed(0)
    grads = [torch.randn(7, 3, 2), torch.randn(7, 4)]
    index = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    sums = sum_by_group(grads, index)
    for g, s in zip(grads, sums):
        assert s.shape == (3, *g.shape[1:])
        for k in range(3):
            torch.testing.assert_close(s[k], g[index == k].sum(0))
    # one micro-batch run as two physical pieces: summed before clipping, as if in one piece
    first = sum_by_group([g[:4] for g in grads], index[:4], num_groups=3)
    both = sum_by_group([g[4:] for g in grads], index[4:], num_groups=3, out=first)
    for s, b in zip(sums, both):
        torch.testing.assert_close(s, b)
    with pytest.raises(ValueError, match="lie in"):
        sum_by_group(grads, index, num_groups=2)
    with pytest.raises(ValueError, match="rows for"):
        sum_by_group(grads, index[:5])


def _lora_bert():
    from conftest import make_tiny_bert

    model = make_tiny_bert(0)
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_one_whole_group_moves_the_clipped_sum_by_at_most_C():
    from transformers import DataCollatorWithPadding

    g = torch.Generator().manual_seed(0)
    lengths, labels = torch.randint(4, 11, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    base = [row(torch.randint(2, 100, (int(n),), generator=g).tolist(), int(y), u)
            for n, y, u in zip(lengths, labels, "aabbcc")]
    # one person with 12 similar rows (the same message with one word changed): their row gradients align
    template = torch.randint(2, 100, (9,), generator=g)
    person = []
    for i in range(12):
        ids = template.clone()
        ids[i % 9] = 2 + (7 * i) % 98
        person.append(row(ids.tolist(), 1, "x"))
    with_person = base[:2] + person[:5] + base[2:5] + person[5:] + base[5:]  # the group's rows are not adjacent

    model = _lora_bert()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = attach_grad_sample_hooks(model)
    collate = GroupIndexCollator(DataCollatorWithPadding(make_tokenizer()), "user_id")

    def per_example(features):
        batch = collate(features)
        index, labels = batch.pop(GROUP_INDEX_KEY), batch.pop("labels")
        per_sample_losses(model(**batch).logits, labels, "sequence_classification").sum().backward()
        return pop_per_sample_gradients(params, len(features)), index

    def clipped_sum(grads, C):
        mech = GaussianGradientMechanism(params, max_grad_norm=C, noise_multiplier=0.0, expected_batch_size=1.0)
        mech.add_per_sample(grads)
        return torch.cat([s.flatten() for s in mech.release()])

    g0, i0 = per_example(base)
    g1, i1 = per_example(with_person)
    hooks.cleanup()
    row_norms = torch.stack([s.flatten(1).pow(2).sum(1) for s in g1]).sum(0).sqrt()
    C = 0.5 * row_norms.min().item()  # every row's gradient is larger than C: all are clipped

    group_move = (clipped_sum(sum_by_group(g1, i1), C) - clipped_sum(sum_by_group(g0, i0), C)).norm().item()
    row_move = (clipped_sum(g1, C) - clipped_sum(g0, C)).norm().item()
    print(f"\nC = {C:.4g}; one group of {len(person)} rows moves the clipped sum by {group_move / C:.8f} C "
          f"with group clipping, {row_move / C:.3f} C with row clipping")
    assert group_move <= C * (1 + 1e-5)
    assert group_move >= C * (1 - 1e-3)  # the group's sum is larger than C, so it contributes C exactly
    assert row_move > 0.8 * len(person) * C  # row-level clipping: nearly rows x C
