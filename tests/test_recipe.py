"""The DP recipe: batch, steps, learning rate and noise chosen together for a privacy and a compute budget."""

import functools

import pytest

from hf_drencoder import DRTrainingArguments
from hf_drencoder.privacy import compute_epsilon
from hf_drencoder.recipe import RECIPE_MIN_STEPS, suggest_hyperparameters

R8 = 5485


@functools.cache
def recipe(n, eps, budget=None, accountant="prv"):
    # each calibration runs a few seconds of accounting: share them between tests
    return suggest_hyperparameters(n, eps, example_budget=budget, accountant=accountant)


def history(hp, n):
    return [(hp["noise_multiplier"], hp["per_device_train_batch_size"] / n, hp["max_steps"])]


@pytest.mark.parametrize("n, eps, budget", [(R8, 8.0, None), (R8, 1.0, None), (1000, 8.0, 2000), (100, 2.0, None),
                                            (R8, 8.0, 7)])
def test_budget_and_epsilon_are_respected(n, eps, budget):
    hp = recipe(n, eps, budget)
    batch, steps = hp["per_device_train_batch_size"], hp["max_steps"]
    assert batch * steps <= (4 * n if budget is None else budget)
    assert 1 <= batch <= n and steps >= 1
    assert compute_epsilon(history(hp, n), 1 / n, "prv") <= eps
    # the calibration is tight from below: 5% less noise would overspend
    tighter = [(hp["noise_multiplier"] * 0.95, batch / n, steps)]
    assert compute_epsilon(tighter, 1 / n, "prv") > eps


def test_r8_gets_the_measured_recipe():
    hp = recipe(R8, 8.0)
    # the split measured best on R8 (docs/utility.md): 80 steps of 272, 21,760 examples
    assert hp["per_device_train_batch_size"] == 272 and hp["max_steps"] == 80
    assert hp["learning_rate"] == pytest.approx(2e-2) and hp["lr_scheduler_type"] == "constant"
    assert hp["warmup_steps"] == 0 and hp["weight_decay"] == 0.0 and hp["gradient_accumulation_steps"] == 1
    assert hp["max_physical_batch_size"] == 256 and hp["accountant"] == "prv"
    assert 0.55 < hp["noise_multiplier"] < 0.65
    assert "target_delta" not in hp  # the trainer's own default, 1/N


def test_the_demo_is_the_recipe_with_ffa_lora():
    from hf_drencoder.demo import DEMO_DEFAULTS

    hp = recipe(R8, 8.0)
    for key in ("per_device_train_batch_size", "max_steps", "max_physical_batch_size", "lr_scheduler_type",
                "warmup_steps", "weight_decay"):
        assert DEMO_DEFAULTS[key] == hp[key], key
    assert DEMO_DEFAULTS["lora_freeze_a"] is True and DEMO_DEFAULTS["target_epsilon"] == 8.0


def test_result_builds_training_arguments(tmp_path):
    hp = suggest_hyperparameters(R8, 8.0, delta=1 / R8)
    args = DRTrainingArguments(output_dir=str(tmp_path), **hp)
    assert args.noise_multiplier == hp["noise_multiplier"] and args.target_epsilon is None
    assert args.target_delta == 1 / R8 and args.lr_scheduler_type.value == "constant"
    assert args.max_steps == hp["max_steps"] and args.max_physical_batch_size == hp["max_physical_batch_size"]
    # an explicit delta equal to the trainer's default (1/N) is the same calibration as no delta
    assert {k: v for k, v in hp.items() if k != "target_delta"} == recipe(R8, 8.0)


def test_more_epsilon_means_less_noise_and_the_same_schedule():
    rows = [recipe(R8, eps) for eps in (1.0, 4.0, 8.0)]
    sigmas = [r["noise_multiplier"] for r in rows]
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == len(sigmas)
    for key in ("per_device_train_batch_size", "max_steps", "learning_rate"):
        assert len({r[key] for r in rows}) == 1, key


def test_a_larger_compute_budget_never_shrinks_the_batch_the_steps_or_the_rate():
    # batch, steps and rate do not depend on the accountant: the fast one keeps this test short
    budgets = [200, 5_000, 20_000, 40_000, 120_000, 200_000]
    rows = [recipe(R8, 8.0, b, "rdp") for b in budgets]
    for key in ("per_device_train_batch_size", "learning_rate"):
        values = [r[key] for r in rows]
        assert values == sorted(values), key
    steps = [r["max_steps"] for r in rows]
    assert all(s >= RECIPE_MIN_STEPS for s in steps)
    # once the batch hits its cap (q <= 1/4) more budget buys more steps
    capped = [r for r in rows if r["per_device_train_batch_size"] == rows[-1]["per_device_train_batch_size"]]
    assert rows[-1]["per_device_train_batch_size"] <= R8 / 4 and len(capped) >= 2
    assert [r["max_steps"] for r in capped] == sorted(r["max_steps"] for r in capped)
    # at a fixed number of epochs, the noise on the mean gradient falls as the data grows
    per_example_noise = [(lambda h: h["noise_multiplier"] / h["per_device_train_batch_size"])(
        recipe(n, 8.0, None, "rdp")) for n in (1_000, 5_000, 20_000)]
    assert per_example_noise == sorted(per_example_noise, reverse=True)


def test_physical_batch_bounds_memory_not_the_batch():
    for n in (50, 5_000, 20_000):
        hp = recipe(n, 8.0, None, "rdp")
        assert hp["max_physical_batch_size"] == min(256, hp["per_device_train_batch_size"])


def test_refusals():
    with pytest.raises(ValueError, match="gdp"):
        suggest_hyperparameters(R8, 8.0, accountant="gdp")
    with pytest.raises(ValueError, match="n_examples"):
        suggest_hyperparameters(0, 8.0)
    with pytest.raises(ValueError, match="example_budget"):
        suggest_hyperparameters(R8, 8.0, example_budget=0)
    with pytest.raises(ValueError, match="delta"):
        suggest_hyperparameters(R8, 8.0, delta=1.5)


def test_the_other_accountants_calibrate_their_own_sigma():
    hp = recipe(R8, 8.0, None, "rdp")
    assert hp["accountant"] == "rdp"
    assert compute_epsilon(history(hp, R8), 1 / R8, "rdp") <= 8.0
    # RDP is looser than PRV, so it asks for more noise for the same budget
    assert hp["noise_multiplier"] > recipe(R8, 8.0)["noise_multiplier"]
