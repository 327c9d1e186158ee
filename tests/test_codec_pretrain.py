"""pretrain_codec: seeded, held-out validation, early stop, learned residual kept only if it beats MMSE."""

import pytest
import torch

from hf_drencoder.codec import GaussianPrior, LoraLayout, pretrain_codec

@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLP steps: one thread avoids thread-pool overhead dominating (and stalling on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


LAYOUT = LoraLayout(["a.lora_A.default.weight", "a.lora_B.default.weight"], [(4, 32), (32, 4)])  # dim 256


def lowrank_prior():
    g = torch.Generator().manual_seed(0)
    var = torch.rand(LAYOUT.dim, generator=g) + 0.05
    # rank-one samples: a non-Gaussian prior, where a nonlinear decoder has something to find
    return GaussianPrior(LAYOUT, torch.zeros(LAYOUT.dim), var, kind="lowrank", sample_rank=1)


def test_pretraining_lowers_heldout_loss_and_is_seeded():
    kw = dict(decoder="mlp", noise_std=(0.05, 0.5), max_steps=60, batch_size=32, val_size=48, eval_every=20, patience=10,
              lr=3e-3, hidden_size=64, progress=False)
    a = pretrain_codec(lowrank_prior(), 1 / 8, seed=1, **kw)
    rep = a.pretrain_report
    # training reduced the held-out error of the (randomly initialised) residual decoder
    assert rep["mlp_best_heldout"] < 0.995 * rep["mlp_initial_heldout"]
    assert [h for _, h in rep["mlp_history"]][-1] <= rep["mlp_history"][0][1]
    # the decision rule is applied as documented
    assert rep["mlp_kept"] == (rep["mlp_best_heldout"] < 0.99 * rep["mmse_heldout"])
    assert bool(a.mlp_enabled) == rep["mlp_kept"]
    b = pretrain_codec(lowrank_prior(), 1 / 8, seed=1, **kw)
    assert rep == b.pretrain_report
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = pretrain_codec(lowrank_prior(), 1 / 8, seed=2, **kw)
    assert c.pretrain_report["mlp_best_heldout"] != rep["mlp_best_heldout"]


def test_early_stop():
    rep = pretrain_codec(lowrank_prior(), 1 / 8, decoder="mlp", noise_std=0.3, max_steps=2000, eval_every=5, patience=1,
                         lr=1e-1, hidden_size=16, progress=False).pretrain_report
    assert rep["steps"] < 2000


def test_gaussian_prior_keeps_mmse():
    """For a Gaussian prior MMSE is optimal: a learned residual cannot beat it and is switched off."""
    p = GaussianPrior(LAYOUT, torch.zeros(LAYOUT.dim), torch.rand(LAYOUT.dim, generator=torch.Generator().manual_seed(0)) + 0.05)
    codec = pretrain_codec(p, 1 / 8, decoder="mlp", noise_std=0.3, max_steps=60, eval_every=20, hidden_size=32, progress=False)
    rep = codec.pretrain_report
    assert not rep["mlp_kept"] and not bool(codec.mlp_enabled)
    assert rep["mlp_best_heldout"] >= 0.99 * rep["mmse_heldout"]


def test_mmse_report_and_bad_arguments():
    codec = pretrain_codec(lowrank_prior(), 1 / 16, noise_std=(0.1, 1.0), progress=False)
    assert 0 < codec.pretrain_report["mmse_heldout"] < 1
    assert len(codec.pretrain_report["noise_levels"]) == 4
    with pytest.raises(ValueError, match="latent_ratio"):
        pretrain_codec(lowrank_prior(), 0.0, progress=False)
    with pytest.raises(TypeError, match="GaussianPrior"):
        pretrain_codec(torch.zeros(3), 1 / 8, progress=False)
    with pytest.raises(ValueError, match="noise_std"):
        pretrain_codec(lowrank_prior(), 1 / 8, noise_std=float("nan"), progress=False)
