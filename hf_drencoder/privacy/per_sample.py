"""Taking per-sample gradients off the parameters after a backward pass with opacus hooks attached."""

from __future__ import annotations

import torch


def pop_per_sample_gradients(params: list[torch.nn.Parameter], batch_size: int) -> list[torch.Tensor]:
    """Each parameter's ``[batch_size, *shape]`` per-sample gradient, removed from the parameter together
    with its summed ``.grad``, so that a raw gradient is never left where an optimizer or a logger could
    read it. Refuses a tensor that got none (its layer has no opacus grad sampler, or hooks saw nothing
    because the model was in eval mode)."""
    samples = []
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None or gs.shape[0] != batch_size:
            raise RuntimeError(
                f"no per-sample gradient for a trainable tensor of shape {tuple(p.shape)}: opacus has no grad "
                "sampler for its layer (e.g. LoRA on embeddings; adapt only Linear layers), or the model was "
                "not in train() mode"
            )
        samples.append(gs.detach())
    for p in params:
        p.grad_sample = None
        p.grad = None
    return samples


def _in_fp32(grad_sampler):
    def compute(layer, activations, backprops):
        activations = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in activations]
        return grad_sampler(layer, activations, backprops.float())

    return compute


def attach_grad_sample_hooks(model: torch.nn.Module):
    """opacus hooks on ``model``'s submodules (the model is not wrapped, so a ``PeftModel`` stays one) that
    compute every per-sample gradient in fp32: under bf16 autocast the captured activations and backprops are
    bf16, and a per-sample gradient rounded to bf16 would carry its rounding into the clipped sum."""
    from opacus.grad_sample import GradSampleHooks

    class FP32GradSampleHooks(GradSampleHooks):
        GRAD_SAMPLERS = {kind: _in_fp32(fn) for kind, fn in GradSampleHooks.GRAD_SAMPLERS.items()}

    return FP32GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
