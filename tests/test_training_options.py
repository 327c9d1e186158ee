"""The training options: FFA-LoRA (lora_freeze_a), automatic clipping, DP-AdamBC (dp_adam_bias_correction)."""

import logging
import math

import pytest
import torch

from conftest import dr_args, make_tiny_bert
from hf_drencoder import DRTrainer, DRTrainingArguments
from hf_drencoder.dp_adam import DPAdamBC, released_noise_variance
from hf_drencoder.hub import privacy_metadata, privacy_section
from hf_drencoder.privacy.clipping import clip_and_sum, per_sample_norms
from hf_drencoder.privacy.mechanism import GaussianGradientMechanism


def capture_releases(trainer):
    released = []
    trainer.post_privacy_hooks.append(lambda grads: released.append([g.clone() for g in grads]) or grads)
    return released


# ---- FFA-LoRA ----

def test_lora_freeze_a_keeps_a_and_releases_noise_only_in_b(tmp_path, cls_dataset, caplog):
    """Every example's loss is multiplied by 0, so each release is pure noise: A must stay at its initialisation,
    and the noise must sit in B's and the head's coordinates only, with std sigma C / B each."""
    args = dr_args(tmp_path, lora_freeze_a=True, default_lora_target_modules=["query", "value"],
                   per_device_train_batch_size=16, max_steps=2, noise_multiplier=2.0, per_sample_max_grad_norm=0.5)
    trainer = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=cls_dataset)
    a_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A." in n}
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert a_before and not any("lora_A." in n for n in trainable) and any("lora_B." in n for n in trainable)
    b_before = {n: p.detach().clone() for n, p in trainable.items()}
    base_losses = trainer.per_sample_losses
    trainer.per_sample_losses = lambda model, inputs: base_losses(model, inputs) * 0.0
    released = capture_releases(trainer)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[n], a) for n, a in a_before.items())  # noise would have moved a trained A
    assert all(not torch.equal(params[n], b) for n, b in b_before.items())
    dim = sum(p.numel() for p in trainable.values())
    assert len(released) == 2 and all(sum(g.numel() for g in step) == dim for step in released)
    noise = torch.cat([g.flatten() for step in released for g in step])
    assert noise.std().item() == pytest.approx(2.0 * 0.5 / 16, rel=0.1)
    report = trainer.privacy_report()
    assert report["lora_freeze_a"] is True and report["released_dimension"] == dim == trainer.released_dimension()
    assert f"released dimension={dim}" in caplog.text and "lora_freeze_a" in caplog.text
    card = privacy_section(report)
    assert f"| released dimension | {dim} |" in card and "FFA-LoRA" in card
    assert privacy_metadata(report)["released_dimension"] == dim
    # the same adapter with A trained releases A's coordinates too
    full = DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, default_lora_target_modules=["query", "value"]),
                     train_dataset=cls_dataset)
    assert full.released_dimension() == dim + sum(a.numel() for a in a_before.values())


