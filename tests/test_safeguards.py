"""Paths that used to train and under-report epsilon (or silently go wrong): each ends in correct accounting
or a refusal before any private data is touched."""

import logging
import math
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import TrainerCallback

from conftest import dr_args, make_lm_dataset, make_tiny_bert, make_tiny_llama
from hf_drencoder import DRTrainer, DRTrainingArguments, PrivacyBudgetError
from hf_drencoder.privacy import calibrate_noise_multiplier, compute_epsilon, gdp_mu
from hf_drencoder.safeguards import dataset_fingerprint, noise_to_signal_ratio, split_rows

Q = 8 / 64


def _lora_model(seed=0):
    return get_peft_model(make_tiny_llama(seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def _adapter(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- a trained adapter carries its history ----

def test_a_second_train_of_the_same_trainer_counts_both_runs(tmp_path, lm_dataset):
    trainer = DRTrainer(model=_lora_model(), args=dr_args(tmp_path), train_dataset=lm_dataset)
    trainer.train()
    first = trainer.privacy_report()["epsilon_rdp"]
    trainer.train()
    report = trainer.privacy_report()
    # the adapter behind the report has had 8 releases: the epsilon is that of 8, not of the last 4
    assert sum(t for _, _, t in report["history"]) == 8
    assert report["epsilon_rdp"] == pytest.approx(compute_epsilon([(1.0, Q, 8)], 1 / 64, "rdp"))
    assert report["epsilon_rdp"] > first


def test_an_adapter_trained_elsewhere_needs_its_history_or_an_explicit_fresh_start(tmp_path, lm_dataset):
    trainer = DRTrainer(model=_lora_model(), args=dr_args(tmp_path / "a"), train_dataset=lm_dataset)
    trainer.train()
    saved = str(tmp_path / "saved")
    trainer.save_model(saved)
    assert os.path.isfile(os.path.join(saved, "privacy_report.json"))

    def reloaded():
        return PeftModel.from_pretrained(make_tiny_llama(), saved, is_trainable=True)

    again = DRTrainer(model=reloaded(), args=dr_args(tmp_path / "b"), train_dataset=lm_dataset)
    with pytest.raises(PrivacyBudgetError, match="prior_privacy_report.*assume_fresh_adapter"):
        again.train()
    assert again.ledger.steps == 0  # refused before any step

    # way out 1: the saved report's releases are added
    carried = DRTrainer(model=reloaded(), args=dr_args(tmp_path / "c", prior_privacy_report=saved),
                        train_dataset=lm_dataset)
    carried.train()
    report = carried.privacy_report()
    assert sum(t for _, _, t in report["history"]) == 8 and report["steps"] == 4
    assert report["epsilon_rdp"] == pytest.approx(compute_epsilon([(1.0, Q, 8)], 1 / 64, "rdp"))

    # way out 2: an explicit fresh start
    fresh = DRTrainer(model=reloaded(), args=dr_args(tmp_path / "d", assume_fresh_adapter=True), train_dataset=lm_dataset)
    fresh.train()
    assert sum(t for _, _, t in fresh.privacy_report()["history"]) == 4


def test_a_checkpoint_can_serve_as_the_prior_report(tmp_path, lm_dataset):
    args = dr_args(tmp_path / "a", save_strategy="steps", save_steps=2)
    trainer = DRTrainer(model=_lora_model(), args=args, train_dataset=lm_dataset)
    trainer.train()
    ckpt = str(tmp_path / "a" / "out" / "checkpoint-2")
    model = PeftModel.from_pretrained(make_tiny_llama(), ckpt, is_trainable=True)
    carried = DRTrainer(model=model, args=dr_args(tmp_path / "b", prior_privacy_report=ckpt), train_dataset=lm_dataset)
    carried.train()
    assert sum(t for _, _, t in carried.privacy_report()["history"]) == 2 + 4


# ---- memory: no replays, a physical cap instead ----

def test_auto_find_batch_size_is_refused(tmp_path, lm_dataset):
    with pytest.raises(ValueError, match="auto_find_batch_size.*max_physical_batch_size"):
        DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, auto_find_batch_size=True), train_dataset=lm_dataset)


def test_max_physical_batch_size_splits_a_draw_without_changing_the_release(tmp_path, lm_dataset):
    def run(cap, folder):
        args = dr_args(tmp_path / folder, max_steps=3, noise_multiplier=1e-3, per_device_train_batch_size=16,
                       max_physical_batch_size=cap)
        trainer = DRTrainer(model=_lora_model(), args=args, train_dataset=lm_dataset)
        sizes, orig = [], trainer.per_sample_losses

        def counting(model, inputs):
            losses = orig(model, inputs)
            if torch.is_grad_enabled():  # training passes only, not the example-independence check
                sizes.append(losses.shape[0])
            return losses

        trainer.per_sample_losses = counting
        released = []
        trainer.post_privacy_hooks.append(lambda g: released.append(torch.cat([t.flatten() for t in g])) or g)
        trainer.train()
        return sizes, torch.stack(released)

    big_sizes, big = run(None, "a")
    small_sizes, small = run(3, "b")
    assert max(big_sizes) > 3 and max(small_sizes) <= 3 and sum(small_sizes) == sum(big_sizes)
    torch.testing.assert_close(small, big, rtol=1e-4, atol=1e-7)


def test_split_rows_refuses_what_it_cannot_cut():
    batch = {"input_ids": torch.zeros(5, 3), "labels": torch.zeros(5, 3)}
    assert [p["input_ids"].shape[0] for p in split_rows(batch, 2)] == [2, 2, 1]
    with pytest.raises(ValueError, match="first dimension"):
        split_rows({"input_ids": torch.zeros(5, 3), "extra": torch.zeros(2)}, 2)


# ---- only upper bounds calibrate; GDP is information ----

def test_gdp_cannot_calibrate_stop_or_headline():
    with pytest.raises(ValueError, match="not an upper bound"):
        DRTrainingArguments(output_dir="x", accountant="gdp", target_epsilon=1.0, report_to="none")
    with pytest.raises(ValueError, match="not an upper bound"):
        calibrate_noise_multiplier(1.0, 1e-5, 0.01, 10, "gdp")
    # what it would have picked really costs several times the target (the reason for the refusal)
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=10, accountant="gdp")
    assert compute_epsilon([(sigma, 0.01, 10)], 1e-5, "prv") > 3.0


