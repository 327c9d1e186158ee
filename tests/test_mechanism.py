"""Clipping bounds, noise scale and per-sample gradients, measured numerically."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from hf_drencoder.losses import per_sample_losses
from hf_drencoder.privacy import (
    EMPTY_BATCH_KEY,
    EmptyBatchCollator,
    GaussianGradientMechanism,
    PoissonBatchSampler,
    PrivacyBudgetError,
    clip_and_sum,
    per_sample_norms,
)
from hf_drencoder.privacy.ledger import PrivacyLedger


@pytest.mark.parametrize("mode", ["flat", "per_layer", "automatic"])
def test_every_clipped_contribution_has_norm_at_most_C(mode):
    torch.manual_seed(0)
    C = 0.7
    grads = [torch.randn(32, 5, 7) * 10, torch.randn(32, 3) * 0.01, torch.randn(32, 4, 4) * 3]
    # clip each example alone: its clipped contribution is the "sum" over a batch of one
    for i in range(32):
        one = [g[i : i + 1] for g in grads]
        sums, _ = clip_and_sum(one, C, mode)
        assert per_sample_norms([s.unsqueeze(0) for s in sums]).item() <= C * (1 + 1e-5)
    # small examples are left alone under flat clipping
    small = [g[:4] * 1e-4 for g in grads]
    sums, _ = clip_and_sum(small, C, "flat")
    for s, g in zip(sums, small):
        torch.testing.assert_close(s, g.sum(0))


def test_clip_and_sum_rejects_unknown_mode_and_empty():
    with pytest.raises(ValueError, match="unknown clipping"):
        clip_and_sum([torch.zeros(2, 3)], 1.0, "global")
    with pytest.raises(ValueError, match="no per-sample"):
        clip_and_sum([], 1.0)


def test_noise_std_on_zero_signal_is_sigma_C_over_B():
    # Many zero-signal releases: the empirical std of the output must be sigma * C / B.
    sigma, C, B = 1.3, 0.5, 16
    p = torch.nn.Parameter(torch.zeros(64, 64))
    mech = GaussianGradientMechanism([p], max_grad_norm=C, noise_multiplier=sigma, expected_batch_size=B, noise_seed=1)
    draws = []
    for _ in range(50):
        mech.add_per_sample([torch.zeros(B, 64, 64)])
        draws.append(mech.release()[0])
    x = torch.stack(draws)
    n = x.numel()  # 204800 draws: the std estimate has relative s.e. 1/sqrt(2n) = 0.16%
    expected = sigma * C / B
    assert x.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * n))
    assert abs(x.mean().item()) < 5 * expected / math.sqrt(n)


def test_noise_only_release_for_empty_step_and_no_noise_when_disabled():
    p = torch.nn.Parameter(torch.zeros(1000))
    mech = GaussianGradientMechanism([p], max_grad_norm=1.0, noise_multiplier=2.0, expected_batch_size=4, noise_seed=0)
    out = mech.release()[0]  # nothing added this step
    assert out.std().item() == pytest.approx(2.0 / 4, rel=0.1)
    off = GaussianGradientMechanism([p], max_grad_norm=math.inf, noise_multiplier=0.0, expected_batch_size=4)
    off.add_summed([torch.ones(1000)])
    torch.testing.assert_close(off.release()[0], torch.full((1000,), 0.25))
    with pytest.raises(RuntimeError, match="only allowed when DP is disabled"):
        mech.add_summed([torch.ones(1000)])


def test_seeded_noise_is_reproducible_and_unseeded_is_not():
    p = torch.nn.Parameter(torch.zeros(100))
    a = GaussianGradientMechanism([p], 1.0, 1.0, 1, noise_seed=5).release()[0]
    b = GaussianGradientMechanism([p], 1.0, 1.0, 1, noise_seed=5).release()[0]
    c = GaussianGradientMechanism([p], 1.0, 1.0, 1).release()[0]
    d = GaussianGradientMechanism([p], 1.0, 1.0, 1).release()[0]
    torch.testing.assert_close(a, b)
    assert not torch.equal(c, d)


def test_poisson_sampler_rate_and_independence():
    s = PoissonBatchSampler(num_samples=1000, sample_rate=0.05, steps_per_epoch=200, micro_batches=2, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 400
    sizes = torch.tensor([len(batches[2 * i]) + len(batches[2 * i + 1]) for i in range(200)], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(50, rel=0.05)  # s.e. of the mean ~ 0.5
    assert sizes.var().item() == pytest.approx(1000 * 0.05 * 0.95, rel=0.3)  # binomial, not fixed size
    s.set_epoch(1)
    assert list(s) != batches  # fresh draws each epoch
    s.set_epoch(0)
    assert list(s) == batches  # replayable for resume


def test_empty_batch_collator_marks_empty_batches():
    collate = EmptyBatchCollator(lambda f: {"x": torch.tensor(f)})
    assert EMPTY_BATCH_KEY in collate([])
    assert collate([1, 2])["x"].tolist() == [1, 2]


def test_ledger_refuses_a_step_beyond_the_budget():
    ledger = PrivacyLedger(delta=1e-3, sample_rate=0.5, max_grad_norm=1.0, accountant_name="rdp", target_epsilon=2.0)
    ledger.calibrate(planned_steps=5)
    for _ in range(ledger.max_total_steps):
        ledger.record_step()
    assert ledger.accountant.epsilon() <= 2.0
    with pytest.raises(PrivacyBudgetError, match="exceed"):
        ledger.record_step()


def _lora_llama(seed):
    from conftest import make_tiny_llama

    model = make_tiny_llama(seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def _lora_bert(seed):
    from conftest import make_tiny_bert

    model = make_tiny_bert(seed)
    torch.manual_seed(seed + 1)
    cfg = LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights=False)
    return get_peft_model(model, cfg)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_per_sample_gradients_equal_one_example_at_a_time(arch):
    from opacus.grad_sample import GradSampleHooks

    from conftest import make_cls_dataset, make_lm_dataset

    if arch == "llama":
        model, task = _lora_llama(0), "causal_lm"
        ds = make_lm_dataset(n=6, vary_length=True)
    else:
        model, task = _lora_bert(0), "sequence_classification"
        ds = make_cls_dataset(n=6)
    model.train()
    batch = {k: torch.tensor(ds[k]) for k in ds.column_names}
    params = [p for p in model.parameters() if p.requires_grad]
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    labels = batch.pop("labels")
    per_sample_losses(model(**batch).logits, labels, task).sum().backward()
    samples = [p.grad_sample.clone() for p in params]
    hooks.cleanup()
    for p in params:
        p.grad_sample, p.grad = None, None
    for i in range(6):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        model.zero_grad()
        per_sample_losses(model(**one).logits, labels[i : i + 1], task).sum().backward()
        for p, s in zip(params, samples):
            torch.testing.assert_close(s[i], p.grad, rtol=1e-4, atol=1e-6)
    # the clipped sum equals the sum of individually clipped reference gradients
    C = 0.5 * per_sample_norms(samples).median().item()
    sums, _ = clip_and_sum(samples, C)
    ref = [torch.zeros_like(p) for p in params]
    for i in range(6):
        g = [s[i] for s in samples]
        norm = math.sqrt(sum(float(x.pow(2).sum()) for x in g))
        for r, x in zip(ref, g):
            r += x * min(1.0, C / (norm + 1e-6))
    for s, r in zip(sums, ref):
        torch.testing.assert_close(s, r, rtol=1e-4, atol=1e-6)


def test_only_the_noise_drawing_process_adds_noise_and_the_sum_is_reduced_before_dividing():
    p = torch.nn.Parameter(torch.zeros(2000))
    quiet = GaussianGradientMechanism([p], 1.0, 3.0, 4, noise_seed=1, draws_noise=False)
    quiet.add_per_sample([torch.full((2, 2000), 0.01)])
    torch.testing.assert_close(quiet.release()[0], torch.full((2000,), 0.02 / 4))  # clipped sum / B, no noise
    loud = GaussianGradientMechanism([p], 1.0, 3.0, 4, noise_seed=1)
    seen = []
    out = loud.release(all_reduce=lambda ts: seen.append([t.clone() for t in ts]) or [t * 2 for t in ts])[0]
    assert seen[0][0].std().item() == pytest.approx(3.0, rel=0.05)  # the noise is in what is reduced
    torch.testing.assert_close(out, seen[0][0] * 2 / 4)
