"""Baseline compressors at equal bytes: unbiased random projection, top-k and PowerSGD with error feedback."""

import pytest
import torch

from hf_drencoder.codec import LoraLayout
from hf_drencoder.codec.baselines import PowerSGDCodec, RandomProjectionCodec, TopKCodec, make_baseline

LAYOUT = LoraLayout(
    ["a.lora_A.default.weight", "a.lora_B.default.weight", "b.lora_A.default.weight", "b.lora_B.default.weight",
     "classifier.modules_to_save.default.weight"],
    [(2, 16), (16, 2), (2, 16), (16, 2), (3, 8)],
)  # 128 LoRA values, a 24-value head
LORA = 128


def _grad(seed=0):
    return torch.randn(LAYOUT.dim, generator=torch.Generator().manual_seed(seed))


def test_random_projection_is_unbiased_over_steps_and_public_seeds():
    y = _grad()
    codec = RandomProjectionCodec(LAYOUT, 1 / 16, seed=3)
    assert codec.payload_values == 8 and codec.payload_bytes == 4 * (8 + 24)
    n, total = 3000, torch.zeros(LAYOUT.dim)
    for _ in range(n):
        total += codec.decode(codec.encode(y))
        codec.observe(None)
    mean = total / n
    # per coordinate the estimate has variance about ||y||^2 / k; the mean of n steps is within 5 of its std
    tol = 5 * float(y[:LORA].norm()) / (8 * n) ** 0.5
    assert float((mean[:LORA] - y[:LORA]).abs().max()) < tol
    assert torch.allclose(mean[LORA:], y[LORA:], atol=1e-3)  # the head is sent raw
    # one step's estimate is far from y (it is compressed 16x): the average is what is unbiased
    assert float((codec.decode(codec.encode(y)) - y)[:LORA].norm()) > 0.5 * float(y[:LORA].norm())


def test_random_projection_both_ends_draw_the_same_matrix_from_the_public_step():
    a, b = RandomProjectionCodec(LAYOUT, 1 / 16, seed=3), RandomProjectionCodec(LAYOUT, 1 / 16, seed=3)
    y = _grad(1)
    z = a.encode(y)
    assert torch.equal(b.decode(z), a.decode(z))
    a.observe(None)
    assert not torch.equal(a.encode(y), z)  # a fresh matrix each step


def test_top_k_bytes_and_error_feedback():
    codec = TopKCodec(LAYOUT, 1 / 16)
    assert codec.num_values == 4 and codec.payload_bytes == 4 * (2 * 4 + 24)  # values + int32 indices + head
    y, sent = _grad(2), torch.zeros(LAYOUT.dim)
    for step in range(LORA // 4):
        out = codec.roundtrip(LAYOUT.unflatten(y))
        out = LAYOUT.flatten(out)
        assert int((out[:LORA] != 0).sum()) <= 4
        sent += out
        # nothing is lost: what was sent so far plus the sender's error buffer is everything the steps released
        assert torch.allclose(sent[:LORA] + codec.error, (step + 1) * y[:LORA], atol=1e-4)
    assert torch.allclose(sent[LORA:], (LORA // 4) * y[LORA:], atol=1e-4)


def test_powersgd_bytes_rank_one_recovery_and_error_feedback():
    codec = PowerSGDCodec(LAYOUT, rank=1)
    # A factors stack to 4 x 16, B factors to 16 x 4: rank 1 costs (4 + 16) numbers per stack
    assert codec.payload_values == 40 and codec.payload_bytes == 4 * (40 + 24)
    u, v = torch.randn(4, 1), torch.randn(1, 16)
    m = u @ v  # a rank-one gradient: A stack and B stack
    y = torch.zeros(LAYOUT.dim)
    y[0:32], y[64:96] = m[:2].reshape(-1), m[2:].reshape(-1)
    y[32:64], y[96:128] = m.t()[:, :2].reshape(-1), m.t()[:, 2:].reshape(-1)
    y[LORA:] = 1.0
    sent = torch.zeros(LAYOUT.dim)
    for step in range(3):
        out = codec.decode(codec.encode(y))
        codec.observe(out)
        sent += out
        assert torch.allclose(sent + codec.error, (step + 1) * y, atol=1e-4)  # error feedback keeps the rest
    assert torch.allclose(out, y, atol=1e-4)  # rank one: the warm-started iteration has found it


def test_baselines_refuse_batches_and_unknown_kinds():
    with pytest.raises(ValueError, match="one message at a time"):
        TopKCodec(LAYOUT, 1 / 16).encode(torch.zeros(2, LAYOUT.dim))
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline("sketch", LAYOUT)
    assert make_baseline("powersgd", LAYOUT).stage1_history == []


def test_a_baseline_trains_in_dr_trainer_and_its_bytes_are_the_uplink(tmp_path):
    from conftest import dr_args, make_cls_dataset, make_tiny_bert

    from hf_drencoder import DRTrainer

    data = make_cls_dataset(n=32)
    peft_model = DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, max_steps=2), train_dataset=data).model
    baseline = make_baseline("top-k", peft_model, 1 / 16)
    t = DRTrainer(model=peft_model, args=dr_args(tmp_path, max_steps=2), train_dataset=data, codec=baseline)
    t.train()
    assert t.uplink_bytes == baseline.payload_bytes < 4 * t.layout.dim
    assert [h[2] for h in t.ledger.accountant.history] == [2]  # no stage-1 entry: the baseline uses no data
    fresh = DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, max_steps=1), train_dataset=data).model
    with pytest.raises(ValueError, match="fixed linear encoder"):
        DRTrainer(model=fresh, args=dr_args(tmp_path, max_steps=1, noise_space="latent"), train_dataset=data,
                  codec=make_baseline("top-k", fresh, 1 / 16)).train()
