"""Any model, any Trainer class, any script: architectures from transformers' mappings, make_private on
Seq2SeqTrainer and TRL's SFTTrainer, privacy settings from the environment, user-level (group) privacy."""

import dataclasses
import json
import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainingArguments

from conftest import dr_args, make_cls_dataset, make_lm_dataset, make_tiny_tokenizer
from hf_drencoder import DRTrainer, DRTrainingArguments, make_private
from hf_drencoder.losses import infer_task
from hf_drencoder.privacy import compute_epsilon

SMALL = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, vocab_size=128,
             max_position_embeddings=64)


def _config(model_type):
    from transformers import AutoConfig

    kw = dict(SMALL)
    if model_type == "gpt2":
        kw = dict(n_embd=32, n_head=2, n_layer=1, n_positions=64, vocab_size=128)
    elif model_type == "gpt_neo":
        kw = dict(hidden_size=32, num_heads=2, num_layers=1, attention_types=[[["global"], 1]], vocab_size=128,
                  max_position_embeddings=64)
    elif model_type == "opt":
        kw = dict(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, ffn_dim=64, vocab_size=128,
                  max_position_embeddings=64, word_embed_proj_dim=32)
    elif model_type == "distilbert":
        kw = dict(dim=32, n_heads=2, n_layers=1, hidden_dim=64, vocab_size=128, max_position_embeddings=64)
    elif model_type == "t5":
        kw = dict(d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2, vocab_size=128, decoder_start_token_id=0)
    elif model_type == "bart":
        kw = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64)
    elif model_type in ("llama", "mistral", "qwen2", "gemma", "phi"):
        kw.update(num_key_value_heads=2, head_dim=16) if model_type == "gemma" else kw.update(num_key_value_heads=2)
    for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout", "resid_pdrop",
              "embd_pdrop", "attn_pdrop", "dropout_rate", "activation_dropout", "attention_dropout"):
        kw[k] = 0.0
    return AutoConfig.for_model(model_type, **kw)


CAUSAL = ["gpt2", "gpt_neo", "opt", "llama", "mistral", "qwen2", "phi", "gemma"]
ENCODERS = ["bert", "roberta"]
SEQ2SEQ = ["t5", "bart"]


def _model(model_type):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    cfg = _config(model_type)
    if model_type in CAUSAL:
        return AutoModelForCausalLM.from_config(cfg)
    if model_type in SEQ2SEQ:
        return AutoModelForSeq2SeqLM.from_config(cfg)
    cfg.num_labels = 3
    return AutoModelForSequenceClassification.from_config(cfg)


def _seq2seq_dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, 128, (n, 10), generator=g)
    tgt = torch.randint(3, 128, (n, 6), generator=g)
    return Dataset.from_dict({"input_ids": src.tolist(), "attention_mask": [[1] * 10] * n, "labels": tgt.tolist()})


@pytest.mark.parametrize("model_type", CAUSAL + ENCODERS + SEQ2SEQ)
def test_every_representative_architecture_trains_with_peft_default_targets(tmp_path, model_type):
    model = _model(model_type)
    data = (make_lm_dataset(n=32, vary_length=False) if model_type in CAUSAL else
            _seq2seq_dataset() if model_type in SEQ2SEQ else make_cls_dataset(n=32))
    trainer = DRTrainer(model=model, args=dr_args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                        train_dataset=data)  # no peft_config: peft's defaults for the architecture
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.ledger.steps == 1 and trainer.privacy_report()["epsilon"] > 0
    assert any(not torch.equal(v, dict(trainer.model.named_parameters())[n]) for n, v in before.items())


def test_task_comes_from_transformers_mappings():
    assert infer_task(_model("gpt2")) == "causal_lm"  # GPT2LMHeadModel: no ForCausalLM suffix
    assert infer_task(_model("t5")) == "seq2seq_lm"
    assert infer_task(_model("bert")) == "sequence_classification"


def test_distilbert_has_no_peft_default_and_the_message_lists_its_layers(tmp_path):
    data = make_cls_dataset(n=32)
    with pytest.raises(ValueError, match="no default LoRA target modules.*Linear layers are: .*q_lin.*v_lin"):
        DRTrainer(model=_model("distilbert"), args=dr_args(tmp_path, max_steps=1), train_dataset=data)
    # the fix the message names works
    fixed = DRTrainer(model=_model("distilbert"), args=dr_args(tmp_path, max_steps=1,
                                                              default_lora_target_modules=["q_lin", "v_lin"]),
                      train_dataset=data)
    fixed.train()
    assert fixed.ledger.steps == 1


