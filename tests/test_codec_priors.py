"""Priors built from released statistics: their samples reproduce the released moments."""

import pytest
import torch

from hf_drencoder.codec import GaussianPrior, LoraLayout, StatisticsAccumulator, build_prior

LAYOUT = LoraLayout(
    ["m0.lora_A.default.weight", "m0.lora_B.default.weight", "m1.lora_A.default.weight", "m1.lora_B.default.weight"],
    [(3, 10), (10, 3), (3, 10), (10, 3)],
)


def exact_stats(n=400, seed=0, mean_scale=0.05):
    """Statistics released without noise (z = 0) from structured per-example gradients."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(LAYOUT.dim, generator=g) * 0.5 + 0.05
    mean = torch.randn(LAYOUT.dim, generator=g) * mean_scale
    grads = mean + scale * torch.randn(n, LAYOUT.dim, generator=g) * 0.1
    acc = StatisticsAccumulator(LAYOUT, max_grad_norm=100.0, noise_multiplier=0.0, sample_rate=1.0, dataset_size=n)
    acc.add(grads)
    acc.release_batch()
    return acc.finish(), grads


@pytest.mark.parametrize("kind", ["paper", "element", "lowrank"])
def test_samples_match_released_moments(kind):
    # lowrank: a rank-one fit of E[g^2] is only a valid second moment where it exceeds mean^2 (else it is clamped)
    stats, _ = exact_stats(mean_scale=0.0 if kind == "lowrank" else 0.05)
    prior = build_prior(stats, kind, expected_batch_size=1.0, drift=0.0, floor=0.0)
    x = prior.sample(20000, torch.Generator().manual_seed(1))
    m2 = x.pow(2).mean(0)
    # the samples have the prior's moments ...
    assert torch.allclose(x.mean(0), prior.mean, atol=4 * float(prior.var.max().sqrt()) / 20000**0.5)
    assert torch.allclose(m2, prior.second_moment(), rtol=0.1, atol=1e-6)
    # ... and the prior's moments are the released ones, at the granularity of the prior
    if kind == "element":
        assert torch.allclose(prior.mean, stats.moment("sum"), atol=1e-6)
        assert torch.allclose(prior.second_moment(), stats.moment("sumsq"), rtol=1e-4)
    elif kind == "lowrank":
        # row and column sums of the second moment are exactly the released marginals
        r_off = c_off = 0
        for b, sl in LAYOUT.block_slices():
            nr, nc = b.matrix_shape
            sq = prior.second_moment()[sl].reshape(nr, nc)
            assert torch.allclose(sq.sum(1), stats.moment("row_sumsq")[r_off : r_off + nr], rtol=1e-3)
            assert torch.allclose(sq.sum(0), stats.moment("col_sumsq")[c_off : c_off + nc], rtol=1e-3)
            r_off, c_off = r_off + nr, c_off + nc
        # samples of a factor are (numerically) rank-one matrices
        n0 = LAYOUT.blocks[0].numel
        one = prior.sample(1)[0][:n0] - prior.mean[:n0]
        sv = torch.linalg.svdvals(one.reshape(3, 10))
        assert float(sv[0] ** 2 / sv.pow(2).sum()) > 0.99
    else:
        block_mean, block_sq = stats.block_moments()
        for i, (b, sl) in enumerate(LAYOUT.block_slices()):
            assert torch.allclose(prior.mean[sl], block_mean[i].expand(b.numel))
            assert float(prior.second_moment()[sl].mean()) == pytest.approx(float(block_sq[i]), rel=1e-4)
            assert float(m2[sl].mean()) == pytest.approx(float(block_sq[i]), rel=0.05)


def test_batch_scaling_and_drift():
    stats, _ = exact_stats()
    p1 = build_prior(stats, "element", expected_batch_size=1.0, drift=0.0, floor=0.0)
    p32 = build_prior(stats, "element", expected_batch_size=32.0, drift=0.0, floor=0.0)
    assert torch.allclose(p32.var, p1.var / 32, rtol=1e-5)
    pd = build_prior(stats, "element", expected_batch_size=32.0, drift=0.5, floor=0.0)
    assert torch.allclose(pd.var, p32.var + 0.5 * p32.mean.pow(2), rtol=1e-5)


def test_noisy_mean_is_shrunk():
    """With noise much larger than the signal the released per-element mean is shrunk towards 0."""
    acc = StatisticsAccumulator(LAYOUT, max_grad_norm=1.0, noise_multiplier=5.0, sample_rate=1.0, dataset_size=8, noise_seed=0)
    acc.add(torch.full((8, LAYOUT.dim), 1e-3))
    acc.release_batch()
    stats = acc.finish()
    prior = build_prior(stats, "element", expected_batch_size=8)
    assert float(prior.mean.norm()) < 0.5 * float(stats.moment("sum").norm())


def test_bad_priors():
    stats, _ = exact_stats()
    with pytest.raises(ValueError, match="unknown prior"):
        build_prior(stats, "gaussian")
    with pytest.raises(ValueError, match="expected_batch_size"):
        build_prior(stats, "element", expected_batch_size=0)
    with pytest.raises(ValueError, match="NaN"):
        GaussianPrior(LAYOUT, torch.full((LAYOUT.dim,), float("nan")), torch.ones(LAYOUT.dim))
    with pytest.raises(ValueError, match="zero variance"):
        GaussianPrior(LAYOUT, torch.zeros(LAYOUT.dim), torch.zeros(LAYOUT.dim))


def _noisy_stats(signal=0.0, n=64, noise_multiplier=1.0, seed=0):
    """Statistics of ``n`` per-example gradients equal to ``signal`` everywhere, released with noise."""
    acc = StatisticsAccumulator(LAYOUT, max_grad_norm=1.0, noise_multiplier=noise_multiplier, sample_rate=1.0,
                                dataset_size=n, noise_seed=seed)
    acc.add(torch.full((n, LAYOUT.dim), signal))
    acc.release_batch()
    return acc.finish()


@pytest.mark.parametrize("kind", ["element", "lowrank"])
@pytest.mark.parametrize("seed", range(4))
def test_a_mean_that_is_only_release_noise_is_zero(kind, seed):
    """Gradients with no mean: what the release shows as a mean is its noise, and none of it enters the prior."""
    stats = _noisy_stats(signal=0.0, seed=seed)
    assert float(stats.moment("sum").norm()) > 0
    assert float(build_prior(stats, kind, expected_batch_size=64).mean.abs().max()) == 0.0


def test_a_mean_far_above_the_release_noise_is_kept():
    stats = _noisy_stats(signal=0.05, n=400, noise_multiplier=0.5)
    mean = build_prior(stats, "element", expected_batch_size=400).mean
    assert torch.allclose(mean, torch.full_like(mean, 0.05), rtol=0.2)


def test_a_zero_message_decodes_to_zero_with_the_default_prior():
    """Directions a message does not measure decode to zero, not to a constant left over from stage 1."""
    from hf_drencoder.codec import pretrain_codec

    prior = build_prior(_noisy_stats(signal=1e-3), expected_batch_size=64)
    codec = pretrain_codec(prior, 1 / 8, noise_std=(0.01, 0.05), progress=False)
    for _ in range(3):
        out = codec.decode(torch.zeros(codec.latent_dim), 0.05)
        codec.observe(out)
        assert float(out.abs().max()) == 0.0