def test_gdp_is_computed_with_opacus():
    from opacus.accountants.analysis.gdp import compute_mu_poisson

    assert gdp_mu([(1.0, 0.01, 1000)]) == pytest.approx(compute_mu_poisson(steps=1000, noise_multiplier=1.0, sample_rate=0.01))


def test_prv_is_bounded_in_memory_and_falls_back_to_rdp():
    # this history made PRV allocate more than 20 GB; the answer must be a valid upper bound, quickly
    h = [(0.5, 1.0, 10_000)]
    eps = compute_epsilon(h, 1e-5, "prv")
    assert math.isfinite(eps) and eps == compute_epsilon(h, 1e-5, "rdp")


# ---- nothing acts on a raw gradient ----

def test_a_hook_that_steps_inside_backward_is_refused_before_any_update(tmp_path, lm_dataset):
    model = _lora_model()
    args = dr_args(tmp_path, learning_rate=0.0, noise_multiplier=1e6)
    trainer = DRTrainer(model=model, args=args, train_dataset=lm_dataset)
    params = [p for p in model.parameters() if p.requires_grad]
    def step_in_backward(p):  # what a layer-wise optimizer does: update on the raw gradient
        p.data.add_(p.grad, alpha=-1.0)

    params[0].register_post_accumulate_grad_hook(step_in_backward)
    before = _adapter(model)
    with pytest.raises(ValueError, match="gradient hooks"):
        trainer.train()
    after = _adapter(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_layerwise_optimizers_are_refused(tmp_path, lm_dataset):
    with pytest.raises(ValueError, match="inside backward"):
        DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, optim="lomo"), train_dataset=lm_dataset)


def test_data_dependent_lora_init_is_refused(tmp_path, lm_dataset):
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    model.peft_config["default"].init_lora_weights = "eva"  # what a user of EVA initialisation would have set
    with pytest.raises(ValueError, match="initialises from the training data"):
        DRTrainer(model=model, args=dr_args(tmp_path), train_dataset=lm_dataset)


# ---- data parallel: the same rows everywhere (the 2-process run is in test_distributed.py) ----

def test_dataset_fingerprint_sees_order_and_content():
    data = make_lm_dataset(n=64)
    assert dataset_fingerprint(data) == dataset_fingerprint(make_lm_dataset(n=64))
    assert dataset_fingerprint(data) != dataset_fingerprint(data.shuffle(seed=1))
    assert dataset_fingerprint(data) != dataset_fingerprint(make_lm_dataset(n=64, seed=1))


# ---- silent failures ----

def test_tiny_per_device_batches_with_large_accumulation_train(tmp_path, lm_dataset):
    # per-device batch 1 x 8 micro-batches: most micro-batches are empty Poisson shares, each a valid no-op
    args = dr_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=8, max_steps=6)
    trainer = DRTrainer(model=_lora_model(), args=args, train_dataset=lm_dataset)
    before = _adapter(trainer.model)
    trainer.train()
    assert trainer.ledger.steps == 6 and trainer.ledger.accountant.history == [(1.0, Q, 6)]
    assert any(not torch.equal(v, _adapter(trainer.model)[n]) for n, v in before.items())


