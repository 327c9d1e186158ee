"""Examples that interact in the forward pass are refused: per-example clipping bounds the sensitivity by C only if
one example's loss does not depend on the others in its batch."""

from types import SimpleNamespace

import pytest
import torch
from conftest import dr_args, make_cls_dataset, make_lm_dataset, make_tiny_bert, make_tiny_llama
from datasets import Dataset

from hf_drencoder import DRTrainer
from hf_drencoder.losses import per_sample_losses
from hf_drencoder.privacy.clipping import clip_and_sum
from hf_drencoder.privacy.coupling import (
    RTOL,
    ExampleCouplingError,
    check_example_independence,
    collator_problems,
    coupling_layer_problems,
    packed_batch_problems,
    probe_rows,
)


def make_tokenizer(padding_side="right"):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(128)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="t1")), pad_token="t0", unk_token="t1"
    )
    tok.padding_side = padding_side
    return tok


def make_tiny_gpt_neo(seed=0, cls=False):
    """Absolute (learned) position embeddings."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, GPTNeoForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPTNeoConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, intermediate_size=128, max_position_embeddings=64, embed_dropout=0.0, attention_dropout=0.0,
        resid_dropout=0.0, bos_token_id=2, eos_token_id=2, pad_token_id=0, num_labels=3,
    )
    return (GPTNeoForSequenceClassification if cls else GPTNeoForCausalLM)(cfg)


def make_tiny_llama_cls(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, num_labels=3,
    )
    return LlamaForSequenceClassification(cfg)


def unpadded_lm_rows(n=32, seed=0, lo=4, hi=16, vocab=128):
    """Rows of different lengths, not padded: the collator pads each batch to its longest row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]})


def unpadded_cls_rows(n=32, seed=0):
    ds = unpadded_lm_rows(n, seed, vocab=100)
    g = torch.Generator().manual_seed(seed + 1)
    return ds.add_column("labels", torch.randint(0, 3, (n,), generator=g).tolist())


def lm_collator(side):
    from transformers import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(make_tokenizer(side), mlm=False)


def cls_collator(side):
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(make_tokenizer(side))


def bert_with_batchnorm():
    model = make_tiny_bert()
    model.bert.pooler.activation = torch.nn.Sequential(torch.nn.BatchNorm1d(32), torch.nn.Tanh())
    return model


# ---- layers ----


def test_batchnorm_mixes_examples_in_train_mode():
    """Why it is refused: in train mode one example's output moves when another example changes."""
    model = bert_with_batchnorm().train()
    x = torch.randint(1, 100, (4, 8))
    a = model(input_ids=x).logits[0]
    x[1] = torch.randint(1, 100, (8,))
    assert not torch.allclose(a, model(input_ids=x).logits[0])


def test_model_with_batchnorm_is_refused(tmp_path):
    with pytest.raises(ExampleCouplingError, match=r"bert\.pooler\.activation\.0 is a BatchNorm1d.*GroupNorm"):
        DRTrainer(model=bert_with_batchnorm(), args=dr_args(tmp_path), train_dataset=make_cls_dataset())


def test_frozen_batchnorm_in_eval_mode_is_refused_too(tmp_path):
    """Frozen (the base is frozen under LoRA) and in eval mode at construction: Trainer calls model.train()."""
    model = bert_with_batchnorm().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ExampleCouplingError, match="FrozenBatchNorm2d"):
        DRTrainer(model=model, args=dr_args(tmp_path), train_dataset=make_cls_dataset())


def test_running_statistics_layers_are_found_wherever_they_are():
    class CustomNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("running_mean", torch.zeros(4))

    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.SyncBatchNorm(4), torch.nn.BatchNorm2d(4), torch.nn.BatchNorm3d(4),
        torch.nn.InstanceNorm1d(4, track_running_stats=True), torch.nn.InstanceNorm1d(4), CustomNorm(),
        torch.nn.LayerNorm(4), torch.nn.GroupNorm(2, 4),
    )
    found = [p.split(" ")[0] for p in coupling_layer_problems(model)]
    assert found == ["1", "2", "3", "4", "6"]


def test_disable_dp_does_not_check(tmp_path):
    DRTrainer(model=bert_with_batchnorm(), args=dr_args(tmp_path, disable_dp=True), train_dataset=make_cls_dataset())


# ---- collators, flags and packed rows ----


def test_flattening_collator_is_refused(tmp_path):
    from transformers import DataCollatorWithFlattening

    with pytest.raises(ExampleCouplingError, match="DataCollatorWithFlattening.*DataCollatorWithPadding"):
        DRTrainer(
            model=make_tiny_llama(), args=dr_args(tmp_path), train_dataset=unpadded_lm_rows(),
            data_collator=DataCollatorWithFlattening(),
        )


