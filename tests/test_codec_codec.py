"""GradientCodec: exact MMSE decoding, save/load, layout refusal, argument checks."""

import math

import pytest
import torch
from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model

from hf_drencoder.codec import GaussianPrior, GradientCodec, LayoutMismatchError, LoraLayout, latent_size

LAYOUT = LoraLayout(["a.lora_A.default.weight", "a.lora_B.default.weight"], [(4, 16), (16, 4)])  # dim 128


def prior(seed=0, mean_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return GaussianPrior(LAYOUT, torch.randn(LAYOUT.dim, generator=g) * mean_scale, torch.rand(LAYOUT.dim, generator=g) * 2 + 0.01)


def dense_posterior_mean(mu, cov, P, s, z):
    """E[g | P (g + n) = z] for g ~ N(mu, cov), n ~ N(0, s^2 I), by plain dense algebra (float64)."""
    mu, cov, P, z = (t.double() for t in (mu, cov, P, z))
    K = P @ cov @ P.T + s * s * P @ P.T
    return (mu + cov @ P.T @ torch.linalg.solve(K, z - P @ mu)).float()


def selection_matrix(codec):
    P = torch.zeros(codec.latent_dim, LAYOUT.dim)
    P[torch.arange(codec.num_selected), codec.selected] = 1.0
    return P


def test_latent_size_and_selection_follow_the_prior():
    p = prior()
    codec = GradientCodec.from_prior(p, latent_ratio=1 / 8)
    assert codec.latent_dim == latent_size(LAYOUT.dim, 1 / 8) == 16
    assert codec.payload_bytes == 64
    top = set(torch.topk(p.var, 16).indices.tolist())
    assert set(codec.selected.tolist()) == top


@pytest.mark.parametrize("s", [0.0, 0.3, 3.0])
def test_mmse_decoder_matches_the_closed_form(s):
    p = prior()
    codec = GradientCodec.from_prior(p, latent_ratio=1 / 8)
    g = p.sample(5, torch.Generator().manual_seed(2))
    y = g + s * torch.randn(g.shape, generator=torch.Generator().manual_seed(3))
    z = codec.encode(y)
    want = torch.stack([dense_posterior_mean(p.mean, torch.diag(p.var), selection_matrix(codec), s, zi) for zi in z])
    assert torch.allclose(codec.decode(z, s), want, atol=1e-5)


def test_mmse_error_equals_its_theoretical_value():
    """Monte Carlo MSE of the decoder = trace of the posterior covariance (the MMSE) for a Gaussian prior."""
    p, s = prior(mean_scale=0.0), 0.5
    codec = GradientCodec.from_prior(p, latent_ratio=1 / 4)
    gen = torch.Generator().manual_seed(0)
    g = p.sample(20000, gen)
    est = codec.decode(codec.encode(g + s * torch.randn(g.shape, generator=gen)), s)
    mse = float((est - g).pow(2).sum(1).mean())
    d = p.var
    sel = torch.zeros(LAYOUT.dim, dtype=torch.bool)
    sel[codec.selected] = True
    theory = float((d[sel] * s * s / (d[sel] + s * s)).sum() + d[~sel].sum())
    assert mse == pytest.approx(theory, rel=0.02)
    # at a high noise level a noise-blind decoder (trusting the noisy latent) does much worse on what was sent
    y = g + 2.0 * torch.randn(g.shape, generator=gen)
    aware = (codec.decode(codec.encode(y), 2.0) - g)[:, sel].pow(2).sum(1).mean()
    blind = (codec.decode(codec.encode(y), 0.0) - g)[:, sel].pow(2).sum(1).mean()
    assert float(aware) == pytest.approx(float((d[sel] * 4 / (d[sel] + 4)).sum()), rel=0.02)
    assert float(blind) == pytest.approx(4.0 * int(sel.sum()), rel=0.02)
    assert float(blind) > 2 * float(aware)


def test_window_temporal_decoder_matches_dense_formula():
    """With the span prior Sigma = diag(d) + V V^T and the window rows in the encoder, decode = dense MMSE."""
    p, s = prior(), 0.4
    codec = GradientCodec.from_prior(p, latent_ratio=1 / 8, temporal_window=3, temporal_gain=2.0)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        codec.observe(torch.randn(LAYOUT.dim, generator=gen))
    q = codec._temporal_basis()
    P = torch.cat([selection_matrix(codec)[: codec.num_selected], q])
    assert torch.allclose(P @ P.T, torch.eye(codec.latent_dim), atol=1e-5)  # orthonormal rows: white latent noise
    V = codec.window.t() * math.sqrt(2.0 / 3)
    cov = torch.diag(p.var) + V @ V.T
    y = p.sample(1, gen)[0] + s * torch.randn(LAYOUT.dim, generator=gen)
    z = codec.encode(y, s)
    assert torch.allclose(codec.decode(z, s), dense_posterior_mean(p.mean, cov, P, s, z), atol=1e-4)


def test_ar1_decoder_is_exact_kalman_filter():
    """Two steps of the AR(1) prior: the decoded second gradient equals E[g2 | z1, z2] computed densely."""
    p, s, rho = prior(), 0.5, 0.7
    codec = GradientCodec.from_prior(p, latent_ratio=1 / 8, temporal_rho=rho)
    gen = torch.Generator().manual_seed(7)
    g1 = p.sample(1, gen)[0]
    g2 = p.mean + rho * (g1 - p.mean) + math.sqrt(1 - rho**2) * p.var.sqrt() * torch.randn(LAYOUT.dim, generator=gen)
    y1, y2 = (g + s * torch.randn(LAYOUT.dim, generator=gen) for g in (g1, g2))
    z1 = codec.encode(y1, s)
    S1 = codec._kalman_selection(s * s)
    codec.observe(codec.decode(z1, s))
    S2 = codec._kalman_selection(s * s)
    assert set(S1.tolist()) != set(S2.tolist())  # the encoder moves to what it knows least
    z2 = codec.encode(y2, s)
    out = codec.decode(z2, s)
    # dense: joint Gaussian of (g1, g2), observations z1 = g1[S1] + n, z2 = g2[S2] + n
    D = LAYOUT.dim
    Dg = torch.diag(p.var).double()
    cov = torch.cat([torch.cat([Dg, rho * Dg], 1), torch.cat([rho * Dg, Dg], 1)])
    mu = torch.cat([p.mean, p.mean]).double()
    P = torch.zeros(2 * len(S1), 2 * D, dtype=torch.float64)
    P[torch.arange(len(S1)), S1] = 1
    P[len(S1) + torch.arange(len(S2)), D + S2] = 1
    z = torch.cat([z1, z2]).double()
    post = mu + cov @ P.T @ torch.linalg.solve(P @ cov @ P.T + s * s * torch.eye(len(z), dtype=torch.float64), z - P @ mu)
    assert torch.allclose(out.double(), post[D:], atol=1e-5)


def test_roundtrip_keeps_structure():
    codec = GradientCodec.from_prior(prior(), latent_ratio=1 / 8)
    grads = [torch.randn(4, 16, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)]
    out = codec.roundtrip(grads, noise_std=0.1)
    assert [(o.shape, o.dtype) for o in out] == [(g.shape, g.dtype) for g in grads]
    assert len(codec.decode(codec.encode(grads), 0.1, as_tensors=True)) == 2


@pytest.mark.parametrize("kw", [{}, {"temporal_rho": 0.8}, {"temporal_window": 2}])
def test_save_load_gives_identical_outputs(tmp_path, kw):
    codec = GradientCodec.from_prior(prior(), latent_ratio=1 / 8, **kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # some temporal state that must survive the round trip
        codec.roundtrip(LAYOUT.unflatten(torch.randn(LAYOUT.dim, generator=gen)), 0.2)
    codec.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    loaded = GradientCodec.from_pretrained(tmp_path, layout=LAYOUT)
    y = torch.randn(LAYOUT.dim, generator=gen)
    assert torch.equal(codec.encode(y, 0.2), loaded.encode(y, 0.2))
    assert torch.equal(codec.decode(codec.encode(y, 0.2), 0.2), loaded.decode(loaded.encode(y, 0.2), 0.2))
    assert loaded.layout == codec.layout and loaded.latent_ratio == codec.latent_ratio


def test_loading_for_another_model_is_refused(tmp_path):
    model4 = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model8 = get_peft_model(make_tiny_llama(), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    lay4, lay8 = LoraLayout.from_model(model4), LoraLayout.from_model(model8)
    codec = GradientCodec.from_prior(GaussianPrior(lay4, torch.zeros(lay4.dim), torch.ones(lay4.dim)))
    codec.save_pretrained(tmp_path)
    GradientCodec.from_pretrained(tmp_path, model=model4)  # the right model loads
    with pytest.raises(LayoutMismatchError) as err:
        GradientCodec.from_pretrained(tmp_path, model=model8)
    assert lay4.fingerprint in str(err.value) and lay8.fingerprint in str(err.value)
    with pytest.raises(LayoutMismatchError):
        codec.encode(torch.zeros(lay8.dim))


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="latent_ratio must be in"):
        GradientCodec.from_prior(prior(), latent_ratio=ratio)


def test_nan_inputs_are_refused():
    codec = GradientCodec.from_prior(prior(), latent_ratio=1 / 8)
    bad = torch.zeros(LAYOUT.dim)
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(bad)
    with pytest.raises(ValueError, match="NaN"):
        codec.decode(torch.full((codec.latent_dim,), float("inf")), 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        codec.decode(torch.zeros(codec.latent_dim), float("nan"))
    with pytest.raises(ValueError, match="latent has"):
        codec.decode(torch.zeros(codec.latent_dim + 1), 0.1)


def test_lowrank_part_reconstructs_rank_one_factors_and_round_trips(tmp_path):
    """lora_rank=1: a clean gradient whose stacked LoRA factors are rank one comes back exactly, and the
    warm-start factors (shared state of both ends) survive save/load."""
    layout = LoraLayout(
        ["m0.lora_A.default.weight", "m0.lora_B.default.weight", "m1.lora_A.default.weight", "m1.lora_B.default.weight"],
        [(2, 12), (12, 2), (2, 12), (12, 2)],
    )
    p = GaussianPrior(layout, torch.zeros(layout.dim), torch.rand(layout.dim, generator=torch.Generator().manual_seed(0)) + 0.1)
    codec = GradientCodec.from_prior(p, latent_ratio=0.5, temporal_rho=0.8, lora_rank=1)
    assert codec.lowrank_payload == 2 * (4 + 12)  # A stacked 4 x 12, B stacked 12 x 4, rank one each
    # the two stacks cover every value: no coordinate is left to select, and the message is the 32 numbers sent
    assert codec.latent_dim == 32 and codec.num_selected == 0
    g = torch.Generator().manual_seed(1)
    u, v, w, x = (torch.randn(n, generator=g) for n in (4, 12, 12, 4))
    a_stack, b_stack = torch.outer(u, v), torch.outer(w, x)
    grads = [a_stack[:2], b_stack[:, :2], a_stack[2:], b_stack[:, 2:]]
    out = codec.roundtrip(grads, noise_std=0.0)
    assert all(torch.allclose(o, t, atol=1e-5) for o, t in zip(out, grads))
    codec.save_pretrained(tmp_path)
    loaded = GradientCodec.from_pretrained(tmp_path, layout=layout)
    assert torch.equal(loaded.lowrank_q, codec.lowrank_q)
    y = layout.flatten(grads) + 0.1 * torch.randn(layout.dim, generator=g)
    assert torch.equal(codec.decode(codec.encode(y, 0.1), 0.1), loaded.decode(loaded.encode(y, 0.1), 0.1))
    # a group that does not fit in the latent share is left to coordinate selection
    small = GradientCodec.from_prior(p, latent_ratio=1 / 8, lora_rank=1)
    assert small.lowrank_payload == 0 and small.num_selected == small.latent_dim


HEAD_LAYOUT = LoraLayout(
    ["a.lora_A.default.weight", "a.lora_B.default.weight", "classifier.modules_to_save.default.weight"],
    [(8, 64), (64, 8), (3, 64)],
)  # 1024 LoRA values, a 192-value head


def test_the_head_is_sent_raw_and_counted_and_the_latent_is_spent_on_lora():
    # a head whose gradients dominate: coded as one vector it would take every latent coordinate
    var = torch.cat([torch.full((1024,), 1e-4), torch.full((192,), 1.0)])
    codec = GradientCodec.from_prior(GaussianPrior(HEAD_LAYOUT, torch.zeros(HEAD_LAYOUT.dim), var), 1 / 64)
    lora_k = latent_size(1024, 1 / 64)
    assert codec.raw_dim == 192 and codec.latent_dim == lora_k + 192
    assert codec.payload_bytes == 4 * (lora_k + 192)  # every byte that leaves the party, head included
    assert int(codec.selected.max()) < 1024  # all measured coordinates lie in the LoRA factors
    g = torch.randn(HEAD_LAYOUT.dim, generator=torch.Generator().manual_seed(0))
    out = codec.decode(codec.encode(g), 0.1)
    assert torch.equal(out[1024:], g[1024:])  # the head as sent
    old = GradientCodec.from_prior(GaussianPrior(HEAD_LAYOUT, torch.zeros(HEAD_LAYOUT.dim), var), 1 / 64, raw_head=False)
    assert old.raw_dim == 0 and int(old.selected.min()) >= 1024  # the paper's setting: the head takes the latent


def test_the_ar1_codec_measures_lora_coordinates_only():
    var = torch.cat([torch.full((1024,), 1e-4), torch.full((192,), 1.0)])
    prior = GaussianPrior(HEAD_LAYOUT, torch.zeros(HEAD_LAYOUT.dim), var)
    codec = GradientCodec.from_prior(prior, 1 / 64, temporal_rho=0.8)
    for _ in range(3):
        assert int(codec._kalman_selection(0.01).max()) < 1024
        codec.observe(codec.decode(codec.encode(torch.randn(HEAD_LAYOUT.dim)), 0.1))


def test_no_latent_value_is_spent_on_coordinates_the_low_rank_part_already_sends():
    var = torch.cat([torch.full((1024,), 1e-4), torch.full((192,), 1.0)])
    prior = GaussianPrior(HEAD_LAYOUT, torch.zeros(HEAD_LAYOUT.dim), var)
    # at 1/2 the rank-one parts of both factor stacks fit and cover every LoRA value: nothing is left to select
    codec = GradientCodec.from_prior(prior, 1 / 2, lora_rank=1, temporal_rho=0.8)
    assert codec.lowrank_payload == 2 * (8 + 64) and codec.num_selected == 0
    assert codec.latent_dim == codec.lowrank_payload + 192 and codec.payload_bytes == 4 * codec.latent_dim
    g = torch.randn(HEAD_LAYOUT.dim)
    assert codec.decode(codec.encode(g), 0.01).shape == g.shape
