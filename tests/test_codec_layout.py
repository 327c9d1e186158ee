"""Layout: a LoRA gradient <-> one flat vector, exactly, on two architectures; mismatches named."""

import pytest
import torch
from conftest import make_tiny_bert, make_tiny_llama
from peft import LoraConfig, get_peft_model

from hf_drencoder.codec import LayoutMismatchError, LoraLayout


def llama_lora(r=4, seed=0):
    return get_peft_model(make_tiny_llama(seed), LoraConfig(r=r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def bert_lora(seed=0):
    return get_peft_model(make_tiny_bert(seed), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS", lora_dropout=0.0))


@pytest.mark.parametrize("build", [llama_lora, bert_lora], ids=["llama", "bert"])
def test_round_trip_is_exact(build):
    model = build()
    layout = LoraLayout.from_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.randn(p.shape) for p in params]
    flat = layout.flatten(grads)
    assert flat.shape == (sum(p.numel() for p in params),) == (layout.dim,)
    back = layout.unflatten(flat)
    assert all(torch.equal(a, b) for a, b in zip(grads, back))
    # batched per-sample gradients keep their leading dimension
    per_sample = [torch.randn(3, *p.shape) for p in params]
    flat3 = layout.flatten(per_sample)
    assert flat3.shape == (3, layout.dim)
    assert all(torch.equal(a, b) for a, b in zip(per_sample, layout.unflatten(flat3)))
    # the map is tied to names: block i is parameter i
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [b.name for b in layout.blocks] == names


def test_factors_and_heads_are_labelled():
    llama = LoraLayout.from_model(llama_lora())
    assert [b.factor for b in llama.blocks] == ["lora_A", "lora_B"] * 4
    assert llama.blocks[0].module.endswith("layers.0.self_attn.q_proj")
    assert llama.dim == 2 * 2 * (4 * 64 + 64 * 4)
    bert = LoraLayout.from_model(bert_lora())
    heads = [b for b in bert.blocks if b.factor == "head"]
    assert {tuple(b.shape) for b in heads} == {(3, 32), (3,)}  # classifier weight and bias in modules_to_save
    assert sum(b.factor.startswith("lora") for b in bert.blocks) == 8


def test_same_config_same_layout_and_serialisation():
    a, b = LoraLayout.from_model(llama_lora(seed=0)), LoraLayout.from_model(llama_lora(seed=1))
    assert a == b and a.fingerprint == b.fingerprint
    assert LoraLayout.from_dict(a.to_dict()) == a


def test_mismatch_names_both_layouts():
    a, b = LoraLayout.from_model(llama_lora(r=4)), LoraLayout.from_model(llama_lora(r=8))
    with pytest.raises(LayoutMismatchError) as err:
        a.check_compatible(b)
    msg = str(err.value)
    assert a.fingerprint in msg and b.fingerprint in msg
    assert "lora_A" in msg and "(4, 64)" in msg and "(8, 64)" in msg


def test_bad_inputs():
    layout = LoraLayout.from_model(llama_lora())
    with pytest.raises(ValueError, match="expected 8 tensors"):
        layout.flatten([torch.zeros(1)])
    with pytest.raises(ValueError, match="values"):
        layout.unflatten(torch.zeros(layout.dim + 1))
    with pytest.raises(ValueError, match="at least one trainable"):
        LoraLayout([], [])