@pytest.mark.parametrize("target", ["lora_A.", "encoder.layer.0.attention.output.dense.weight"])
def test_a_parameter_thawed_during_training_is_refused_before_its_raw_gradient_is_used(tmp_path, cls_dataset, target):
    """A callback makes a frozen tensor trainable at step 2 (a frozen LoRA A of FFA-LoRA, a base weight) while the user's optimizer covers every parameter: its raw gradient would be applied. Training stops
    before step 2's backward, and the tensor keeps its value."""
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    model = get_peft_model(make_tiny_bert(), LoraConfig(r=2, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"]))
    thawed = next(p for n, p in model.named_parameters() if target in n)
    before = thawed.detach().clone()

    class Thaw(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                thawed.requires_grad_(True)

    args = dr_args(tmp_path, lora_freeze_a=True, max_steps=3, learning_rate=0.1)
    trainer = DRTrainer(model=model, args=args, train_dataset=cls_dataset, callbacks=[Thaw()],
                        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))
    with pytest.raises(RuntimeError, match="became trainable after training started"):
        trainer.train()
    assert trainer.state.global_step == 1 and torch.equal(thawed.detach(), before)


def test_lora_freeze_a_without_lora_factors_is_refused():
    from hf_drencoder.lora import freeze_lora_a

    with pytest.raises(ValueError, match="no LoRA A factors"):
        freeze_lora_a(torch.nn.Linear(2, 2))


# ---- automatic clipping ----

def test_automatic_clipping_bounds_every_example_and_the_sum():
    g = torch.Generator().manual_seed(0)
    C, gamma = 0.7, 0.01
    # norms from 1e-4 to 1e3: below gamma, near it, and far above C
    scales = torch.logspace(-4, 3, 40)
    grads = [torch.randn(40, 5, 3, generator=g) * scales[:, None, None], torch.randn(40, 4, generator=g) * scales[:, None]]
    norms = per_sample_norms(grads)
    factor = C / (norms + gamma)
    scaled_norms = norms * factor
    assert (scaled_norms <= C).all() and scaled_norms.max() > 0.99 * C
    assert torch.allclose(scaled_norms, C * norms / (norms + gamma))
    sums, _ = clip_and_sum(grads, C, "automatic", gamma)
    without_last, _ = clip_and_sum([x[:-1] for x in grads], C, "automatic", gamma)
    # adding one example (the largest) moves the sum by at most C
    moved = torch.cat([(a - b).flatten() for a, b in zip(sums, without_last)]).norm()
    assert 0.99 * C < moved <= C
    # and the sum is sum_i C g_i / (||g_i|| + gamma), computed by hand
    hand = [torch.einsum("b,b...->...", factor, x) for x in grads]
    assert all(torch.allclose(s, h, rtol=1e-5, atol=1e-7) for s, h in zip(sums, hand))
    # small gradients are scaled up (flat clipping would leave them as they are)
    flat, _ = clip_and_sum([x[:1] for x in grads], C, "flat")
    auto, _ = clip_and_sum([x[:1] for x in grads], C, "automatic", gamma)
    assert torch.cat([a.flatten() for a in auto]).norm() > 50 * torch.cat([f.flatten() for f in flat]).norm()


def test_automatic_clipping_noise_std_is_sigma_c():
    p = torch.nn.Parameter(torch.zeros(20000))
    mech = GaussianGradientMechanism([p], max_grad_norm=0.3, noise_multiplier=1.5, expected_batch_size=1.0,
                                     clipping="automatic", clipping_gamma=0.01, noise_seed=0)
    mech.add_per_sample([torch.zeros(3, 20000)])  # zero gradients: the release is the noise alone
    (out,) = mech.release()
    assert out.std().item() == pytest.approx(1.5 * 0.3, rel=0.03)


@pytest.mark.parametrize("gamma", [0.0, -1.0, math.inf])
def test_bad_clipping_gamma_is_refused(tmp_path, gamma):
    with pytest.raises(ValueError, match="clipping_gamma"):
        dr_args(tmp_path, clipping="automatic", clipping_gamma=gamma)


# ---- DP-AdamBC ----

def test_dp_adam_bc_matches_a_hand_computation():
    lr, b1, b2, wd, phi, gamma = 0.1, 0.9, 0.99, 0.01, 0.04, 1e-3
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = DPAdamBC([w], lr=lr, betas=(b1, b2), weight_decay=wd, noise_variance=phi, gamma=gamma)
    grads = [[0.5, 0.01, -0.3], [0.4, -0.02, -0.1]]
    x, m, v = [1.0, -2.0, 0.5], [0.0] * 3, [0.0] * 3
    for t, gr in enumerate(grads, start=1):
        w.grad = torch.tensor(gr)
        opt.step()
        for i in range(3):
            x[i] *= 1 - lr * wd
            m[i] = b1 * m[i] + (1 - b1) * gr[i]
            v[i] = b2 * v[i] + (1 - b2) * gr[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            x[i] -= lr * m_hat / math.sqrt(max(v_hat - phi, gamma))
        assert w.detach().tolist() == pytest.approx(x, rel=1e-5)
    # the middle coordinate's v_hat is below the noise variance: its denominator is the floor sqrt(gamma)
    assert opt.state[w]["exp_avg_sq"][1] / (1 - b2**2) < phi


def test_dp_adam_bc_without_noise_is_adamw_with_a_floor():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ours = DPAdamBC([a], lr=1e-2, weight_decay=0.1, noise_variance=0.0, gamma=1e-16)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1, eps=0.0)
    for _ in range(5):
        g = torch.randn(50)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_automatic_clipping_and_dp_adam_bc_through_the_trainer(tmp_path, cls_dataset, caplog):
    args = dr_args(tmp_path, clipping="automatic", clipping_gamma=0.05, dp_adam_bias_correction=True,
                   noise_multiplier=1.3, per_sample_max_grad_norm=0.4, per_device_train_batch_size=16, max_steps=2)
    trainer = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=cls_dataset)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer._mechanism.clipping == "automatic" and trainer._mechanism.clipping_gamma == 0.05
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), DPAdamBC)
    # the variance subtracted is that of the released mean gradient: (sigma C / expected batch)^2
    assert all(g["noise_variance"] == pytest.approx((1.3 * 0.4 / 16) ** 2) for g in trainer.optimizer.param_groups)
    assert released_noise_variance(1.3, 0.4, 16) == pytest.approx((1.3 * 0.4 / 16) ** 2)
    assert trainer.optimizer.state  # it stepped
    for text in ("clipping=automatic", "clipping_gamma=0.05", "DP-AdamBC"):
        assert text in caplog.text
    report = trainer.privacy_report()
    assert report["clipping_gamma"] == 0.05 and report["dp_adam_bias_correction"] is True


@pytest.mark.parametrize("kwargs, match", [
    (dict(disable_dp=True), "no noise to correct"),
    (dict(optim="sgd"), "replaces AdamW"),
    (dict(codec="auto"), "codec"),
    (dict(dp_adam_gamma=0.0), "dp_adam_gamma"),
])
def test_dp_adam_bc_is_refused_where_it_cannot_hold(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        dr_args(tmp_path, dp_adam_bias_correction=True, **kwargs)


def test_dp_adam_bc_with_a_given_optimizer_is_refused(tmp_path, cls_dataset):
    model = make_tiny_bert()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="builds its own optimizer"):
        DRTrainer(model=model, args=dr_args(tmp_path, dp_adam_bias_correction=True), train_dataset=cls_dataset,
                  optimizers=(opt, None))


def test_option_fields_reach_the_command_line():
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DRTrainingArguments).parse_args_into_dataclasses(args=[
        "--output_dir", "x", "--noise_multiplier", "1", "--lora_freeze_a", "true", "--clipping", "automatic",
        "--clipping_gamma", "0.02", "--dp_adam_bias_correction", "true", "--dp_adam_gamma", "1e-9"])
    assert args.lora_freeze_a and args.clipping == "automatic" and args.clipping_gamma == 0.02
    assert args.dp_adam_bias_correction and args.dp_adam_gamma == 1e-9
    help_text = HfArgumentParser(DRTrainingArguments).format_help()
    assert "--lora_freeze_a" in help_text and "--clipping_gamma" in help_text and "DP-AdamBC" in help_text
