"""DRTrainer end to end on tiny models: privacy behaviour, refusals, swap-in, resume, saving."""

import json
import logging
import math
import os

import pytest
import torch
from datasets import IterableDataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import HfArgumentParser, Trainer, TrainingArguments

from conftest import dr_args, make_cls_dataset, make_lm_dataset, make_tiny_bert, make_tiny_llama
from hf_drencoder import DRTrainer, DRTrainingArguments, PrivacyBudgetError
from hf_drencoder.privacy import compute_epsilon


def lora_values(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def capture_releases(trainer):
    released = []
    trainer.post_privacy_hooks.append(lambda grads: released.append([g.clone() for g in grads]) or grads)
    return released


def test_lora_weights_change_and_privacy_metrics_are_logged(tmp_path, tiny_llama, lm_dataset):
    trainer = DRTrainer(model=tiny_llama, args=dr_args(tmp_path, target_epsilon=4.0), train_dataset=lm_dataset)
    before = lora_values(trainer.model)
    trainer.train()
    after = lora_values(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    frozen = [p for n, p in trainer.model.named_parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for key in ("epsilon", "epsilon_rdp", "epsilon_prv", "mu_gdp", "noise_multiplier", "sample_rate", "privacy_steps"):
        assert key in logs[-1]
    assert [h["privacy_steps"] for h in logs] == [1, 2, 3, 4]
    # every logged epsilon is what the accountant gives for the steps taken so far
    sigma, q = trainer.ledger.noise_multiplier, 8 / 64
    for h in logs:
        assert h["epsilon_rdp"] == pytest.approx(compute_epsilon([(sigma, q, h["privacy_steps"])], 1 / 64, "rdp"))
    assert logs[-1]["epsilon"] == logs[-1]["epsilon_prv"] <= 4.0
    assert logs[-1]["epsilon"] >= 0.98 * 4.0 or trainer.ledger.noise_multiplier > 0


def test_noise_std_through_the_trainer_with_accumulation(tmp_path, lm_dataset):
    # Zero signal: LoRA A and B all zero give exactly zero per-sample gradients, and lr=0 keeps them zero.
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.zeros_(p)
    sigma, C = 2.0, 0.5
    args = dr_args(tmp_path, noise_multiplier=sigma, per_sample_max_grad_norm=C, learning_rate=0.0,
                   per_device_train_batch_size=8, gradient_accumulation_steps=2, max_steps=10, weight_decay=0.0)
    trainer = DRTrainer(model=model, args=args, train_dataset=lm_dataset)
    released = capture_releases(trainer)
    trainer.train()
    # one release (one Gaussian draw) per optimizer step, one composition each
    assert len(released) == 10
    assert trainer.ledger.accountant.history == [(sigma, 16 / 64, 10)]
    x = torch.cat([torch.cat([g.flatten() for g in r]) for r in released])
    expected = sigma * C / 16  # expected global batch = 8 x 2
    assert x.std().item() == pytest.approx(expected, rel=5 / math.sqrt(2 * x.numel()))


def test_every_released_step_is_bounded_by_clipping(tmp_path, tiny_llama, lm_dataset):
    # With little noise, a released step is at most (drawn examples) x C / B: clipping is what bounds it.
    C = 1e-3
    sigma = 1e-3  # noise norm sigma*C/B*sqrt(4096) = 0.064 C/B, against a bound of ~8 C/B
    args = dr_args(tmp_path, noise_multiplier=sigma, per_sample_max_grad_norm=C, max_steps=6, accountant="rdp")
    trainer = DRTrainer(model=tiny_llama, args=args, train_dataset=lm_dataset)
    drawn, orig = [], trainer.per_sample_losses

    def counting(model, inputs):
        losses = orig(model, inputs)
        if torch.is_grad_enabled():  # training forwards only, not the example-independence check before them
            drawn.append(losses.shape[0])
        return losses

    trainer.per_sample_losses = counting
    released = capture_releases(trainer)
    trainer.train()
    assert len(drawn) == len(released) == 6  # one micro-batch per step here, none empty at q = 1/8
    for b, r in zip(drawn, released):
        norm = math.sqrt(sum(float(g.pow(2).sum()) for g in r))
        noise = 5 * sigma * C / 8 * math.sqrt(sum(g.numel() for g in r))
        assert 0.5 * C / 8 < norm <= b * C / 8 + noise  # un-clipped LM gradients are orders larger


def test_logged_grad_norm_is_of_the_private_gradient(tmp_path, tiny_llama, lm_dataset):
    trainer = DRTrainer(model=tiny_llama, args=dr_args(tmp_path, noise_multiplier=3.0), train_dataset=lm_dataset)
    released = capture_releases(trainer)
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    private = [math.sqrt(sum(float(g.pow(2).sum()) for g in r)) for r in released]
    assert logged == pytest.approx(private, rel=1e-4)
    assert trainer.args.max_grad_norm == 0.0  # Trainer's batch clipping is off


def test_empty_poisson_batches_are_noise_only_steps(tmp_path, tiny_llama, lm_dataset):
    # q = 1/64: about 37% of the batches are empty
    args = dr_args(tmp_path, per_device_train_batch_size=1, max_steps=12)
    trainer = DRTrainer(model=tiny_llama, args=args, train_dataset=lm_dataset)
    sizes = []
    orig = trainer.per_sample_losses

    def counting(model, inputs):
        losses = orig(model, inputs)
        if torch.is_grad_enabled():  # training forwards only
            sizes.append(losses.shape[0])
        return losses

    trainer.per_sample_losses = counting
    released = capture_releases(trainer)
    trainer.train()
    assert len(sizes) < 12  # some steps had no example and ran no forward pass
    assert len(released) == 12 and trainer.ledger.steps == 12
    assert all(torch.cat([g.flatten() for g in r]).abs().sum() > 0 for r in released)  # noise even when empty


def test_disable_dp_is_a_baseline_through_the_same_path(tmp_path, tiny_llama, lm_dataset):
    args = dr_args(tmp_path, disable_dp=True)
    trainer = DRTrainer(model=tiny_llama, args=args, train_dataset=lm_dataset)
    before = lora_values(trainer.model)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in lora_values(trainer.model).items())
    assert trainer.privacy_report()["epsilon"] == math.inf
    assert trainer.privacy_report()["dp_enabled"] is False


def test_disable_dp_with_shuffled_batches_runs_epochs(tmp_path, tiny_llama, lm_dataset):
    args = dr_args(tmp_path, disable_dp=True, poisson_sampling=False, max_steps=-1, num_train_epochs=1)
    trainer = DRTrainer(model=tiny_llama, args=args, train_dataset=lm_dataset)
    trainer.train()
    assert trainer.state.global_step == 8  # 64 rows / batch 8, Trainer's own shuffled loader


def test_swap_in_with_plain_training_arguments_and_plain_model(tmp_path, lm_dataset, caplog):
    args = TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=8, max_steps=2,
                             report_to="none", disable_tqdm=True, save_strategy="no")
    with caplog.at_level(logging.WARNING, logger="hf_drencoder"):
        trainer = DRTrainer(model=make_tiny_llama(), args=args, train_dataset=lm_dataset)
        trainer.train()
    assert isinstance(trainer.model, PeftModel)
    assert isinstance(trainer.args, DRTrainingArguments) and trainer.args.target_epsilon == 8.0
    lines = [r.getMessage() for r in caplog.records if "plain TrainingArguments" in r.getMessage()]
    assert len(lines) == 1 and "target_epsilon=8.0" in lines[0] and "noise_multiplier=" in lines[0]
    report = trainer.privacy_report()
    assert report["delta"] == pytest.approx(1 / 64) and report["steps"] == 2 and report["epsilon"] <= 8.0
    assert report["privacy_unit"] == "example" and report["max_grad_norm"] == 1.0


def test_budget_stop_before_exceeding_target(tmp_path, tiny_llama, lm_dataset):
    # calibrated for 4 steps; resumed with a plan of 40 it must stop at 4
    args = dr_args(tmp_path, target_epsilon=3.0, max_steps=4, save_strategy="steps", save_steps=2)
    DRTrainer(model=tiny_llama, args=args, train_dataset=lm_dataset).train()
    args2 = dr_args(tmp_path, target_epsilon=3.0, max_steps=40, save_strategy="no")
    trainer = DRTrainer(model=make_tiny_llama(), args=args2, train_dataset=lm_dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert trainer.state.global_step == 4 and trainer.ledger.steps == 4
    assert trainer.privacy_report()["epsilon"] <= 3.0


def test_resume_reports_the_same_epsilon_as_an_uninterrupted_run(tmp_path, lm_dataset):
    full = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path / "a", target_epsilon=5.0, max_steps=6),
                     train_dataset=lm_dataset)
    full.train()
    args = dr_args(tmp_path / "b", target_epsilon=5.0, max_steps=6, save_strategy="steps", save_steps=3)
    first = DRTrainer(model=make_tiny_llama(), args=args, train_dataset=lm_dataset)
    first.train()
    ckpt = tmp_path / "b" / "out" / "checkpoint-3"
    state = json.loads((ckpt / "dr_privacy_state.json").read_text())
    assert state["ledger"]["accountant"]["history"][0][2] == 3
    resumed = DRTrainer(model=make_tiny_llama(), args=args, train_dataset=lm_dataset)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.ledger.steps == 6
    assert resumed.privacy_report()["epsilon"] == pytest.approx(full.privacy_report()["epsilon"], rel=1e-9)
    assert resumed.ledger.noise_multiplier == full.ledger.noise_multiplier


