"""GradientCodec: a linear encoder to ``k = latent_ratio * dim`` numbers and a noise-aware decoder.

Encoder. The latent is ``z = P y`` for the (noisy) gradient ``y`` with ``P`` a fixed matrix of orthonormal
rows: ``k - r`` rows select the coordinates with the largest prior variance (for a Gaussian prior with
diagonal covariance these are the MMSE-optimal linear measurements, whatever the noise level), and ``r``
rows span the last ``r`` decoded gradients (the temporal prior; ``r = temporal_window``), restricted to the
unselected coordinates so that all rows stay orthonormal and white noise stays white in the latent.
``P`` depends only on the prior and on already-decoded (released) gradients: encoding is post-processing.

Decoder. For ``y = g + n``, ``g ~ N(mu, Sigma)``, ``n ~ N(0, s^2 I)`` the posterior mean is linear:

    g_hat = mu + Sigma P^T (P Sigma P^T + s^2 I)^{-1} (z - P mu)

with ``Sigma = diag(var) + V V^T`` (``V`` the temporal directions). It is computed exactly through
Woodbury's identity in O(dim * r + k * r^2). ``s`` is the per-coordinate noise std of ``y`` (``sigma C / B``
for a DP mean gradient; ``None`` or 0 for a clean one). An optional learned residual (``decoder="mlp"``)
is trained on prior samples by `pretrain_codec` and only switched on if it beats this baseline on
held-out synthetic data.

Temporal prior, AR(1) form (``temporal_rho``, the default of ``pretrain-codec``). Every coordinate follows
``g_t - mu = rho (g_{t-1} - mu) + e_t`` with stationary variance ``var``. Sender and receiver run the same
Kalman filter on the decoded messages: the decoded gradient is ``E[g_t | all latents so far]``, exactly, and
the coordinates measured at step t are those whose posterior variance ``p`` the measurement reduces most
(largest ``p^2 / (p + s^2)``). Both are functions of public state, so nothing private enters the encoder.

Low-rank part (``lora_rank``, default 1 in ``pretrain_codec``). Coordinate selection cannot denoise LoRA
factors at realistic noise (each entry's signal is far below the noise), so part of the latent carries one
warm-started power iteration (PowerSGD) per stack of equally shaped LoRA factors: ``P = orth(M Q_prev)``,
``Q = M^T P``. ``Q`` is the next warm start at both ends; ``P Q^T`` is shrunk by its expected noise share.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .layout import LayoutMismatchError, LoraLayout
from .priors import GaussianPrior

DECODERS = ("mmse", "mlp")


@contextlib.contextmanager
def _one_thread():
    """Run the codec's few memory-bound passes on one thread. Measured on a loaded 2-core machine: one
    roundtrip at 1/64 of MiniLM's LoRA gradient took ~420 ms with a 2-thread pool (every parallel region
    waits for a descheduled thread) and 2-15 ms on one thread."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _one_thread():
            return fn(*args, **kwargs)

    return wrapper


def _check_provenance(info: dict | None) -> dict | None:
    if info is None:
        return None
    if not isinstance(info, dict) or not (info.get("public") is True or "history" in info):
        raise ValueError(f"stage1_privacy must be None, {{'public': True, ...}} or {{'history': [...]}}, got {info!r}")
    if "history" in info:
        for entry in info["history"]:
            if len(entry) != 3:
                raise ValueError(f"stage1_privacy history entries are [sigma, q, releases], got {entry!r}")
    return dict(info)


def check_latent_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0 < ratio <= 1):
        raise ValueError(f"latent_ratio must be in (0, 1] (the fraction of the gradient's size sent), got {ratio}")
    return ratio


def latent_size(dim: int, ratio: float) -> int:
    return max(1, min(dim, int(round(dim * check_latent_ratio(ratio)))))


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


