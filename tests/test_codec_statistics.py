"""Stage-1 release: clipped moments, Gaussian noise of the documented std, recorded in the accountant."""

import math

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model

from hf_drencoder.codec import GradientStatistics, LoraLayout, StatisticsAccumulator, collect_gradient_statistics, statistics_sensitivity
from hf_drencoder.codec.statistics import part_noise_std
from hf_drencoder.privacy import PrivacyAccountant, compute_epsilon

SMALL = LoraLayout(["m.lora_A.default.weight", "m.lora_B.default.weight"], [(2, 6), (6, 2)])


def test_sensitivity_and_noise_formula():
    assert statistics_sensitivity(["sum", "sumsq"]) == pytest.approx(math.sqrt(2))
    assert statistics_sensitivity(["sum", "sumsq", "row_sumsq", "col_sumsq"]) == pytest.approx(2.0)
    # degree-2 parts scale with C^2
    assert part_noise_std("sumsq", 0.5, 3.0, ["sum", "sumsq"]) == pytest.approx(0.5 * math.sqrt(2) * 9.0)
    assert part_noise_std("sum", 0.5, 3.0, ["sum", "sumsq"]) == pytest.approx(0.5 * math.sqrt(2) * 3.0)


def test_one_example_moves_the_scaled_vector_by_at_most_the_sensitivity():
    # an example far above the clipping norm: after clipping every part is within its bound
    acc = StatisticsAccumulator(SMALL, max_grad_norm=2.0, noise_multiplier=0.0, sample_rate=1.0, dataset_size=1)
    g = torch.randn(1, SMALL.dim) * 100
    acc.add(g)
    acc.release_batch()
    s = acc.finish()
    scaled_sq = s.totals["sum"].norm() ** 2 / 4 + sum(s.totals[p].norm() ** 2 / 16 for p in ("sumsq", "row_sumsq", "col_sumsq"))
    assert float(s.totals["sum"].norm()) == pytest.approx(2.0, rel=1e-4)
    assert float(s.totals["sumsq"].sum()) == pytest.approx(4.0, rel=1e-4)
    assert float(scaled_sq) <= 4.0 + 1e-4  # sensitivity^2 = number of parts


def test_released_noise_has_documented_std_and_is_accounted():
    acc_ledger = PrivacyAccountant(delta=1e-5, accountant="rdp")
    z, C, T = 0.7, 1.5, 400
    acc = StatisticsAccumulator(SMALL, C, z, sample_rate=0.01, dataset_size=1000, accountant=acc_ledger, noise_seed=0)
    for _ in range(T):
        acc.release_batch()  # empty batches: the release is pure noise
    stats = acc.finish()
    assert acc_ledger.history == [(z, 0.01, T)]
    assert acc_ledger.epsilon() == pytest.approx(compute_epsilon([(z, 0.01, T)], 1e-5, "rdp"))
    for part in stats.parts:
        want = z * 2.0 * C ** (1 if part == "sum" else 2) * math.sqrt(T)  # z sqrt(P) C^d, summed over T releases
        assert stats.noise_std(part) == pytest.approx(want)
    # empirical std of the released totals, pooled over all coordinates of the per-element parts
    pooled = torch.cat([stats.totals["sum"] / stats.noise_std("sum"), stats.totals["sumsq"] / stats.noise_std("sumsq")])
    assert float(pooled.std()) == pytest.approx(1.0, abs=0.25)
    # and per release, over many independent draws of one coordinate
    acc2 = StatisticsAccumulator(SMALL, C, z, sample_rate=0.01, dataset_size=1000, noise_seed=1)
    draws = []
    for _ in range(2000):
        acc2.release_batch()
        draws.append(acc2._totals["sum"][0].item())
    steps = torch.tensor(draws).diff()
    assert float(steps.std()) == pytest.approx(part_noise_std("sum", z, C, acc2.parts), rel=0.06)
    assert stats.nbytes == 4 * (2 * SMALL.dim + (2 + 6) + (6 + 2))


def test_collected_moments_match_exact_per_sample_moments():
    torch.manual_seed(0)
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    # make B non-zero so that the A factors have gradients too
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    data = [{"input_ids": torch.randint(0, 128, (8,))} for _ in range(24)]

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}

    ledger = PrivacyAccountant(delta=1e-5)
    # sample rate 1: every example is in the batch; a negligible noise multiplier to compare with the exact sums
    stats = collect_gradient_statistics(model, data, collate, max_grad_norm=0.5, noise_multiplier=1e-7,
                                        expected_batch_size=24, num_batches=1, accountant=ledger, micro_batch_size=10, progress=False)
    assert ledger.history == [(1e-7, 1.0, 1)]
    layout = stats.layout
    exact = []
    for row in data:  # one example at a time, plain autograd
        model.zero_grad()
        ids = row["input_ids"][None]
        logits = model(input_ids=ids).logits[:, :-1]
        torch.nn.functional.cross_entropy(logits.reshape(-1, 128), ids[:, 1:].reshape(-1)).backward()
        g = layout.model_grads(model)
        exact.append(g * min(1.0, 0.5 / (float(g.norm()) + 1e-6)))
    exact = torch.stack(exact)
    assert torch.allclose(stats.moment("sum"), exact.mean(0), atol=1e-5)
    assert torch.allclose(stats.moment("sumsq"), exact.pow(2).mean(0), atol=1e-6)
    mean, sq = stats.block_moments()
    assert torch.allclose(sq[0], exact[:, : layout.blocks[0].numel].pow(2).mean(), rtol=1e-3)


def test_bad_statistics_are_refused():
    with pytest.raises(ValueError, match="empty statistics"):
        StatisticsAccumulator(SMALL, 1.0, 1.0, 0.1, 100).finish()
    with pytest.raises(ValueError, match="no statistics to release"):
        StatisticsAccumulator(SMALL, 1.0, 1.0, 0.1, 100, parts=[])
    with pytest.raises(ValueError, match="unknown statistics part"):
        StatisticsAccumulator(SMALL, 1.0, 1.0, 0.1, 100, parts=["mean"])
    with pytest.raises(ValueError, match="without privacy"):
        StatisticsAccumulator(SMALL, 1.0, 0.0, 0.1, 100, accountant=PrivacyAccountant(1e-5))
    good = {"sum": torch.zeros(SMALL.dim), "sumsq": torch.zeros(SMALL.dim)}
    bad = dict(good, sum=torch.full((SMALL.dim,), float("nan")))
    with pytest.raises(ValueError, match="NaN"):
        GradientStatistics(SMALL, bad, 1.0, 1.0, 0.1, 1, 10.0)
    with pytest.raises(ValueError, match="empty statistics"):
        GradientStatistics(SMALL, good, 1.0, 1.0, 0.1, 0, 0.0)


def test_save_and_load(tmp_path):
    acc = StatisticsAccumulator(SMALL, 1.0, 1.0, 0.1, 100, noise_seed=3)
    acc.add(torch.randn(4, SMALL.dim))
    acc.release_batch()
    s = acc.finish({"note": "x"})
    s.save(str(tmp_path))
    t = GradientStatistics.load(str(tmp_path))
    assert t.layout == s.layout and t.parts == s.parts and t.meta == {"note": "x"}
    assert all(torch.equal(s.totals[p], t.totals[p]) for p in s.parts)
