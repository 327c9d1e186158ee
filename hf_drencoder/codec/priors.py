"""Priors over LoRA batch gradients, built from the released (private) statistics only.

Every prior here is Gaussian in its second-order description: a mean ``mean`` and a diagonal covariance
``var`` over the flat layout vector (the temporal prior adds a low-rank part inside the codec, see
`.codec`). They differ in how much structure they take from the statistics:

``paper``    one mean and one variance per tensor (module x factor), entries i.i.d.: the prior of
             DR-Encoder as published. It carries no within-tensor structure.
``element``  per-element mean and variance, straight from the ``sum`` / ``sumsq`` releases (a tensor's mean is
             kept only where it stands out of the release noise, see `_shrunk_mean`).
``lowrank``  LoRA-aware: per-element mean; the variance of each factor matrix is the rank-one
             (separable) fit ``row_i * col_j / total`` from the row and column marginals of the squared
             gradient, which are released with far less relative noise than single elements; samples
             are low-rank matrices (as LoRA factor gradients of few examples are) with those moments.

The quantity the codec encodes is a batch gradient, the mean of ``B`` clipped per-example gradients, so
its fluctuation variance is the per-example variance divided by ``B`` (``expected_batch_size``).
``drift`` adds ``drift * mean**2`` of variance: the gradient moves away from the stage-1 mean as training
proceeds, and a prior that trusts the mean completely would never let the decoder leave it.
"""

from __future__ import annotations

import math

import torch

from .layout import LoraLayout
from .statistics import GradientStatistics

PRIORS = ("paper", "element", "lowrank")


