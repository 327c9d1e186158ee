"""DP-AdamBC: AdamW with the known noise variance taken out of its second-moment estimate (Tang et al., 2024).

Under DP every coordinate of the released mean gradient carries Gaussian noise of variance
``(noise_multiplier * C / expected_batch)^2``. Adam's second moment ``v_hat`` estimates ``E[g^2]``, which is then the
squared gradient plus that variance: where the noise dominates, Adam divides by the noise level and its update
loses the per-coordinate scaling it is used for. DP-AdamBC divides by

    sqrt(max(v_hat - noise_variance, gamma'))

instead of ``sqrt(v_hat) + eps``. It only reads released (already noised) gradients and public constants, so it is
post-processing: it costs no privacy.
"""

from __future__ import annotations

import math

import torch


def released_noise_variance(noise_multiplier: float, max_grad_norm: float, expected_batch_size: float) -> float:
    """Per-coordinate variance of the noise on the released mean gradient: ``(sigma * C / B)^2``."""
    return (float(noise_multiplier) * float(max_grad_norm) / float(expected_batch_size)) ** 2


class DPAdamBC(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, Adam's bias correction of both moments) whose denominator is
    ``sqrt(max(v_hat - noise_variance, gamma))``.

    Args:
        params: parameters or parameter groups (as for ``torch.optim.AdamW``).
        noise_variance: the per-coordinate noise variance of each gradient the optimizer is given
            (`released_noise_variance`); 0 gives AdamW with ``eps`` replaced by a floor ``gamma`` on ``v_hat``.
        gamma: the floor gamma' of the corrected second moment (> 0); it replaces Adam's ``eps``.
        lr: the learning rate, as for ``torch.optim.AdamW``.
        betas: the moments' decay rates, as for ``torch.optim.AdamW``.
        weight_decay: decoupled weight decay, as for ``torch.optim.AdamW``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
                 *, noise_variance: float, gamma: float = 1e-8):
        if not (noise_variance >= 0 and math.isfinite(noise_variance)):
            raise ValueError(f"noise_variance={noise_variance} must be >= 0 and finite")
        if not (gamma > 0 and math.isfinite(gamma)):
            raise ValueError(f"gamma={gamma} must be positive and finite")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas} must be in [0, 1)")
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, noise_variance=float(noise_variance),
                        gamma=float(gamma))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                if group["weight_decay"]:
                    p.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                v_hat = exp_avg_sq / (1 - beta2**t)
                denom = (v_hat - group["noise_variance"]).clamp_(min=group["gamma"]).sqrt_()
                update = exp_avg / (1 - beta1**t) / denom
                p.add_(update.to(p.dtype), alpha=-lr)
        return loss


__all__ = ["DPAdamBC", "released_noise_variance"]
