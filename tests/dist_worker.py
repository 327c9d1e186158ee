"""Run by tests/test_distributed.py under `accelerate launch` (2 processes, gloo): a data-parallel DRTrainer.

Writes <out>/rank<k>.pt with what every rank saw, so that the test can compare ranks with each other and
with a single-process run.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from conftest import dr_args, make_lm_dataset, make_tiny_llama  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

from hf_drencoder import DRTrainer  # noqa: E402


def lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(tmp, per_device: int, zero_signal: bool) -> dict:
    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    if zero_signal:  # A = B = 0: every per-sample gradient is exactly zero, the release is pure noise
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.zeros_(p)
    args = dr_args(
        tmp, noise_multiplier=2.0, per_sample_max_grad_norm=0.5, per_device_train_batch_size=per_device,
        max_steps=4, learning_rate=0.0 if zero_signal else 1e-2, save_strategy="steps", save_steps=2,
        noise_seed=1234, use_cpu=not torch.cuda.is_available(),
    )
    trainer = DRTrainer(model=model, args=args, train_dataset=make_lm_dataset(n=64))
    released = []
    trainer.post_privacy_hooks.append(lambda g: released.append(torch.cat([t.reshape(-1) for t in g])) or g)
    trainer.train()
    result = {
        "world_size": args.world_size,
        "released": torch.stack(released),
        "lora": lora(trainer.model),
        "history": trainer.ledger.accountant.history,
        "epsilon": trainer.ledger.metrics(),
        "log_history": trainer.state.log_history,
    }
    # resume from the step-2 checkpoint: the accountant must come back the same on every rank
    resumed = DRTrainer(model=trainer.model, args=args, train_dataset=make_lm_dataset(n=64))
    resumed.train(resume_from_checkpoint=str(tmp / "out" / "checkpoint-2"))
    result["resumed_history"] = resumed.ledger.accountant.history
    return result


if __name__ == "__main__":
    from pathlib import Path

    out, per_device = Path(sys.argv[1]), int(sys.argv[2])
    result = {"zero": run(out / "zero", per_device, True), "train": run(out / "train", per_device, False)}
    # the same rows in another order on rank 1: one Poisson draw of indices would select different examples
    data = make_lm_dataset(n=64)
    if int(os.environ.get("RANK", "0")) == 1:
        data = data.shuffle(seed=1)
    try:
        DRTrainer(model=make_tiny_llama(), args=dr_args(out / "mismatch", per_device_train_batch_size=per_device,
                                                         use_cpu=not torch.cuda.is_available()),
                  train_dataset=data).train()
        result["mismatch_error"] = None
    except ValueError as err:
        result["mismatch_error"] = str(err)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result, out / f"rank{rank}.pt")
    # what Trainer.end() does: without it the gloo threads can outlive the interpreter and abort the process at exit
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