def test_resume_without_privacy_state_is_refused(tmp_path, lm_dataset):
    args = dr_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    DRTrainer(model=make_tiny_llama(), args=args, train_dataset=lm_dataset).train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    os.remove(ckpt / "dr_privacy_state.json")
    trainer = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, max_steps=4), train_dataset=lm_dataset)
    with pytest.raises(PrivacyBudgetError, match="under-report"):
        trainer.train(resume_from_checkpoint=str(ckpt))


# ---- refusals before any training ----


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_epsilon=1.0, noise_multiplier=1.0), "exactly one"),
        (dict(target_epsilon=None), "exactly one"),
        (dict(noise_multiplier=1.0, per_sample_max_grad_norm=0.0), "per_sample_max_grad_norm"),
        (dict(noise_multiplier=1.0, per_sample_max_grad_norm=-1.0), "per_sample_max_grad_norm"),
        (dict(noise_multiplier=1.0, accountant="moments"), "accountant"),
        (dict(noise_multiplier=1.0, clipping="global"), "clipping"),
        (dict(noise_multiplier=0.0), "noise_multiplier"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(noise_multiplier=1.0, poisson_sampling=False), "poisson_sampling"),
        (dict(noise_multiplier=1.0, target_delta=1.5), "target_delta"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DRTrainingArguments(output_dir=str(tmp_path), report_to="none", **kwargs)


def test_delta_above_one_over_n_is_refused(tmp_path, tiny_llama, lm_dataset):
    with pytest.raises(ValueError, match="1/N"):
        DRTrainer(model=tiny_llama, args=dr_args(tmp_path, target_delta=2 / 64), train_dataset=lm_dataset)


def test_trainable_non_adapter_weights_are_refused(tmp_path, lm_dataset):
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.base_model.model.model.embed_tokens.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="outside the LoRA adapter.*embed_tokens"):
        DRTrainer(model=model, args=dr_args(tmp_path), train_dataset=lm_dataset)


