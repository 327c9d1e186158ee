"""The noise-aware decoder of `GradientCodec`: the posterior mean of the clean gradient given the latent.

For ``y = g + n``, ``g ~ N(mu, Sigma)``, ``n ~ N(0, s^2 I)`` the posterior mean is linear:

    g_hat = mu + Sigma P^T (P Sigma P^T + s^2 I)^{-1} (z - P mu)

with ``Sigma = diag(var) + V V^T`` (``V`` the temporal directions). It is computed exactly through Woodbury's
identity in O(dim * r + k * r^2). ``s`` is the per-coordinate noise std of ``y`` (``sigma C / B`` for a DP mean
gradient; ``None`` or 0 for a clean one). With the AR(1) prior the decoder is the Kalman update of the state
(`.temporal`); the low-rank part is ``P Q^T`` shrunk by its expected noise share; raw values (the head) are
returned as received. Directions a message does not measure decode to the prior mean, which `build_prior` keeps
only where the release shows it above its noise (zero elsewhere). An optional learned residual
(``decoder="mlp"``) is trained on prior samples by `pretrain_codec` and only switched on if it beats this
baseline on held-out synthetic data.
"""

from __future__ import annotations

import math

import torch

from .measurement import _unstack
from .threads import single_threaded


class DecoderMixin:
    """The decoder half of `GradientCodec`."""

    @torch.no_grad()
    @single_threaded
    def decode(self, latent: torch.Tensor, noise_std: float | None = None, as_tensors: bool = False):
        """Posterior-mean estimate of the clean gradient from a latent whose input had noise ``noise_std``
        per coordinate. Returns ``[dim]`` / ``[n, dim]``, or per-parameter tensors with ``as_tensors``."""
        latent = latent.float()
        if latent.shape[-1] != self.latent_dim:
            raise ValueError(f"latent has {latent.shape[-1]} values, the codec's latent has {self.latent_dim}")
        self._check_finite(latent, "latent")
        s2 = self._noise_var(noise_std)
        squeeze = latent.dim() == 1
        out = self._decode_batch(latent.reshape(-1, self.latent_dim), s2, self.residual is not None and bool(self.mlp_enabled))
        if squeeze:
            out = out[0]
        return self.layout.unflatten(out) if as_tensors else out

    def _decode_batch(self, z: torch.Tensor, s2: float, use_residual: bool) -> torch.Tensor:
        """``[n, latent_dim]`` latents to ``[n, dim]`` estimates; the raw values are returned as received."""
        z, z_raw = z[:, : self.coded_latent_dim], z[:, self.coded_latent_dim :]
        if self.lowrank_payload:
            z, z_lr = z[:, : -self.lowrank_payload], z[:, -self.lowrank_payload :]
        if self.temporal_rho > 0:
            out = self._decode_kalman(z, s2)
        else:
            out = self._decode_linear(z, s2)
        if self.lowrank_payload:
            self._lowrank_decode(z_lr, s2, out)
        if use_residual:
            out = out + self._residual(z, self._prior_terms()[0], s2)
        if self.raw_dim:
            out[:, self.raw_index] = z_raw
        return out

    def _lowrank_decode(self, z_lr: torch.Tensor, s2: float, out: torch.Tensor) -> None:
        """Write ``P Q^T`` of every group into ``out``, shrunk by the share of it that is noise.

        With ``P`` fixed, ``P P^T N`` keeps ``s^2 r cols`` of noise energy; ``P`` is computed from the noisy
        matrix through the warm start (``N Q_prev``), which adds up to about ``s^2 r rows``. The estimate
        ``s^2 r (rows + cols)`` (the noise of the ``r (rows + cols)`` numbers sent) is subtracted by the factor
        ``1 - that / ||P Q^T||^2``, floored at 0 (James-Stein)."""
        for i, row in enumerate(z_lr):
            off, qs = 0, []
            for g in self._groups:
                r, rows, cols = g["rank"], g["rows"], g["cols"]
                p = row[off : off + rows * r].reshape(rows, r)
                off += rows * r
                q = row[off : off + cols * r].reshape(cols, r)
                off += cols * r
                qs.append(q.reshape(-1))
                m = p @ q.t()
                energy = float(m.pow(2).sum())
                noise = s2 * r * (rows + cols)
                shrink = max(0.0, 1.0 - noise / energy) if energy > 0 else 0.0
                _unstack(m * shrink, g, out[i])
            self._last_lowrank_q = torch.cat(qs)

    def _decode_kalman(self, z: torch.Tensor, s2: float) -> torch.Tensor:
        """Kalman update of the AR(1) state with the measured coordinates: exact MMSE given all latents so far."""
        sel = self._kalman_selection(s2)
        m, p = self.state_mean, self.state_var
        jitter = 1e-9 * float(self.prior_var.mean())
        gain = p[sel] / (p[sel] + s2 + jitter)
        out = m.expand(z.shape[0], -1).clone()
        out[:, sel] = m[sel] + gain * (z - m[sel])
        # posterior variance: p off the measured coordinates, p (1 - gain) on them
        self._last_posterior = (sel, p[sel] * (1 - gain))
        return out

    def _decode_linear(self, z: torch.Tensor, s2: float) -> torch.Tensor:
        """The exact posterior mean (MMSE) for latents ``z`` ([n, k]) at noise variance ``s2``."""
        mean, v = self._prior_terms()
        sel, d = self.selected, self.prior_var
        ks = self.num_selected
        # a tiny jitter keeps the clean case (s = 0) well posed where a variance is ~0
        jitter = 1e-9 * float(d.mean())
        d_sel = d[sel] + s2 + jitter
        e_sel = z[:, :ks] - mean[sel]
        if self.temporal_window:
            q = self._temporal_basis()
            e_tmp = z[:, ks:] - mean @ q.t()
            qd = q * d
            a_tmp = qd @ q.t() + (s2 + jitter) * torch.eye(self.temporal_window)
            a_tmp_inv = torch.linalg.inv(a_tmp.double()).float()

            def a_inv(x):  # A = blockdiag(diag(d_S) + s^2, Q diag(d) Q^T + s^2 I)
                return torch.cat([x[:, :ks] / d_sel, x[:, ks:] @ a_tmp_inv.t()], 1)

            e = torch.cat([e_sel, e_tmp], 1)
            w = a_inv(e)
            if v is not None:
                pv = torch.cat([v[sel], q @ v], 0)  # P V, k x m
                ainv_pv = a_inv(pv.t()).t()  # A^{-1} P V
                inner = torch.eye(v.shape[1]) + pv.t() @ ainv_pv
                w = w - (w @ pv) @ torch.linalg.inv(inner.double()).float().t() @ ainv_pv.t()
            pt_w = torch.zeros(z.shape[0], self.layout.dim)
            pt_w[:, sel] = w[:, :ks]
            pt_w = pt_w + w[:, ks:] @ q
            out = mean + d * pt_w
            if v is not None:
                out = out + (w @ pv) @ v.t()
        else:
            out = mean.expand(z.shape[0], -1).clone()
            out[:, sel] = mean[sel] + d[sel] / d_sel * e_sel
        return out

    def _residual(self, z: torch.Tensor, mean: torch.Tensor, s2: float) -> torch.Tensor:
        """Learned correction on the selected coordinates, in units of their prior std."""
        sel, ks = self.selected, self.num_selected
        scale = (self.prior_var[sel] + s2).sqrt()
        zz = torch.zeros(z.shape[0], self.coded_latent_dim)
        zz[:, :ks] = (z[:, :ks] - mean[sel]) / scale
        feat = torch.cat([zz, torch.full((z.shape[0], 1), math.log10(s2 + 1e-30) / 10)], 1)
        corr = self.residual(feat)[:, :ks] * self.prior_var[sel].sqrt()
        out = torch.zeros(z.shape[0], self.layout.dim)
        out[:, sel] = corr
        return out


__all__ = ["DecoderMixin"]
