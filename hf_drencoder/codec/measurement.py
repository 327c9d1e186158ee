"""What a message measures: the encoder of `GradientCodec`.

The latent is ``z = P y`` for the (noisy) gradient ``y`` with ``P`` a matrix of orthonormal rows: ``k - r`` rows
select the coordinates with the largest prior variance (for a Gaussian prior with diagonal covariance these are
the MMSE-optimal linear measurements, whatever the noise level), and ``r`` rows span the last ``r`` decoded
gradients (the span form of the temporal prior; ``r = temporal_window``), restricted to the unselected coordinates
so that all rows stay orthonormal and white noise stays white in the latent. With the AR(1) prior
(``temporal_rho``) the coordinates measured at step t are those whose posterior variance ``p`` the measurement
reduces most (largest ``p^2 / (p + s^2)``). ``P`` depends only on the prior and on already-decoded (released)
gradients: encoding is post-processing, and sender and receiver compute the same ``P``.

Low-rank part (``lora_rank``). Coordinate selection cannot denoise LoRA factors at realistic noise (each entry's
signal is far below the noise), so part of the latent can carry one warm-started power iteration (PowerSGD) per
stack of equally shaped LoRA factors: ``P = orth(M Q_prev)``, ``Q = M^T P``; ``Q`` is the next warm start at both
ends. This part is not linear in the input (refused where linearity is needed: latent noise, federated sums).

The ``modules_to_save`` tensors (a classification head) are appended raw with ``raw_head``: they are never measured
through the latent.
"""

from __future__ import annotations

import torch

from .layout import LoraLayout
from .threads import single_threaded


def _lowrank_groups(layout: LoraLayout, rank: int, budget: float) -> list[dict]:
    """LoRA factor tensors of equal shape, stacked along their short side into one matrix per shape; the
    largest groups first, as many as fit in ``budget`` latent values."""
    by_shape: dict[tuple, list] = {}
    for b in layout.blocks:
        if b.factor.startswith("lora") and len(b.shape) == 2:
            by_shape.setdefault(b.shape, []).append((b.offset, b.numel))
    groups = []
    for shape, spans in by_shape.items():
        m, n = shape
        stack_rows = m <= n
        rows, cols = (m * len(spans), n) if stack_rows else (m, n * len(spans))
        groups.append({"shape": shape, "spans": spans, "stack_rows": stack_rows, "rows": rows, "cols": cols,
                       "rank": min(rank, rows, cols)})
    chosen, used = [], 0
    for g in sorted(groups, key=lambda g: -g["rows"] * g["cols"]):
        cost = g["rank"] * (g["rows"] + g["cols"])
        if used + cost <= budget:
            chosen.append(g)
            used += cost
    return sorted(chosen, key=lambda g: g["spans"][0][0])


def _stack(y: torch.Tensor, g: dict) -> torch.Tensor:
    mats = [y[off : off + n].reshape(g["shape"]) for off, n in g["spans"]]
    return torch.cat(mats, 0 if g["stack_rows"] else 1)


def _unstack(m: torch.Tensor, g: dict, out: torch.Tensor) -> None:
    size = g["shape"][0] if g["stack_rows"] else g["shape"][1]
    for (off, n), part in zip(g["spans"], m.split(size, 0 if g["stack_rows"] else 1)):
        out[off : off + n] = part.reshape(-1)


class MeasurementMixin:
    """The encoder half of `GradientCodec`: which linear measurements a message carries."""

    def _select_coordinates(self) -> None:
        """The fixed measurements of the static prior: the coordinates with the largest prior variance (relative to
        their tensor's with ``balance``), never ones the low-rank part covers or ones sent raw."""
        # ties (the paper prior has one variance per tensor) are broken by a seeded random order
        rank = self.prior_var.double() / self.block_var.double() ** self.balance
        rank[self.lowrank_mask] = -1.0  # covered by the low-rank part
        rank[self.raw_mask] = -2.0  # sent raw
        order = torch.argsort(rank * self._tie_break().double(), descending=True)
        self.selected.copy_(torch.sort(order[: self.num_selected]).values)

    def _tie_break(self) -> torch.Tensor:
        if getattr(self, "_jitter", None) is None or self._jitter.numel() != self.layout.dim:
            g = torch.Generator().manual_seed(self.seed)
            self._jitter = 1.0 + 1e-6 * torch.rand(self.layout.dim, generator=g)
        return self._jitter

    def _kalman_selection(self, s2: float) -> torch.Tensor:
        """Coordinates measured next: the largest reductions of posterior variance, p^2 / (p + s^2).
        A function of public state only, so sender and receiver pick the same ones."""
        key = (self._version, s2)
        cached = getattr(self, "_selection_cache", None)
        if cached is not None and cached[0] == key:  # encode and decode of one message share it
            return cached[1]
        p = self.state_var
        score = p * p
        score.div_(p + (s2 + 1e-30))
        if self.balance:
            ref = self.block_var
            score.div_((ref * ref / (ref + (s2 + 1e-30))) ** self.balance)
        score.mul_(self._tie_break())
        if self.lowrank_payload:
            score[self.lowrank_mask] = -1.0
        score[self.raw_mask] = -2.0
        sel = torch.sort(torch.topk(score, self.num_selected).indices).values
        self._selection_cache = (key, sel)
        return sel

    @torch.no_grad()
    @single_threaded
    def encode(self, grads, noise_std: float | None = None) -> torch.Tensor:
        """Latent of a flat gradient (``[dim]`` or ``[n, dim]``) or of a list of per-parameter tensors.

        ``noise_std`` is the per-coordinate noise std of the input; only the AR(1) encoder uses it (to choose
        what to measure), and ``decode`` must then be called with the same value.
        """
        flat, _ = self._to_flat(grads)
        self._check_finite(flat, "gradient")
        if self.temporal_rho > 0:
            z = flat[..., self._kalman_selection(self._noise_var(noise_std))]
        else:
            z = flat[..., self.selected]
            if self.temporal_window:
                z = torch.cat([z, flat @ self._temporal_basis().t()], -1)
        if self.lowrank_payload:
            z = torch.cat([z, self._lowrank_encode(flat)], -1)
        if self.raw_dim:
            z = torch.cat([z, flat[..., self.raw_index]], -1)
        return z

    def _lowrank_encode(self, flat: torch.Tensor) -> torch.Tensor:
        """One warm-started power iteration per group: ``P = orth(M Q_prev)``, ``Q = M^T P``; sends P and Q."""
        rows = flat.reshape(-1, self.layout.dim)
        out = []
        for y in rows:
            parts, q_off = [], 0
            for g in self._groups:
                r, c = g["rank"], g["cols"]
                q_prev = self.lowrank_q[q_off : q_off + c * r].reshape(c, r)
                q_off += c * r
                m = _stack(y, g)
                p = torch.linalg.qr(m @ q_prev).Q
                parts += [p.reshape(-1), (m.t() @ p).reshape(-1)]
            out.append(torch.cat(parts))
        out = torch.stack(out)
        return out if flat.dim() > 1 else out[0]


__all__ = ["MeasurementMixin"]