def test_padding_free_and_packing_flags_are_refused(tmp_path):
    class PaddingFreeCollator:
        padding_free = True

        def __call__(self, rows):
            raise AssertionError("not called")

    assert "padding_free=True" in collator_problems(PaddingFreeCollator())[0]
    assert collator_problems(None, SimpleNamespace(packing=True, padding_free=False))[0].startswith(
        "the training arguments set packing=True"
    )
    args = dr_args(tmp_path)
    args.padding_free = True  # TRL-style flag on the arguments
    with pytest.raises(ExampleCouplingError, match="padding_free=True"):
        DRTrainer(model=make_tiny_llama(), args=args, train_dataset=make_lm_dataset())


def test_packed_position_ids_are_found():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    assert "restart within 1 of 1 rows" in packed_batch_problems({"position_ids": pos})[0]
    # increasing ids are fine, and so is whatever a padded position holds
    ok = torch.tensor([[1, 1, 0, 1, 2, 3], [0, 1, 2, 3, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    assert packed_batch_problems({"position_ids": ok, "attention_mask": mask}) == []
    assert packed_batch_problems({"input_ids": pos, "cu_seq_lens_q": torch.tensor([0, 3, 8])})


def test_packed_rows_are_refused_before_training(tmp_path):
    """Rows made of several sequences (position ids restarting inside a row), as packing produces them."""
    ds = make_lm_dataset(n=32, vary_length=False)
    ds = ds.add_column("position_ids", [list(range(8)) + list(range(8))] * 32)
    trainer = DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path), train_dataset=ds)
    with pytest.raises(ExampleCouplingError, match="position_ids restart within 8 of 8 rows"):
        trainer.train()


# ---- the numeric guard, through the trainer ----


def test_left_padding_on_gpt_neo_is_refused_naming_padding_side(tmp_path):
    trainer = DRTrainer(
        model=make_tiny_gpt_neo(), args=dr_args(tmp_path), train_dataset=unpadded_lm_rows(),
        data_collator=lm_collator("left"),
    )
    with pytest.raises(ExampleCouplingError, match=r"padding_side='right'"):
        trainer.train()
    assert trainer._hooks is None and trainer._mechanism is None


def test_right_padding_on_gpt_neo_trains(tmp_path):
    trainer = DRTrainer(
        model=make_tiny_gpt_neo(), args=dr_args(tmp_path, max_steps=2), train_dataset=unpadded_lm_rows(),
        data_collator=lm_collator("right"),
    )
    trainer.train()
    assert trainer.state.global_step == 2


def test_left_padding_with_absolute_positions_is_caught_by_the_numbers(tmp_path):
    """Sequence classification (no causal-LM shift): only the loss comparison can see the shifted positions."""
    trainer = DRTrainer(
        model=make_tiny_gpt_neo(cls=True), args=dr_args(tmp_path), train_dataset=unpadded_cls_rows(),
        data_collator=cls_collator("left"),
    )
    with pytest.raises(ExampleCouplingError, match=r"changed another row's loss.*padding_side='right'"):
        trainer.train()


def test_left_padding_with_rotary_positions_passes_for_classification(tmp_path):
    """Rotary attention depends on relative positions only, so a left-padded Llama classifier is independent."""
    trainer = DRTrainer(
        model=make_tiny_llama_cls(), args=dr_args(tmp_path, max_steps=1), train_dataset=unpadded_cls_rows(),
        data_collator=cls_collator("left"),
    )
    trainer.train()


def test_left_padding_is_refused_for_causal_lm_even_with_rotary_positions(tmp_path):
    """The shifted loss predicts the first token from a padding position, whose output depends on the padding."""
    trainer = DRTrainer(
        model=make_tiny_llama(), args=dr_args(tmp_path), train_dataset=unpadded_lm_rows(),
        data_collator=lm_collator("left"),
    )
    with pytest.raises(ExampleCouplingError, match="left-padded to its longest row: the causal-LM loss"):
        trainer.train()


def test_left_padding_to_a_fixed_length_passes_for_causal_lm(tmp_path):
    """Padded to max_length when tokenized: a row's padding does not depend on the other rows."""
    tok = make_tokenizer("left")
    ds = unpadded_lm_rows().map(lambda r: tok.pad({"input_ids": r["input_ids"]}, padding="max_length", max_length=16))
    ds = ds.map(lambda r: {"labels": [t if m else -100 for t, m in zip(r["input_ids"], r["attention_mask"])]})
    assert ds[0]["attention_mask"][0] == 0  # left-padded
    DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, max_steps=1), train_dataset=ds).train()


