"""bf16 autocast on the private path: forward in bf16, per-sample gradients, clipping and noise in fp32."""

import pytest
import torch

from conftest import dr_args, make_lm_dataset, make_tiny_llama
from hf_drencoder import DRTrainer


def _clean_sums(tmp_path, bf16):
    trainer = DRTrainer(
        model=make_tiny_llama(), train_dataset=make_lm_dataset(),
        # C large: nothing is clipped, so the sums compare the per-sample gradients themselves
        args=dr_args(tmp_path / str(bf16), bf16=bf16, use_cpu=True, max_steps=2, per_sample_max_grad_norm=1e3),
    )
    seen = {"dtypes": set(), "sums": [], "released": []}
    start = trainer._start_mechanism

    def spy(step):
        start(step)
        mech = trainer._mechanism
        add = mech.add_per_sample

        def add_per_sample(grads):
            seen["dtypes"] |= {g.dtype for g in grads}
            seen["sums"].append(torch.cat([g.sum(0).reshape(-1) for g in grads]))
            return add(grads)

        mech.add_per_sample = add_per_sample

    trainer._start_mechanism = spy
    trainer.post_privacy_hooks.append(lambda g: seen["released"].extend(t.dtype for t in g) or g)
    autocast_dtypes = set()
    hook = trainer.model.base_model.model.model.layers[0].self_attn.o_proj.register_forward_hook(
        # training forwards only: the example-independence check before training runs in fp32 under no_grad
        lambda m, i, o: autocast_dtypes.add(o.dtype) if torch.is_grad_enabled() else None
    )
    trainer.train()
    hook.remove()
    return seen, autocast_dtypes


def test_bf16_matches_fp32_with_fp32_private_arithmetic(tmp_path):
    fp32, fp32_forward = _clean_sums(tmp_path, False)
    bf16, bf16_forward = _clean_sums(tmp_path, True)
    assert fp32_forward == {torch.float32} and bf16_forward == {torch.bfloat16}  # autocast was on
    assert bf16["dtypes"] == {torch.float32} and set(bf16["released"]) == {torch.float32}
    # the first step saw the same batch and the same weights: per-sample gradients agree to bf16 precision
    first32, first16 = fp32["sums"][0], bf16["sums"][0]
    assert ((first16 - first32).norm() / first32.norm()).item() < 0.03


def test_fp16_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs loss scaling"):
        DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path, fp16=True, use_cpu=True), train_dataset=make_lm_dataset())
