"""Per-sample clipping: bounds each example's contribution, which is the sensitivity the noise is scaled to."""

from __future__ import annotations

import math

import torch

CLIPPING_MODES = ("flat", "per_layer", "automatic")
DEFAULT_CLIPPING_GAMMA = 0.01
"""gamma of automatic clipping: each example's gradient is scaled by C / (||g|| + gamma)."""


def per_sample_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's gradient over all tensors: ``[B]``."""
    sq = torch.stack([g.reshape(g.shape[0], -1).float().pow(2).sum(1) for g in grad_samples], dim=0)
    return sq.sum(0).sqrt()


def clip_and_sum(grad_samples: list[torch.Tensor], max_norm: float, mode: str = "flat",
                 gamma: float = DEFAULT_CLIPPING_GAMMA) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip every example's gradient and sum over the batch.

    ``flat``: the whole gradient of an example is scaled to norm <= ``max_norm``. ``per_layer``: each of
    the P tensors is clipped to ``max_norm / sqrt(P)``, so the whole example still has norm <= ``max_norm``
    and the sensitivity of the sum is the same ``max_norm`` the noise is calibrated to. ``automatic``
    (automatic clipping, Bu et al. 2023): every example's gradient is normalised, scaled by
    ``max_norm / (||g|| + gamma)``, so its norm ``max_norm * ||g|| / (||g|| + gamma)`` is below ``max_norm``
    whatever ``||g||`` is: the sensitivity is again ``max_norm``, and small gradients are scaled up instead of
    passed through.

    Returns the clipped sums (fp32, one per tensor) and the per-example norms before clipping.
    """
    if mode not in CLIPPING_MODES:
        raise ValueError(f"unknown clipping mode {mode!r}; choose one of {CLIPPING_MODES}")
    if not grad_samples:
        raise ValueError("no per-sample gradients to clip")
    if mode == "automatic" and not (gamma > 0 and math.isfinite(gamma) and math.isfinite(max_norm)):
        raise ValueError(f"automatic clipping needs a finite max_norm and gamma > 0, got {max_norm} and {gamma}")
    norms = per_sample_norms(grad_samples)
    sums = []
    if mode in ("flat", "automatic"):
        if mode == "flat":
            factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        else:
            factor = max_norm / (norms + gamma)
        for g in grad_samples:
            sums.append(torch.einsum("b,b...->...", factor.to(g.device), g.float()))
    else:
        per_tensor = max_norm / math.sqrt(len(grad_samples))
        for g in grad_samples:
            n = g.reshape(g.shape[0], -1).float().norm(dim=1)
            factor = (per_tensor / (n + 1e-6)).clamp(max=1.0)
            sums.append(torch.einsum("b,b...->...", factor, g.float()))
    return sums, norms