def test_a_non_finite_loss_stops_with_the_step(tmp_path, lm_dataset):
    trainer = DRTrainer(model=_lora_model(), args=dr_args(tmp_path), train_dataset=lm_dataset)
    orig, calls = trainer.per_sample_losses, []

    def poisoned(model, inputs):
        losses = orig(model, inputs)
        if not torch.is_grad_enabled():  # the example-independence check before training
            return losses
        calls.append(1)
        return losses * float("nan") if len(calls) == 2 else losses

    trainer.per_sample_losses = poisoned
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_a_non_finite_adapter_stops_training(tmp_path, lm_dataset):
    class Corrupt(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step == 2:
                next(p for p in model.parameters() if p.requires_grad).data.fill_(float("inf"))

    trainer = DRTrainer(model=_lora_model(), args=dr_args(tmp_path), train_dataset=lm_dataset, callbacks=[Corrupt()])
    with pytest.raises(FloatingPointError, match="not finite after step 2"):
        trainer.train()


@pytest.mark.parametrize("change", [{"noise_multiplier": 2.0}, {"per_sample_max_grad_norm": 0.5},
                                    {"per_device_train_batch_size": 4}])
def test_resuming_with_another_mechanism_is_refused(tmp_path, lm_dataset, change):
    args = dr_args(tmp_path, save_strategy="steps", save_steps=2)
    DRTrainer(model=_lora_model(), args=args, train_dataset=lm_dataset).train()
    ckpt = str(tmp_path / "out" / "checkpoint-2")
    resumed = DRTrainer(model=_lora_model(), args=dr_args(tmp_path, **change), train_dataset=lm_dataset)
    with pytest.raises(PrivacyBudgetError, match="another mechanism"):
        resumed.train(resume_from_checkpoint=ckpt)
    # the same settings resume fine
    same = DRTrainer(model=_lora_model(), args=dr_args(tmp_path), train_dataset=lm_dataset)
    same.train(resume_from_checkpoint=ckpt)
    assert same.ledger.accountant.history == [(1.0, Q, 4)]


def test_a_resume_with_a_new_dataset_size_is_refused(tmp_path):
    args = dr_args(tmp_path, save_strategy="steps", save_steps=2)
    DRTrainer(model=_lora_model(), args=args, train_dataset=make_lm_dataset(n=64)).train()
    resumed = DRTrainer(model=_lora_model(), args=dr_args(tmp_path, target_delta=1e-3),
                        train_dataset=make_lm_dataset(n=128))
    with pytest.raises(PrivacyBudgetError, match="sample rate"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_custom_losses_that_the_private_step_would_ignore_are_refused(tmp_path, lm_dataset):
    with pytest.raises(ValueError, match="compute_loss_func.*per_sample_losses"):
        DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path), train_dataset=lm_dataset,
                  compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss)

    class MyTrainer(DRTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(ValueError, match="overrides compute_loss.*per_sample_losses"):
        MyTrainer(model=make_tiny_llama(), args=dr_args(tmp_path), train_dataset=lm_dataset)


def test_the_noise_seed_never_reaches_saved_arguments(tmp_path, lm_dataset):
    args = dr_args(tmp_path, noise_seed=1234, save_strategy="steps", save_steps=2)
    trainer = DRTrainer(model=_lora_model(), args=args, train_dataset=lm_dataset)
    assert args.noise_seed == 1234  # the caller's object is left alone
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    for folder in (tmp_path / "out" / "checkpoint-2", tmp_path / "saved"):
        saved = torch.load(folder / "training_args.bin", weights_only=False)
        assert saved.noise_seed is None and "1234" not in saved.to_json_string()
    assert trainer.privacy_report()["noise_seeded"] is True


def test_push_to_hub_of_a_seeded_run_is_refused(tmp_path, lm_dataset):
    trainer = DRTrainer(model=_lora_model(), args=dr_args(tmp_path, max_steps=1), train_dataset=lm_dataset)
    trainer.train()
    with pytest.raises(PrivacyBudgetError, match="noise_seed.*allow_seeded_noise"):
        trainer.push_to_hub()
    with pytest.raises(ValueError, match="push_to_hub=True with a fixed noise_seed"):
        DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, push_to_hub=True, hub_model_id="alice/x"),
                  train_dataset=lm_dataset)


def test_zero_planned_steps_are_refused(tmp_path, lm_dataset):
    trainer = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, max_steps=-1, num_train_epochs=0),
                        train_dataset=lm_dataset)
    with pytest.raises(ValueError, match="0 optimizer steps planned"):
        trainer.train()


def test_hopeless_noise_is_announced(tmp_path, lm_dataset, caplog):
    args = dr_args(tmp_path, max_steps=2, target_epsilon=1e-3, noise_multiplier=None, accountant="rdp")
    trainer = DRTrainer(model=make_tiny_llama(), args=args, train_dataset=lm_dataset)
    with caplog.at_level(logging.WARNING, logger="hf_drencoder.trainer"):
        trainer.train()
    assert "noise will bury the signal" in caplog.text
    ratio = noise_to_signal_ratio(trainer.ledger.noise_multiplier, trainer.layout.dim, 8, 2)
    assert ratio > 5
    caplog.clear()
    ok = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path / "ok", target_epsilon=8.0, noise_multiplier=None),
                   train_dataset=lm_dataset)
    with caplog.at_level(logging.WARNING, logger="hf_drencoder.trainer"):
        ok.train()
    assert "noise will bury" not in caplog.text


def test_bert_classification_still_trains_with_every_guard(tmp_path, cls_dataset):
    trainer = DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, max_physical_batch_size=4),
                        train_dataset=cls_dataset)
    trainer.train()
    assert trainer.ledger.steps == 4
