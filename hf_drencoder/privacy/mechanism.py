"""The Gaussian mechanism on summed, clipped per-sample gradients: what one private optimizer step releases."""

from __future__ import annotations

import math

import torch

from .clipping import DEFAULT_CLIPPING_GAMMA, clip_and_sum
from .noise import gaussian_noise_like, make_generator


class GaussianGradientMechanism:
    """Accumulates clipped per-sample gradients over the micro-batches of one step and releases

        (sum_i clip_C(g_i) + N(0, sigma^2 C^2 I)) / B_expected

    once per step. Dividing by the *expected* batch size (a public constant) rather than the drawn one keeps
    the number of sampled examples private under Poisson sampling.

    With ``noise_multiplier=0`` and ``max_grad_norm=inf`` it is the same computation without privacy (the
    ``disable_dp`` baseline): plain summed gradients divided by the expected batch size.

    Data parallel: each process holds the clipped sum of its share of the batch; ``release(all_reduce=...)``
    sums the shares across processes. Exactly one process (``draws_noise=True``, the main one) adds the noise
    to its share before the sum, so the released sum carries one draw of N(0, sigma^2 C^2 I), and every
    process receives the same released tensor.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: float,
        clipping: str = "flat",
        clipping_gamma: float = DEFAULT_CLIPPING_GAMMA,
        noise_seed: int | None = None,
        draws_noise: bool = True,
    ):
        if not params:
            raise ValueError("no trainable parameters")
        if expected_batch_size <= 0:
            raise ValueError("expected_batch_size must be > 0")
        self.params = list(params)
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_batch_size = float(expected_batch_size)
        self.clipping = clipping
        self.clipping_gamma = float(clipping_gamma)
        self.draws_noise = bool(draws_noise)
        self.generator = make_generator(self.params[0].device, noise_seed)
        self._sums: list[torch.Tensor] | None = None
        self.last_norms: torch.Tensor | None = None

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the sum (sigma * C)."""
        return self.noise_multiplier * self.max_grad_norm if self.noise_multiplier > 0 else 0.0

    def _add(self, sums: list[torch.Tensor]) -> None:
        if self._sums is None:
            self._sums = sums
        else:
            for acc, s in zip(self._sums, sums):
                acc.add_(s)

    def add_per_sample(self, grad_samples: list[torch.Tensor]) -> torch.Tensor:
        """Clip a micro-batch of per-sample gradients (one ``[b, *shape]`` tensor per parameter) and add them
        to the step's sum. Returns the per-sample norms before clipping."""
        if len(grad_samples) != len(self.params):
            raise RuntimeError(f"expected per-sample gradients for {len(self.params)} tensors, got {len(grad_samples)}")
        sums, norms = clip_and_sum(grad_samples, self.max_grad_norm, self.clipping, self.clipping_gamma)
        self._add(sums)
        self.last_norms = norms
        return norms

    def add_summed(self, grads: list[torch.Tensor]) -> None:
        """Add an already-summed batch gradient. Only valid without privacy (nothing is clipped)."""
        if math.isfinite(self.max_grad_norm) or self.noise_multiplier > 0:
            raise RuntimeError("add_summed bypasses per-sample clipping and is only allowed when DP is disabled")
        self._add([g.detach().float().clone() for g in grads])

    def release(self, all_reduce=None) -> list[torch.Tensor]:
        """The privatised mean gradient of this step; resets the accumulator. A step with no examples
        releases pure noise, as the mechanism requires. ``all_reduce`` (data parallel) sums a list of tensors
        over processes; it is applied after this process's noise (if it draws it) and before the division."""
        sums = self._sums if self._sums is not None else [torch.zeros(p.shape, device=p.device) for p in self.params]
        self._sums = None
        std = self.noise_std if self.draws_noise else 0.0
        noised = [s + gaussian_noise_like(s, std, self.generator) if std > 0 else s for s in sums]
        if all_reduce is not None:
            noised = all_reduce(noised)
        return [s / self.expected_batch_size for s in noised]

    def state_dict(self) -> dict:
        return {"generator_state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator_state"])
