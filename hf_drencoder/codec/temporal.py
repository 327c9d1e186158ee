"""The state a `GradientCodec` carries across steps, built from decoded (released) messages only.

Span form (``temporal_window``): the last ``r`` decoded gradients; the prior gains variance along their span, and
the encoder spends ``r`` latent slots on it.

AR(1) form (``temporal_rho``, the default of ``pretrain-codec``). Every coordinate follows
``g_t - mu = rho (g_{t-1} - mu) + e_t`` with stationary variance ``var``. Sender and receiver run the same Kalman
filter on the decoded messages: the decoded gradient is ``E[g_t | all latents so far]``, exactly.

Low-rank warm start (``lora_rank``): the right factors ``Q`` of the last message.

Both ends call ``observe`` with the same decoded vector, so their encoders stay identical; no private data enters.
"""

from __future__ import annotations

import math

import torch

from .threads import single_threaded


class TemporalStateMixin:
    """The temporal and subspace state of `GradientCodec`."""

    def _temporal_basis(self) -> torch.Tensor:
        """``Q`` (r x dim): orthonormal rows spanning the window, zero on the selected coordinates."""
        r = self.temporal_window
        key = (self._version, int(self.window_filled))
        if self._basis_cache is not None and self._basis_cache[0] == key:
            return self._basis_cache[1]
        q = torch.zeros(r, self.layout.dim)
        if r and int(self.window_filled) > 0:
            x = self.window.double().clone()
            x[:, self.selected] = 0
            x[:, self.lowrank_mask] = 0
            x[:, self.raw_mask] = 0
            # Gram-Schmidt twice: stable, and rows that add nothing new are left at zero
            rows = []
            for i in range(r):
                v = x[i]
                for _ in range(2):
                    for u in rows:
                        v = v - (v @ u) * u
                n = v.norm()
                if n > 1e-9 * (x[i].norm() + 1e-300) and n > 0:
                    rows.append(v / n)
            for i, u in enumerate(rows):
                q[i] = u.float()
        self._basis_cache = (key, q)
        return q

    def _prior_terms(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prior mean and low-rank factor ``V`` (dim x r) in effect for the next message."""
        mean = self.prior_mean
        filled = int(self.window_filled)
        if self.temporal_window and filled:
            w = self.window[:filled]
            if self.temporal_mean:
                mean = (1 - self.temporal_mean) * mean + self.temporal_mean * w.mean(0)
            v = w.t() * math.sqrt(self.temporal_gain / filled)
            return mean, v
        return mean, None

    @torch.no_grad()
    @single_threaded
    def observe(self, decoded) -> None:
        """Append a decoded (already released) gradient to the temporal window. Both ends call it with the
        same decoded vector, so their encoders stay identical; it uses no private data."""
        if self.lowrank_payload:
            if self._last_lowrank_q is None:
                raise RuntimeError("observe() needs a decode() first: the low-rank warm start comes from the last message")
            self.lowrank_q.copy_(self._last_lowrank_q)
            self._last_lowrank_q = None
        if self.temporal_rho > 0:
            flat, _ = self._to_flat(decoded)
            flat = flat.reshape(-1, self.layout.dim)[-1].detach()
            if self._last_posterior is None:
                raise RuntimeError("observe() needs a decode() first: the AR(1) state advances with each decoded message")
            sel, p_sel = self._last_posterior
            rho, mu, d = self.temporal_rho, self.prior_mean, self.prior_var
            # predict the next message: the mean relaxes to the stage-1 mean, the variance to the stage-1 one
            torch.lerp(mu, flat, rho, out=self.state_mean)
            torch.lerp(d, self.state_var, rho * rho, out=self.state_var)
            self.state_var[sel] = rho * rho * p_sel + (1 - rho * rho) * d[sel]
            self._last_posterior = None
            self._version += 1
            return
        if not self.temporal_window:
            return
        flat, _ = self._to_flat(decoded)
        flat = flat.reshape(-1, self.layout.dim)[-1].detach()
        self._check_finite(flat, "decoded gradient")
        self.window.copy_(torch.roll(self.window, 1, 0))
        self.window[0] = flat
        self.window_filled.fill_(min(int(self.window_filled) + 1, self.temporal_window))
        self._version += 1

    def reset_state(self) -> None:
        """Forget the temporal state (start of a new training run)."""
        self.window.zero_()
        self.window_filled.zero_()
        if self.temporal_rho > 0:
            self.state_mean.copy_(self.prior_mean)
            self.state_var.copy_(self.prior_var)
        if self.lowrank_payload:
            g = torch.Generator().manual_seed(self.seed + 1)
            self.lowrank_q.copy_(torch.randn(self.lowrank_q.shape, generator=g))
        self._last_posterior = None
        self._last_lowrank_q = None
        self._version += 1


__all__ = ["TemporalStateMixin"]