def test_an_architecture_without_peft_defaults_is_refused_with_a_fix_that_works(tmp_path, monkeypatch):
    from peft.utils import constants

    monkeypatch.delitem(constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "gpt2")
    data = make_lm_dataset(n=32, vary_length=False)
    with pytest.raises(ValueError, match="no default LoRA target modules.*peft_config=LoraConfig"):
        DRTrainer(model=_model("gpt2"), args=dr_args(tmp_path, max_steps=1), train_dataset=data)
    fixed = DRTrainer(model=_model("gpt2"), args=dr_args(tmp_path, max_steps=1), train_dataset=data,
                      peft_config=LoraConfig(r=2, target_modules=["c_attn"]))
    fixed.train()
    assert fixed.ledger.steps == 1


def test_a_plain_model_turned_into_lora_is_announced(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_drencoder"):
        DRTrainer(model=_model("llama"), args=dr_args(tmp_path, max_steps=1),
                  train_dataset=make_lm_dataset(n=32)).train()
    assert "not a PeftModel: training a LoRA adapter" in caplog.text and "instead of the full model" in caplog.text


# ---- privacy settings without editing the script ----

def _plain_args(tmp_path, **kw):
    return TrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=8, max_steps=2,
                             report_to="none", disable_tqdm=True, save_strategy="no", **kw)


def test_epsilon_from_the_environment_reaches_a_swap_in_script(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_DRENCODER_TARGET_EPSILON", "3")
    monkeypatch.setenv("HF_DRENCODER_ACCOUNTANT", "rdp")
    with caplog.at_level(logging.WARNING, logger="hf_drencoder"):
        trainer = DRTrainer(model=_model("llama"), args=_plain_args(tmp_path), train_dataset=make_lm_dataset())
        trainer.train()
    assert trainer.args.target_epsilon == 3.0 and trainer.args.accountant == "rdp"
    assert trainer.privacy_report()["epsilon"] <= 3.0 and trainer.privacy_report()["epsilon"] > 2.9
    line = next(r.getMessage() for r in caplog.records if "privacy in force" in r.getMessage())
    assert "From the environment: target_epsilon=3.0, accountant=rdp" in line


def test_a_config_file_and_the_alternative_of_epsilon(tmp_path, monkeypatch):
    cfg = tmp_path / "privacy.json"
    cfg.write_text(json.dumps({"noise_multiplier": 2.0, "per_sample_max_grad_norm": 0.5}))
    monkeypatch.setenv("HF_DRENCODER_CONFIG", str(cfg))
    args = DRTrainingArguments.from_training_arguments(_plain_args(tmp_path))
    # the environment chose noise_multiplier: the swap-in default target_epsilon is dropped, not a conflict
    assert (args.noise_multiplier, args.target_epsilon, args.per_sample_max_grad_norm) == (2.0, None, 0.5)


def test_unknown_and_contradicting_environment_settings_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DRENCODER_TARGET_EPSILOM", "3")
    with pytest.raises(ValueError, match="HF_DRENCODER_TARGET_EPSILOM is not a privacy setting"):
        DRTrainingArguments.from_training_arguments(_plain_args(tmp_path))
    monkeypatch.delenv("HF_DRENCODER_TARGET_EPSILOM")
    monkeypatch.setenv("HF_DRENCODER_PER_SAMPLE_MAX_GRAD_NORM", "0.5")
    with pytest.raises(ValueError, match="the script sets 2.0 and the environment"):
        DRTrainingArguments(output_dir=str(tmp_path), per_sample_max_grad_norm=2.0, target_epsilon=1.0, report_to="none")


def test_privacy_arguments_parse_next_to_a_scripts_own_lora_arguments():
    @dataclasses.dataclass
    class LoraArguments:  # what TRL's ModelConfig and many scripts define
        lora_r: int = 16
        lora_alpha: int = 32
        lora_dropout: float = 0.05
        lora_target_modules: list[str] | None = None

    parser = HfArgumentParser((LoraArguments, DRTrainingArguments))
    lora, args = parser.parse_args_into_dataclasses(
        ["--output_dir", "o", "--lora_alpha", "8", "--target_epsilon", "3", "--default_lora_r", "4", "--report_to", "none"])
    assert lora.lora_alpha == 8 and args.target_epsilon == 3.0 and args.default_lora_r == 4


# ---- other Trainer classes ----

def test_make_private_seq2seq_trainer_on_t5(tmp_path):
    DRSeq2Seq = make_private(Seq2SeqTrainer)
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2,
                                    report_to="none", disable_tqdm=True, save_strategy="no", learning_rate=1e-2)
    trainer = DRSeq2Seq(model=_model("t5"), args=args, train_dataset=_seq2seq_dataset())
    assert type(trainer.args).__name__ == "DRSeq2SeqTrainingArguments" and trainer.args.target_epsilon == 8.0
    trainer.train()
    report = trainer.privacy_report()
    assert report["steps"] == 2 and 0 < report["epsilon"] <= 8.0
    assert make_private(Seq2SeqTrainer) is DRSeq2Seq and make_private(DRSeq2Seq) is DRSeq2Seq


