"""DR-Encoder stage 2 in DRTrainer: the codec in the private step, both noise spaces, provenance, uplink."""

import math
import os

import pytest
import torch

from conftest import dr_args, make_cls_dataset, make_tiny_bert
from hf_drencoder import DRTrainer, PrivacyBudgetError
from hf_drencoder.codec import GaussianPrior, GradientCodec, LoraLayout
from hf_drencoder.privacy import compute_epsilon

N = 96
STAGE1 = [1.5, 0.25, 2]  # (sigma, q, releases) recorded as the prior's cost


def _codec(model, lora_rank=0, history=STAGE1, ratio=1 / 8):
    layout = LoraLayout.from_model(model)
    meta = {"privacy_history": [history]} if history is not None else {}
    prior = GaussianPrior(layout, torch.zeros(layout.dim), torch.full((layout.dim,), 1e-4), meta=meta)
    return GradientCodec.from_prior(prior, ratio, lora_rank=lora_rank, temporal_rho=0.5 if not lora_rank else 0.0)


def _trainer(tmp_path, codec, **kw):
    trainer = DRTrainer(
        model=make_tiny_bert(), args=dr_args(tmp_path, **kw), train_dataset=make_cls_dataset(n=N), codec=codec
    )
    return trainer


def _wrapped_peft_bert(tmp_path):
    """The PeftModel DRTrainer would build, to make a codec for its layout."""
    return DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, max_steps=1), train_dataset=make_cls_dataset(n=N)).model


def _spy_release(trainer, clean, noisy):
    """Record, at every release, the clean (clipped, un-noised) sum and the noised mean the mechanism returns."""
    mech = trainer._mechanism
    original = mech.release

    def release(all_reduce=None):
        sums = mech._sums if mech._sums is not None else [torch.zeros(p.shape) for p in mech.params]
        clean.append(torch.cat([s.reshape(-1) for s in sums]).clone())
        out = original(all_reduce)
        noisy.append(torch.cat([o.reshape(-1) for o in out]).clone())
        return out

    mech.release = release


class _SpyStart:
    """Install spies once the mechanism exists (it is created inside train())."""

    def __init__(self, trainer, fn):
        original = trainer._start_mechanism

        def start(step):
            original(step)
            fn(trainer)

        trainer._start_mechanism = start


def test_gradient_mode_encoder_only_sees_noised_gradients(tmp_path):
    codec = _codec(_wrapped_peft_bert(tmp_path))
    sigma, C, B = 2.0, 0.5, 16
    trainer = _trainer(tmp_path, codec, noise_multiplier=sigma, per_sample_max_grad_norm=C,
                       per_device_train_batch_size=B, max_steps=3)
    encoded, clean, noisy = [], [], []
    original_encode = codec.encode

    def encode(grads, noise_std=None):
        encoded.append((trainer.layout.flatten(grads).clone(), noise_std))
        return original_encode(grads, noise_std)

    codec.encode = encode
    _SpyStart(trainer, lambda t: _spy_release(t, clean, noisy))
    trainer.train()
    assert len(encoded) == len(noisy) == 3
    for (x, s), c, y in zip(encoded, clean, noisy):
        assert torch.equal(x, y)  # exactly the released (noised) mean, nothing else
        assert s == pytest.approx(sigma * C / B)
        resid = x - c / B
        assert resid.std().item() == pytest.approx(sigma * C / B, rel=0.1)  # ~3000 coordinates of noise
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["uplink_bytes"] == codec.payload_bytes == 4 * codec.latent_dim
    assert logs[-1]["uplink_ratio"] == pytest.approx(codec.latent_dim / trainer.layout.dim)


def test_latent_mode_clips_and_noises_latents(tmp_path):
    codec = _codec(_wrapped_peft_bert(tmp_path))
    sigma, C, B = 2.0, 0.05, 16
    trainer = _trainer(tmp_path, codec, noise_multiplier=sigma, per_sample_max_grad_norm=C,
                       per_device_train_batch_size=B, max_steps=3, noise_space="latent")
    per_sample, clean, noisy, decoded_in = [], [], [], []

    def spies(t):
        mech = t._mechanism
        assert [p.shape for p in mech.params] == [torch.Size([codec.latent_dim])]
        add = mech.add_per_sample
        mech.add_per_sample = lambda g: per_sample.append(g[0].clone()) or add(g)
        _spy_release(t, clean, noisy)

    _SpyStart(trainer, spies)
    original_decode = codec.decode
    codec.decode = lambda z, s=None, **kw: decoded_in.append((z.clone(), s)) or original_decode(z, s, **kw)
    trainer.train()
    assert per_sample and all(z.shape[1] == codec.latent_dim for z in per_sample)
    # C is small: the latents were clipped, so each step's clean sum has norm <= (examples in it) * C
    total = sum(z.shape[0] for z in per_sample)
    assert sum(c.norm().item() for c in clean) <= total * C * (1 + 1e-4)
    assert max(z.norm(dim=1).max().item() for z in per_sample) > C  # ... and clipping had work to do
    for (z, s), c, y in zip(decoded_in, clean, noisy):
        assert torch.equal(z, y) and s == pytest.approx(sigma * C / B)
        assert (z - c / B).std().item() == pytest.approx(sigma * C / B, rel=0.25)  # ~50 latent coordinates
    assert trainer.privacy_report()["noise_space"] == "latent"