class GaussianPrior:
    """Mean and diagonal variance over a layout's flat gradient vector, with a sampler.

    ``sample_rank`` > 0 draws every matrix-shaped tensor as ``sqrt(var) * N`` with ``N`` a random matrix of
    rank ``sample_rank`` normalised so that ``E[N_ij^2] = 1``: the moments are those of the Gaussian, the
    samples are low-rank. ``sample_rank = 0`` draws i.i.d. Gaussian entries.
    """

    def __init__(self, layout: LoraLayout, mean: torch.Tensor, var: torch.Tensor, kind: str = "custom", sample_rank: int = 0, meta: dict | None = None):
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        var = torch.as_tensor(var, dtype=torch.float32).reshape(-1)
        if mean.numel() != layout.dim or var.numel() != layout.dim:
            raise ValueError(f"prior has {mean.numel()} means and {var.numel()} variances; the layout has {layout.dim} values")
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all()):
            raise ValueError("prior mean or variance contains NaN or inf")
        if (var < 0).any():
            raise ValueError("prior variances must be >= 0")
        if float(var.sum()) <= 0:
            raise ValueError("prior has zero variance everywhere: nothing for a codec to learn")
        self.layout = layout
        self.mean = mean
        self.var = var
        self.kind = kind
        self.sample_rank = int(sample_rank)
        self.meta = dict(meta or {})

    @property
    def dim(self) -> int:
        return self.layout.dim

    def second_moment(self) -> torch.Tensor:
        return self.var + self.mean.pow(2)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` synthetic gradients, ``[n, dim]``."""
        std = self.var.sqrt()
        if self.sample_rank <= 0:
            z = torch.randn(n, self.dim, generator=generator)
        else:
            z = torch.empty(n, self.dim)
            for b, sl in self.layout.block_slices():
                nr, nc = b.matrix_shape
                rank = min(self.sample_rank, nr, nc)
                if nr == 1 or nc == 1:
                    z[:, sl] = torch.randn(n, b.numel, generator=generator)
                    continue
                u = torch.randn(n, nr, rank, generator=generator)
                w = torch.randn(n, rank, nc, generator=generator)
                z[:, sl] = (u @ w).reshape(n, -1) / math.sqrt(rank)
        return self.mean + std * z

    def __repr__(self) -> str:
        return f"GaussianPrior(kind={self.kind!r}, dim={self.dim}, mean_norm={self.mean.norm():.3g}, total_var={self.var.sum():.3g})"


def _expand_blocks(layout: LoraLayout, per_block: torch.Tensor) -> torch.Tensor:
    return torch.cat([per_block[i].expand(b.numel) for i, b in enumerate(layout.blocks)])


MEAN_SIGNIFICANCE_Z = 3.0
"""A tensor's released mean is kept only if its energy exceeds the release noise's by this many standard deviations."""


def _shrunk_mean(stats: GradientStatistics, z_min: float = MEAN_SIGNIFICANCE_Z) -> torch.Tensor:
    """Per-element mean, tensor by tensor: zero unless the release shows a mean above its own noise.

    The released mean of a tensor is ``m = mu + e`` with ``e ~ N(0, t^2 I_n)`` and ``t`` known. Under ``mu = 0``,
    ``||m||^2 / t^2`` is chi-square with ``n`` degrees of freedom (mean ``n``, std ``sqrt(2n)``), so the tensor's
    mean is kept only where ``(||m||^2 - n t^2) / (t^2 sqrt(2n)) > z_min``, and then shrunk by the James-Stein
    factor ``1 - n t^2 / ||m||^2``; everywhere else it is zero. The codec decodes the directions a message does
    not measure to this mean, every step: a mean that is mostly release noise would be a constant, wrong
    gradient added at each step (the optimizer turns it into learning-rate-sized steps). Pure post-processing of
    the release.
    """
    m = stats.moment("sum").clone()
    t2 = stats.mean_noise_std("sum") ** 2
    if t2 <= 0:
        return m  # released without noise: nothing to test against
    for b, sl in stats.layout.block_slices():
        energy = float(m[sl].pow(2).sum(dtype=torch.float64))
        noise = b.numel * t2
        z = (energy - noise) / (t2 * math.sqrt(2 * b.numel))
        m[sl] *= max(0.0, 1.0 - noise / energy) if z > z_min else 0.0
    return m


def build_prior(
    stats: GradientStatistics,
    kind: str = "lowrank",
    expected_batch_size: float = 1.0,
    drift: float = 0.25,
    floor: float = 0.05,
    sample_rank: int | None = None,
) -> GaussianPrior:
    """The prior ``kind`` (one of `PRIORS`) for the mean of ``expected_batch_size`` clipped gradients.

    ``floor`` bounds every variance from below by ``floor`` times its tensor's mean variance, so that a
    coordinate whose noisy second moment came out near zero (or whose gradient was zero at stage 1, as
    LoRA A factors are while B is still zero) can still be decoded.
    """
    if kind not in PRIORS:
        raise ValueError(f"unknown prior {kind!r}; choose one of {PRIORS}")
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if drift < 0 or floor < 0:
        raise ValueError("drift and floor must be >= 0")
    layout = stats.layout
    block_mean, block_sq = stats.block_moments()
    # per tensor: mean-square entry, never below the noise level of its estimate (a noisy release can be < 0)
    block_sq = block_sq.clamp(min=0)
    block_var = (block_sq - block_mean.pow(2)).clamp(min=0)
    if float(block_var.sum()) <= 0:
        # all tensors look constant: fall back to the mean square so that there is something to encode
        block_var = block_sq.clone()
    if float(block_var.sum()) <= 0:
        raise ValueError("the released statistics show no gradient energy at all; collect more batches or lower the noise")
    # a tensor with no energy at stage 1 (LoRA A while B = 0) still gets a share: the smallest positive one
    positive = block_var[block_var > 0]
    block_var = block_var.clamp(min=float(positive.min()) if positive.numel() else 0.0)

    if kind == "paper":
        mean = _expand_blocks(layout, block_mean)
        var = _expand_blocks(layout, block_var)
        rank = 0
    else:
        mean = _shrunk_mean(stats) if "sum" in stats.parts else torch.zeros(layout.dim)
        if kind == "element":
            if "sumsq" not in stats.parts:
                raise ValueError("the 'element' prior needs the per-element second moments ('sumsq' part)")
            var = stats.moment("sumsq") - mean.pow(2)
            rank = 0
        else:
            if not {"row_sumsq", "col_sumsq"} <= set(stats.parts):
                raise ValueError("the 'lowrank' prior needs the row and column marginals ('row_sumsq', 'col_sumsq')")
            rows, cols = stats.moment("row_sumsq"), stats.moment("col_sumsq")
            parts, r_off, c_off = [], 0, 0
            for i, b in enumerate(layout.blocks):
                nr, nc = b.matrix_shape
                r = rows[r_off : r_off + nr].clamp(min=0) + 1e-30
                c = cols[c_off : c_off + nc].clamp(min=0) + 1e-30
                r_off += nr
                c_off += nc
                # rank-one fit of the expected squared matrix with the released row and column sums,
                # rescaled so that the tensor's total matches its (least noisy) block second moment
                sep = torch.outer(r, c)
                sep = sep * (block_sq[i] * b.numel / sep.sum())
                parts.append(sep.reshape(-1))
            var = torch.cat(parts) - mean.pow(2)
            rank = 1
        # per-element floor relative to the tensor's variance, and at least the tensor's smallest share
        var = torch.maximum(var, floor * _expand_blocks(layout, block_var))
    var = var / expected_batch_size + drift * mean.pow(2)
    var = var.clamp(min=1e-30)
    meta = {
        "expected_batch_size": expected_batch_size,
        "drift": drift,
        "floor": floor,
        "stats_noise_multiplier": stats.noise_multiplier,
        "stats_expected_examples": stats.expected_examples,
        # what the release of ``stats`` cost: a codec built from this prior carries it into training's ledger
        "privacy_history": [[stats.noise_multiplier, stats.sample_rate, stats.num_releases]],
        "privacy_unit": stats.meta.get("privacy_unit", "example"),
    }
    return GaussianPrior(layout, mean, var, kind, sample_rank if sample_rank is not None else rank, meta)


__all__ = ["GaussianPrior", "MEAN_SIGNIFICANCE_Z", "PRIORS", "build_prior"]