def test_expected_batch_larger_than_dataset_is_refused(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="larger than the dataset"):
        DRTrainer(model=tiny_llama, args=dr_args(tmp_path, per_device_train_batch_size=32,
                                                 gradient_accumulation_steps=4), train_dataset=make_lm_dataset(n=64))


def test_dataset_without_length_is_refused(tmp_path, tiny_llama, lm_dataset):
    stream = IterableDataset.from_generator(lambda: iter(lm_dataset))
    with pytest.raises(ValueError, match="no length"):
        DRTrainer(model=tiny_llama, args=dr_args(tmp_path), train_dataset=stream)


def test_unreachable_budget_is_refused_before_the_first_step(tmp_path, tiny_llama, lm_dataset):
    # a tiny delta keeps epsilon above 1e-9 for every sigma the calibration may try (<= 1e4)
    args = dr_args(tmp_path, target_epsilon=1e-9, target_delta=1e-12, accountant="rdp", per_device_train_batch_size=32,
                   max_steps=10_000)
    trainer = DRTrainer(model=tiny_llama, args=args, train_dataset=lm_dataset)
    before = lora_values(trainer.model)
    with pytest.raises(PrivacyBudgetError, match="cannot be reached"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[n], p) for n, p in lora_values(trainer.model).items())


def test_gradient_checkpointing_is_refused(tmp_path, tiny_llama, lm_dataset):
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        DRTrainer(model=tiny_llama, args=dr_args(tmp_path, gradient_checkpointing=True), train_dataset=lm_dataset)