def test_latent_mode_refuses_an_unaccounted_encoder(tmp_path):
    peft_model = _wrapped_peft_bert(tmp_path)
    unknown = _codec(peft_model, history=None)
    assert unknown.stage1_history is None
    trainer = _trainer(tmp_path, unknown, noise_space="latent", max_steps=1)
    with pytest.raises(PrivacyBudgetError, match="stage1_privacy is unknown"):
        trainer.train()
    # declared public, the same codec is accepted and costs nothing extra
    trainer = _trainer(tmp_path, unknown.mark_public("built by hand in a test"), noise_space="latent", max_steps=1)
    trainer.train()
    assert trainer.ledger.accountant.history == [(1.0, 8 / N, 1)]
    # an encoder that is a power iteration on its input is not a fixed map: refused in latent space
    with pytest.raises(ValueError, match="fixed linear map"):
        _trainer(tmp_path, _codec(peft_model, lora_rank=1), noise_space="latent", max_steps=1).train()


def test_codec_stage1_cost_is_in_the_ledger_and_survives_resume(tmp_path):
    codec = _codec(_wrapped_peft_bert(tmp_path))
    trainer = _trainer(tmp_path, codec, max_steps=4, save_strategy="steps", save_steps=2)
    trainer.train()
    q = 8 / N
    assert trainer.ledger.accountant.history == [tuple(STAGE1), (1.0, q, 4)]
    expected = compute_epsilon([tuple(STAGE1), (1.0, q, 4)], 1 / N, "prv")
    assert trainer.privacy_report()["epsilon"] == pytest.approx(expected)
    assert trainer.privacy_report()["epsilon"] > compute_epsilon([(1.0, q, 4)], 1 / N, "prv")
    assert os.path.isdir(tmp_path / "out" / "checkpoint-2" / "codec")
    # resume at step 2: the saved codec is loaded, its stage-1 cost is counted once, not twice
    resumed = _trainer(tmp_path, codec, max_steps=4, save_strategy="no")
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.ledger.accountant.history == [tuple(STAGE1), (1.0, q, 4)]
    assert resumed.codec is not codec and resumed.codec.latent_dim == codec.latent_dim


def test_codec_auto_runs_stage1_on_the_training_data_and_pays_for_it(tmp_path):
    trainer = _trainer(tmp_path, "auto", target_epsilon=6.0, max_steps=3, codec_stats_batches=2,
                       codec_stats_batch_size=32, codec_stats_noise_multiplier=2.0)
    trainer.train()
    history = trainer.ledger.accountant.history
    assert history[0] == (2.0, 32 / N, 2)  # stage 1, recorded before training
    assert history[1][1:] == (8 / N, 3)
    assert trainer.codec is not None and trainer.codec.stage1_history == [(2.0, 32 / N, 2)]
    report = trainer.privacy_report()
    assert report["epsilon"] == pytest.approx(compute_epsilon(history, 1 / N, "prv")) and report["epsilon"] <= 6.0
    assert report["uplink_bytes"] == trainer.codec.payload_bytes < 4 * trainer.layout.dim
    assert report["codec_latent_ratio"] == pytest.approx(1 / 64)


def test_no_codec_uplink_is_the_raw_lora_gradient(tmp_path):
    trainer = _trainer(tmp_path, None, max_steps=1)
    trainer.train()
    assert trainer.uplink_bytes == 4 * sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trainer.uplink_ratio == 1.0 and trainer.privacy_report()["noise_space"] is None


def test_codec_for_another_layout_and_latent_without_codec_are_refused(tmp_path):
    from hf_drencoder import LayoutMismatchError

    other = GradientCodec(layout=LoraLayout(["x.lora_A.weight"], [(2, 4)]).to_dict(), latent_ratio=0.5)
    with pytest.raises(LayoutMismatchError):
        _trainer(tmp_path, other.mark_public("test"), max_steps=1).train()
    with pytest.raises(ValueError, match="needs a codec"):
        _trainer(tmp_path, None, noise_space="latent")
    assert math.isfinite(compute_epsilon([tuple(STAGE1)], 1 / N, "rdp"))