def test_left_padded_causal_lm_losses_really_depend_on_the_batch():
    model = make_tiny_llama().eval()
    ds = unpadded_lm_rows()
    rows = [ds[i] for i in probe_rows(ds)]  # the longest first: without it the padding shrinks
    collate = lm_collator("left")

    def losses(rs):
        b = collate(rs)
        labels = b.pop("labels")
        with torch.no_grad():
            return per_sample_losses(model(**b).logits, labels, "causal_lm")

    full = losses(rows)
    without = losses(rows[1:])
    assert ((without - full[1:]).abs() / full[1:]).max() > 10 * RTOL


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_independent_models_pass_the_guard(tmp_path, which):
    if which == "llama":
        model, ds, collator = make_tiny_llama(), unpadded_lm_rows(), lm_collator("right")
    else:
        model, ds, collator = make_tiny_bert(), unpadded_cls_rows(), cls_collator("right")
    trainer = DRTrainer(model=model, args=dr_args(tmp_path, max_steps=1), train_dataset=ds, data_collator=collator)
    trainer.model.train()
    head = next(m for name, m in trainer.model.named_modules() if name.endswith(("lm_head", "classifier")))
    head.eval()  # a submodule in another mode than the model
    trainer._check_example_independence()
    assert trainer.model.training and not head.training  # every submodule's mode is restored
    trainer.train()


def test_pre_padded_datasets_pass_the_guard(tmp_path):
    DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, max_steps=1), train_dataset=make_lm_dataset()).train()
    DRTrainer(model=make_tiny_bert(), args=dr_args(tmp_path, max_steps=1), train_dataset=make_cls_dataset()).train()


def test_a_collator_that_mixes_rows_is_refused_naming_the_collator():
    """A collator that truncates every row to the batch's shortest one: a row's content depends on the others."""
    base = lm_collator("right")

    def truncating(rows):
        k = min(len(r["input_ids"]) for r in rows)
        return base([{"input_ids": r["input_ids"][:k]} for r in rows])

    model = make_tiny_llama()
    ds = unpadded_lm_rows()
    rows = [ds[i] for i in probe_rows(ds)]

    def loss_fn(batch):
        labels = batch.pop("labels")
        return per_sample_losses(model(**batch).logits, labels, "causal_lm")

    with pytest.raises(ExampleCouplingError, match="removing the shortest row.*truncating"):
        check_example_independence(rows, truncating, loss_fn, model, task="causal_lm", collator_name="truncating")
    check_example_independence(rows, base, loss_fn, model, task="causal_lm")  # the same rows, padded: fine


def test_probe_rows_start_with_the_longest_and_the_shortest():
    ds = unpadded_lm_rows()
    lengths = [len(r) for r in ds["input_ids"]]
    idx = probe_rows(ds)
    assert len(idx) == 8 and len(set(idx)) == 8
    assert lengths[idx[0]] == max(lengths) and lengths[idx[1]] == min(lengths)


# ---- what the guard protects: the sensitivity of the clipped sum ----


def _clipped_sum(model, collate, rows, c):
    from hf_drencoder.privacy.per_sample import attach_grad_sample_hooks, pop_per_sample_gradients

    params = [p for p in model.parameters() if p.requires_grad]
    hooks = attach_grad_sample_hooks(model)
    try:
        model.train()
        batch = collate(rows)
        labels = batch.pop("labels")
        per_sample_losses(model(**batch).logits, labels, "causal_lm").sum().backward()
        grads = pop_per_sample_gradients(params, len(rows))
    finally:
        hooks.cleanup()
    summed, _ = clip_and_sum(grads, c)
    return torch.cat([s.flatten() for s in summed])


def _lora(model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # away from the zero init, so every example has a gradient in every direction
            torch.nn.init.normal_(p, std=0.1)
    return model


@pytest.mark.parametrize("side", ["right", "left"])
def test_adding_one_row_moves_the_clipped_sum_by_at_most_c_when_the_guard_passes(side):
    """The guard's verdict matches the sensitivity: with right padding (passes) adding the longest row moves the
    clipped sum by <= C; with left padding (refused) it moves it by more. C small: every example is clipped."""
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    model = _lora(make_tiny_gpt_neo())
    ds = unpadded_lm_rows(n=16, lo=3, hi=16)
    idx = probe_rows(ds)
    rows = [ds[i] for i in idx]
    collate = lm_collator(side)
    c = 1e-3
    with_row = _clipped_sum(model, collate, rows, c)
    without = _clipped_sum(model, collate, rows[1:], c)  # rows[0] is the longest: the padded length changes
    moved = float((with_row - without).norm())
    if side == "right":
        assert moved <= c * (1 + 1e-4)
        check_example_independence(rows, collate, lambda b: per_sample_losses(
            model(**{k: v for k, v in b.items() if k != "labels"}).logits, b["labels"], "causal_lm"), model)
    else:
        assert moved > 1.5 * c
