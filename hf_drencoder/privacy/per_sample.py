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