class GradientCodec(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf-drencoder",
    tags=["hf-drencoder", "lora", "gradient-compression", "dr-encoder"],
    paper_url="https://arxiv.org/abs/2412.17053",
):
    """Encoder/decoder of LoRA gradients for one `LoraLayout`.

    Build one with `pretrain_codec` (from a prior) or `from_prior`; share it
    with ``save_pretrained`` / ``push_to_hub``; load it with ``from_pretrained(path, model=peft_model)``,
    which refuses a codec made for another LoRA layout.

    Args:
        layout: ``LoraLayout.to_dict()`` of the model the codec is for.
        latent_ratio: latent size over gradient size (default 1/64).
        prior_kind: name of the prior the codec was built from (informational).
        temporal_window: number of latent slots spent on the span of the last decoded gradients (0: off).
        temporal_gain: prior variance along those directions, relative to their empirical energy.
        temporal_mean: weight of the window average in the prior mean (the rest is the stage-1 mean).
        temporal_rho: > 0 switches on the AR(1) temporal prior: every coordinate follows
            ``g_t - mu = rho (g_{t-1} - mu) + fresh``, with the stage-1 variance as its stationary variance.
            Decoding is then a Kalman filter over all past latents, and the encoder measures the coordinates
            whose current uncertainty it would reduce most (excludes ``temporal_window``).
        balance: in [0, 1]; 0 measures the coordinates the prior deems most informative for the whole gradient
            (MSE-optimal), 1 ranks coordinates relative to their own tensor's typical variance, so that every
            tensor (LoRA factors as well as a dominant classifier head) gets a share of the latent.
        lora_rank: > 0 spends part of the latent on a rank-``lora_rank`` PowerSGD-style factorisation of the
            LoRA factors (all A factors of one shape stacked into one matrix, likewise B), warm-started from the
            previous message's factors, which both ends hold; the rest of the latent selects coordinates as above.
        lowrank_share: at most this share of the latent goes to the low-rank part; groups that do not fit
            (largest first) are left to coordinate selection.
        decoder: ``"mmse"`` (linear, exact for Gaussian priors) or ``"mlp"`` (MMSE plus a learned residual).
        hidden_size: width of the residual MLP.
        raw_head: send the ``modules_to_save`` tensors (the classification head) raw, as fp32 values next to the
            latent, and decode them as received; ``latent_ratio`` then applies to the LoRA factors alone, so the
            head never takes latent coordinates from them. ``payload_bytes`` counts both. ``False`` codes the whole
            gradient as one vector (the paper's setting), where a head with large gradients takes the latent.
        seed: seed of the tie-breaking among equal prior variances.
        pretrain_report: held-out losses recorded by `pretrain_codec`.
        stage1_privacy: where the prior came from, for the privacy ledger of whoever trains with the codec:
            ``{"history": [[sigma, q, releases], ...], "unit": "example"}`` when it was built from privatised
            statistics (`build_prior` records this; `DRTrainer` adds the history to its accountant),
            ``{"public": True, "reason": ...}`` after `mark_public`, ``None`` when unknown (refused for
            training on private data: the prior may encode it).
    """

    def __init__(
        self,
        layout: dict,
        latent_ratio: float = 1 / 64,
        prior_kind: str = "custom",
        temporal_window: int = 0,
        temporal_gain: float = 1.0,
        temporal_mean: float = 0.0,
        temporal_rho: float = 0.0,
        balance: float = 0.0,
        lora_rank: int = 0,
        lowrank_share: float = 0.8,
        decoder: str = "mmse",
        hidden_size: int = 256,
        raw_head: bool = True,
        seed: int = 0,
        pretrain_report: dict | None = None,
        stage1_privacy: dict | None = None,
    ):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
        self.layout = layout if isinstance(layout, LoraLayout) else LoraLayout.from_dict(layout)
        self.latent_ratio = check_latent_ratio(latent_ratio)
        self.raw_head = bool(raw_head)
        raw = torch.zeros(self.layout.dim, dtype=torch.bool)
        for b, sl in self.layout.block_slices():
            raw[sl] = self.raw_head and b.factor == "head"
        self.raw_dim = int(raw.sum())
        coded = self.layout.dim - self.raw_dim
        # the latent proper (k values, the LoRA part when the head is raw), followed by the raw values
        k = self.coded_latent_dim = latent_size(coded, latent_ratio) if coded else 0
        self.latent_dim = k + self.raw_dim
        if temporal_window < 0 or (temporal_window and temporal_window >= k):
            raise ValueError(f"temporal_window must be in [0, {k}) (the coded latent's size), got {temporal_window}")
        self.temporal_window = int(temporal_window)
        self.temporal_gain = float(temporal_gain)
        self.temporal_mean = float(temporal_mean)
        if not (0.0 <= temporal_rho < 1.0):
            raise ValueError(f"temporal_rho must be in [0, 1), got {temporal_rho}")
        if temporal_rho > 0 and temporal_window > 0:
            raise ValueError("temporal_rho (AR(1) prior) and temporal_window (span prior) are alternatives; set one")
        self.temporal_rho = float(temporal_rho)
        if not (0.0 <= balance <= 1.0):
            raise ValueError(f"balance must be in [0, 1], got {balance}")
        self.balance = float(balance)
        if decoder == "mlp" and (temporal_rho > 0 or temporal_window > 0):
            raise ValueError("the learned residual decoder is trained on the static prior; use decoder='mmse' with a temporal prior")
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        self.lora_rank = int(lora_rank)
        if not (0.0 <= lowrank_share < 1.0):
            raise ValueError(f"lowrank_share must be in [0, 1), got {lowrank_share}")
        self.lowrank_share = float(lowrank_share)
        budget = min(lowrank_share * k, k - self.temporal_window - 1)
        self._groups = _lowrank_groups(self.layout, self.lora_rank, budget) if lora_rank else []
        self.lowrank_payload = sum(g["rank"] * (g["rows"] + g["cols"]) for g in self._groups)
        if decoder == "mlp" and lora_rank:
            raise ValueError("the learned residual decoder is not available with lora_rank > 0")
        self.num_selected = k - self.temporal_window - self.lowrank_payload
        self.prior_kind = prior_kind
        self.decoder_kind = decoder
        self.seed = seed
        self.pretrain_report = pretrain_report
        self.stage1_privacy = _check_provenance(stage1_privacy)
        d = self.layout.dim
        self.register_buffer("prior_mean", torch.zeros(d))
        self.register_buffer("prior_var", torch.ones(d))
        self.register_buffer("selected", torch.arange(self.num_selected, dtype=torch.long))
        self.register_buffer("window", torch.zeros(self.temporal_window, d))
        self.register_buffer("window_filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("mlp_enabled", torch.zeros((), dtype=torch.bool))
        # per coordinate: the mean prior variance of its tensor (the reference that ``balance`` divides by)
        self.register_buffer("block_var", torch.ones(d))
        # AR(1) state: the prior (mean, variance) of the NEXT message, updated from decoded messages only
        n_state = d if temporal_rho > 0 else 0
        self.register_buffer("state_mean", torch.zeros(n_state))
        self.register_buffer("state_var", torch.zeros(n_state))
        self._last_posterior: tuple[torch.Tensor, torch.Tensor] | None = None
        # low-rank part: the warm-start right factors of every group, and which coordinates the groups cover
        self.register_buffer("lowrank_q", torch.zeros(sum(g["cols"] * g["rank"] for g in self._groups)))
        mask = torch.zeros(d, dtype=torch.bool)
        for g in self._groups:
            for off, n in g["spans"]:
                mask[off : off + n] = True
        self.register_buffer("lowrank_mask", mask, persistent=False)
        self.register_buffer("raw_mask", raw, persistent=False)
        self.register_buffer("raw_index", torch.nonzero(raw).reshape(-1), persistent=False)
        self._last_lowrank_q: torch.Tensor | None = None
        if decoder == "mlp":
            self.residual = nn.Sequential(nn.Linear(k + 1, hidden_size), nn.GELU(), nn.Linear(hidden_size, k))
        else:
            self.residual = None
        self._basis_cache: tuple[int, torch.Tensor] | None = None
        self._version = 0

    # construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_prior(cls, prior: GaussianPrior, latent_ratio: float = 1 / 64, **kwargs) -> "GradientCodec":
        """A codec whose encoder and MMSE decoder are the optimal linear ones for ``prior``."""
        if "stage1_privacy" not in kwargs and prior.meta.get("privacy_history") is not None:
            kwargs["stage1_privacy"] = {
                "history": [list(h) for h in prior.meta["privacy_history"]],
                "unit": prior.meta.get("privacy_unit", "example"),
            }
        codec = cls(layout=prior.layout.to_dict(), latent_ratio=latent_ratio, prior_kind=prior.kind, **kwargs)
        codec.set_prior(prior)
        return codec

    def set_prior(self, prior: GaussianPrior) -> None:
        self.layout.check_compatible(prior.layout, what="codec", against="prior")
        self.prior_mean.copy_(prior.mean)
        self.prior_var.copy_(prior.var)
        for b, sl in self.layout.block_slices():
            self.block_var[sl] = prior.var[sl].mean()
        # ties (the paper prior has one variance per tensor) are broken by a seeded random order
        rank = prior.var.double() / self.block_var.double() ** self.balance
        rank[self.lowrank_mask] = -1.0  # covered by the low-rank part
        rank[self.raw_mask] = -2.0  # sent raw
        order = torch.argsort(rank * self._tie_break().double(), descending=True)
        self.selected.copy_(torch.sort(order[: self.num_selected]).values)
        self._version += 1
        self.reset_state()

    # provenance -------------------------------------------------------------------------------------------
    def mark_public(self, reason: str) -> "GradientCodec":
        """Declare that the codec's prior depends on no private data of the run it is used in (e.g. it was built
        from public gradients or by hand). Training then adds no stage-1 cost. A false declaration voids the
        guarantee; ``reason`` is stored in the config and in the privacy report."""
        if not reason or not str(reason).strip():
            raise ValueError("mark_public needs a reason (what public data the prior came from)")
        self._record_config("stage1_privacy", {"public": True, "reason": str(reason)})
        return self

    @property
    def stage1_history(self) -> list[tuple[float, float, int]] | None:
        """The (sigma, q, releases) the prior cost, ``[]`` for a public codec, ``None`` when unknown."""
        if self.stage1_privacy is None:
            return None
        if self.stage1_privacy.get("public"):
            return []
        return [(float(s), float(q), int(t)) for s, q, t in self.stage1_privacy["history"]]

    # AR(1) temporal prior --------------------------------------------------------------------------------
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

    # layout checks ----------------------------------------------------------------------------------------
    def check_layout(self, model_or_layout) -> None:
        """Raise `LayoutMismatchError` unless the codec was made for this model's LoRA layout."""
        other = model_or_layout if isinstance(model_or_layout, LoraLayout) else LoraLayout.from_model(model_or_layout)
        self.layout.check_compatible(other, what="codec", against="model")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, model=None, layout=None, **kwargs):
        """``PyTorchModelHubMixin.from_pretrained``; with ``model=`` (or ``layout=``) the codec's recorded
        layout is checked against the model's LoRA layout and a mismatch is refused."""
        codec = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if model is not None or layout is not None:
            codec.check_layout(layout if layout is not None else model)
        codec._version += 1
        return codec

    @classmethod
    def _from_pretrained(cls, **kwargs):
        # a codec saved before ``raw_head`` existed coded the head in its latent: load it as it was saved
        kwargs.setdefault("raw_head", False)
        return super()._from_pretrained(**kwargs)

    def generate_model_card(self, *args, **kwargs):
        """The README.md that ``save_pretrained`` / ``push_to_hub`` write: stage-1 privacy cost, layout, links."""
        from .card import codec_model_card

        return codec_model_card(self)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._version += 1  # the temporal basis cache is stale after new buffers
        return result

    def _record_config(self, key: str, value) -> None:
        setattr(self, key, value)
        if isinstance(getattr(self, "_hub_mixin_config", None), dict):
            self._hub_mixin_config[key] = value

    # sizes ------------------------------------------------------------------------------------------------
    @property
    def payload_bytes(self) -> int:
        """Bytes of one message as it leaves a party per step: the fp32 latent and, with ``raw_head``, the fp32
        head values sent next to it (every byte that leaves the party counted, head included)."""
        return 4 * self.latent_dim

    # structure helpers ------------------------------------------------------------------------------------
    def _to_flat(self, grads) -> tuple[torch.Tensor, bool]:
        if isinstance(grads, torch.Tensor):
            if grads.shape[-1] != self.layout.dim:
                raise LayoutMismatchError(
                    f"gradient vector has {grads.shape[-1]} values but the codec's {self.layout.describe()} has {self.layout.dim}"
                )
            return grads.float(), False
        grads = list(grads)
        if len(grads) != len(self.layout.blocks):
            raise LayoutMismatchError(
                f"got {len(grads)} gradient tensors but the codec's {self.layout.describe()} has {len(self.layout.blocks)}"
            )
        return self.layout.flatten(grads), True

    @staticmethod
    def _check_finite(t: torch.Tensor, what: str) -> None:
        # one reduction: a NaN or an inf anywhere makes the sum NaN or inf
        if not math.isfinite(float(t.sum(dtype=torch.float64))):
            raise ValueError(f"{what} contains NaN or inf values")

    @staticmethod
    def _noise_var(noise_std) -> float:
        if noise_std is None:
            return 0.0
        s = float(noise_std)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"noise_std must be >= 0 and finite, got {noise_std}")
        return s * s

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

    # the codec --------------------------------------------------------------------------------------------
    @torch.no_grad()
    @_single_threaded
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

    @torch.no_grad()
    @_single_threaded
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

    @torch.no_grad()
    @_single_threaded
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

    @_single_threaded
    def roundtrip(self, grads: Sequence[torch.Tensor], noise_std: float | None = None, observe: bool = True) -> list[torch.Tensor]:
        """Encode then decode per-parameter gradients (what one private step sends and receives); with
        ``observe`` the decoded gradient also enters the temporal window. Returns tensors shaped like the input."""
        grads = list(grads)
        latent = self.encode(grads, noise_std)
        out = self.decode(latent, noise_std)
        if observe:
            self.observe(out)
        return [t.to(dtype=g.dtype, device=g.device) for t, g in zip(self.layout.unflatten(out), grads)]

    def forward(self, grads, noise_std: float | None = None):
        return self.decode(self.encode(grads, noise_std), noise_std)

    def extra_repr(self) -> str:
        return (
            f"dim={self.layout.dim}, latent_dim={self.latent_dim}, raw_dim={self.raw_dim}, prior={self.prior_kind}, "
            f"temporal_window={self.temporal_window}, temporal_rho={self.temporal_rho}, lora_rank={self.lora_rank}, decoder={self.decoder_kind}, layout={self.layout.fingerprint}"
        )


__all__ = ["DECODERS", "GradientCodec", "check_latent_ratio", "latent_size"]
