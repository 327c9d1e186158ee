"""GradientCodec: a linear encoder of LoRA gradients to ``k = latent_ratio * dim`` numbers and a noise-aware decoder.

The class composes three stages, one file each:

- `.measurement`: what a message measures (the encoder): coordinates of largest prior variance, the span of past
  decoded gradients, or a warm-started power iteration of the LoRA factors (``lora_rank``);
- `.decoder`: the posterior mean of the clean gradient given the latent and the noise level;
- `.temporal`: the state carried across steps (AR(1) Kalman state, window, warm start), from decoded messages only.

This file holds the configuration, the buffers, the prior, provenance and the Hub interface. With ``raw_head`` (the
default) the ``modules_to_save`` tensors travel raw next to the latent and ``latent_ratio`` applies to the LoRA part.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .decoder import DecoderMixin
from .layout import LayoutMismatchError, LoraLayout
from .measurement import MeasurementMixin, _lowrank_groups
from .priors import GaussianPrior
from .temporal import TemporalStateMixin
from .threads import single_threaded

DECODERS = ("mmse", "mlp")


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


class GradientCodec(
    MeasurementMixin,
    DecoderMixin,
    TemporalStateMixin,
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
        # coordinates left to measure one by one: neither sent raw nor covered by the low-rank part. Where the
        # low-rank part covers every LoRA factor the latent is that much shorter (only numbers sent are counted)
        free = coded - sum(n for g in self._groups for _, n in g["spans"])
        self.num_selected = max(0, min(k - self.temporal_window - self.lowrank_payload, free))
        self.coded_latent_dim = self.num_selected + self.temporal_window + self.lowrank_payload
        self.latent_dim = self.coded_latent_dim + self.raw_dim
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
        self._select_coordinates()
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

    # the codec --------------------------------------------------------------------------------------------

    @single_threaded
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