def test_model_already_peft_plus_peft_config_is_refused(tmp_path, lm_dataset):
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not both"):
        DRTrainer(model=model, args=dr_args(tmp_path), train_dataset=lm_dataset,
                  peft_config=LoraConfig(r=4, target_modules=["q_proj"]))


# ---- Trainer behaviour kept ----


def test_classifier_head_trains_and_evaluate_predict_save_load_work(tmp_path):
    train, dev = make_cls_dataset(n=64, seed=0), make_cls_dataset(n=20, seed=1)
    trainer = DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, noise_multiplier=0.8),
                        train_dataset=train, eval_dataset=dev)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n and "classifier" in n for n in names)  # the head is clipped with the rest
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["epsilon"] == trainer.privacy_report()["epsilon"]
    pred = trainer.predict(dev)
    assert pred.predictions.shape == (20, 3)
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 4 and report["privacy_unit"] == "example"
    reloaded = PeftModel.from_pretrained(make_tiny_bert(), str(out)).eval()
    trainer.model.eval()
    batch = {k: torch.tensor(dev[k][:4]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trainer.model(**batch).logits)


def test_all_dr_fields_reach_the_command_line():
    parser = HfArgumentParser(DRTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses([
        "--output_dir", "x", "--target_epsilon", "3", "--target_delta", "1e-6", "--per_sample_max_grad_norm", "0.5",
        "--accountant", "rdp", "--clipping", "per_layer", "--noise_seed", "7", "--default_lora_r", "4",
        "--default_lora_target_modules", "q_proj", "v_proj", "--report_to", "none",
    ])
    assert (args.target_epsilon, args.target_delta, args.per_sample_max_grad_norm) == (3.0, 1e-6, 0.5)
    assert (args.accountant, args.clipping, args.noise_seed, args.default_lora_r) == ("rdp", "per_layer", 7, 4)
    assert args.default_lora_target_modules == ["q_proj", "v_proj"] and args.poisson_sampling is True
    help_text = parser.format_help()
    for name in ("--target_epsilon", "--noise_multiplier", "--disable_dp", "--poisson_sampling", "--accountant"):
        assert name in help_text
    assert "sensitivity" in help_text


def test_plain_trainer_and_dr_trainer_share_the_trainer_interface():
    assert issubclass(DRTrainer, Trainer)


def test_poisson_batches_do_not_follow_the_public_seed(tmp_path, lm_dataset):
    # seed/data_seed are saved with the run's arguments; under DP the batches must not be derivable from them
    def batches(noise_seed, seed=0):
        trainer = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, noise_seed=noise_seed, seed=seed),
                            train_dataset=lm_dataset)
        trainer._secret_sampling_seed = None
        return [b for b in trainer.get_train_dataloader().batch_sampler]

    assert batches(None) != batches(None)  # fresh entropy each run, same public seed
    assert batches(5) == batches(5, seed=1)  # noise_seed (tests only) makes them reproducible, seed does not matter
    plain = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, disable_dp=True, seed=4), train_dataset=lm_dataset)
    assert plain._sampling_seed() == 4  # without DP the usual seeds apply