def test_a_subclass_compute_loss_is_refused_but_the_privatised_classs_own_is_not(tmp_path):
    class MyTrainer(Seq2SeqTrainer):  # a library's own compute_loss (as TRL's SFTTrainer has) is fine
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "o"), report_to="none", max_steps=1)
    make_private(MyTrainer)(model=_model("t5"), args=args, train_dataset=_seq2seq_dataset())

    class Mine(make_private(Seq2SeqTrainer)):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(ValueError, match="overrides compute_loss"):
        Mine(model=_model("t5"), args=args, train_dataset=_seq2seq_dataset())


@pytest.mark.parametrize("kind", ["text"])  # chat rows: TRL's own sft.py in test_trl.py
def test_trl_sft_trainer_made_private(tmp_path, kind):
    trl = pytest.importorskip("trl")
    g = torch.Generator().manual_seed(0)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (k,), generator=g))

    if kind == "text":
        data = Dataset.from_dict({"text": [words(8) for _ in range(32)]})
    else:
        data = Dataset.from_dict({"messages": [[{"role": "user", "content": words(4)},
                                                {"role": "assistant", "content": words(4)}] for _ in range(32)]})
    config = trl.SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2, report_to="none",
                           disable_tqdm=True, save_strategy="no", max_length=32, learning_rate=1e-2, use_cpu=True,
                           bf16=False)
    DRSFTTrainer = make_private(trl.SFTTrainer)
    model = _model("llama")
    model.config.pad_token_id = 0
    trainer = DRSFTTrainer(model=model, args=config, train_dataset=data, processing_class=make_tiny_tokenizer())
    assert isinstance(trainer.args, trl.SFTConfig) and trainer.args.gradient_checkpointing is False
    trainer.train()
    assert trainer.privacy_report()["steps"] == 2
    assert "epsilon" in trainer.state.log_history[-1]


def test_trl_packing_is_refused(tmp_path):
    trl = pytest.importorskip("trl")
    data = Dataset.from_dict({"text": [f"w{i} w{i + 1} w{i + 2}" for i in range(32)]})
    config = trl.SFTConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=1, report_to="none",
                           packing=True, max_length=16, gradient_checkpointing=False, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="packing"):
        make_private(trl.SFTTrainer)(model=_model("llama"), args=config, train_dataset=data,
                                     processing_class=make_tiny_tokenizer())


# ---- user-level privacy ----

def _grouped_dataset(groups=16, rows=(1, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = make_cls_dataset(n=200, seed=seed)
    users, picked = [], []
    for u in range(groups):
        k = int(torch.randint(rows[0], rows[1] + 1, (1,), generator=g))
        users += [f"user{u}"] * k
        picked += list(range(len(picked), len(picked) + k))
    return base.select(picked).add_column("user_id", users)


def test_group_privacy_trains_with_q_over_groups_and_names_the_unit(tmp_path):
    from conftest import make_tiny_bert

    data = _grouped_dataset()
    args = dr_args(tmp_path, privacy_unit="group", group_by_column="user_id", per_device_train_batch_size=4,
                   gradient_accumulation_steps=2, max_steps=3, max_physical_batch_size=3)
    trainer = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=data)
    per_unit = []
    start = trainer._start_mechanism

    def spy(step):
        start(step)
        add = trainer._mechanism.add_per_sample
        trainer._mechanism.add_per_sample = lambda grads: per_unit.append(grads[0].shape[0]) or add(grads)

    trainer._start_mechanism = spy
    rows, orig = [], trainer.per_sample_losses

    def counting(model, inputs):
        losses = orig(model, inputs)
        if torch.is_grad_enabled():
            rows.append(losses.shape[0])
        return losses

    trainer.per_sample_losses = counting
    trainer.train()
    report = trainer.privacy_report()
    assert report["privacy_unit"] == "group (user_id)" and report["delta"] == pytest.approx(1 / 16)
    assert trainer.ledger.accountant.history == [(1.0, 8 / 16, 3)]  # q = expected groups / groups
    assert report["epsilon_rdp"] == pytest.approx(compute_epsilon([(1.0, 0.5, 3)], 1 / 16, "rdp"))
    # the mechanism clipped one vector per group, never per row (groups have up to 6 rows, pieces 3)
    assert per_unit and max(rows) <= 3 and sum(per_unit) < sum(rows)
    with pytest.raises(ValueError, match="needs group_by_column"):
        dr_args(tmp_path, privacy_unit="group")
