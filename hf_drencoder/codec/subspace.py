"""A codec whose subspace follows training: each step's message measures the gradient along directions both ends
derive from already released (decoded) gradients, plus fresh random directions from a public seed.

Per part of the gradient (the LoRA factors, and the head with any other ``modules_to_save`` tensor, each with its own
budget ``round(latent_ratio * part size)``), the step-``t`` encoder is the orthonormal ``d x k`` basis ``U_t``:

- **history** (at most ``history`` directions): the running mean (EMA, ``momentum``) of the decoded gradients, and the
  last ``history - 1`` decoded gradients, orthonormalised. They carry the directions training keeps using;
- **exploration** (the rest): a random sketch, fresh each step from ``hash(seed, step, part)``: every coordinate goes to
  one of the ``r`` columns with a random sign (balanced buckets, so the columns are orthonormal), made orthogonal to the
  history. New directions enter through it: what it measures joins the history at the next step.

The message is ``z = U_t^T g`` (``k`` values); the receiver decodes the projection ``U_t z`` (exact least squares on
the sketch, via Woodbury: the orthogonalised sketch columns are not exactly orthonormal). A projection on ``r`` random
directions keeps ``r / (d - h)`` of what lies outside the history, in expectation: with ``scale="unbiased"`` the
decoder multiplies the sketch part by ``(d - h) / r``, so that the decoded update is unbiased there (what a server
learning rate, as in FedAvg, needs; an optimizer that normalises its steps, as Adam, does not).

``U_t`` depends on nothing but the public seed and earlier released messages, so it is a fixed linear map during a
step. With ``noise_space="latent"`` each example's latent ``U_t^T g_i`` is clipped to ``C`` and the Gaussian noise is
added in ``k`` dimensions instead of ``d``: the noise norm falls by ``sqrt(d / k)``, the signal by whatever of the
gradient lies outside ``U_t``. The accountant is unchanged (the same sampled Gaussian mechanism, sensitivity ``C``).
The state (EMA, recent decoded gradients) is post-processing of released messages: no privacy cost, and the codec
uses no data (``stage1_history == []``).
"""

from __future__ import annotations

import hashlib

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .codec import GradientCodec, check_latent_ratio, latent_size
from .interface import PublicCodecMixin
from .layout import LoraLayout
from .threads import single_threaded

PARTS = ("lora", "head")
# head_share="auto": half of the budget to a coded head at latent ratios from 1/64 up, in proportion to size below.
# Measured in central training on the demo task at epsilon 8 (docs/codec.md, "In training"): half on the head beat the
# split in proportion to size at 1/4, 1/16 and 1/64 of the bytes and lost to it at 1/256.
AUTO_HEAD_SHARE, AUTO_HEAD_SHARE_MIN_RATIO = 0.5, 1 / 64


def resolve_head_share(head_share, latent_ratio: float) -> float | None:
    """The head's share of the budget that ``head_share`` means at ``latent_ratio`` (None: in proportion to size)."""
    if head_share is None:
        return None
    if head_share == "auto":
        return AUTO_HEAD_SHARE if latent_ratio >= AUTO_HEAD_SHARE_MIN_RATIO * (1 - 1e-9) else None
    if isinstance(head_share, bool) or not isinstance(head_share, (int, float)):
        raise ValueError(f"head_share must be 'auto', None (in proportion to size) or a number in (0, 1); got {head_share!r}")
    return float(head_share)


class SubspaceCodec(
    PublicCodecMixin,
    nn.Module,
    PyTorchModelHubMixin,
    library_name="hf-drencoder",
    tags=["hf-drencoder", "lora", "gradient-compression", "subspace-codec"],
):
    """Encoder/decoder over a subspace that follows training (see the module docstring).

    Args:
        layout: ``LoraLayout.to_dict()`` (or a `LoraLayout`) of the model.
        latent_ratio: values sent per value of each part (the LoRA factors; the head), at least one per part.
        history: directions kept from released gradients (the EMA and the last ``history - 1``); 0 turns the history
            off (a fresh random sketch every step).
        momentum: EMA factor of the decoded gradients.
        head: ``"coded"`` (the head has its own budget, as above) or ``"raw"`` (sent as fp32 values and counted).
        head_share: with a coded head, the share of the same total budget that goes to the head: ``"auto"`` (the
            default: 0.5 at latent ratios from 1/64 up, in proportion to size below, as measured best), ``None`` (in
            proportion to its size, the default before ``"auto"``) or a number in (0, 1).
        seed: public seed of the random part (both ends derive each step's sketch from it; never the noise seed).
        scale: ``"projection"`` (decode the projection ``U_t z``) or ``"unbiased"`` (the sketch part multiplied by
            ``(d - h) / r``: unbiased outside the history, and its noise multiplied by the same factor).
    """

    kind = "subspace"
    lora_rank = 0  # no data-dependent power iteration: the encoder is a fixed linear map within a step
    clips_in_latent = True  # federated parties clip and noise the latent of their update (one round, one map)
    prior_kind = "subspace"

    def __init__(self, layout: dict, latent_ratio: float = 1 / 64, history: int = 4, momentum: float = 0.9,
                 head: str = "coded", head_share: float | str | None = "auto", seed: int = 0, scale: str = "projection"):
        super().__init__()
        if head not in ("coded", "raw"):
            raise ValueError(f"head must be 'coded' or 'raw', got {head!r}")
        if scale not in ("projection", "unbiased"):
            raise ValueError(f"scale must be 'projection' or 'unbiased', got {scale!r}")
        self.scale = scale
        if int(history) < 0:
            raise ValueError(f"history must be >= 0, got {history}")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.layout = layout if isinstance(layout, LoraLayout) else LoraLayout.from_dict(layout)
        self.latent_ratio = check_latent_ratio(latent_ratio)
        self.history, self.momentum, self.head, self.seed = int(history), float(momentum), head, int(seed)
        is_lora = torch.zeros(self.layout.dim, dtype=torch.bool)
        for b, sl in self.layout.block_slices():
            is_lora[sl] = b.factor.startswith("lora")
        index = {"lora": torch.nonzero(is_lora).reshape(-1), "head": torch.nonzero(~is_lora).reshape(-1)}
        self.parts = [p for p in PARTS if index[p].numel()]
        self.coded_parts = [p for p in self.parts if not (p == "head" and head == "raw")]
        for p in self.parts:
            self.register_buffer(f"index_{p}", index[p], persistent=False)
        self.budget = {p: latent_size(index[p].numel(), self.latent_ratio) for p in self.coded_parts}
        share = resolve_head_share(head_share, self.latent_ratio)
        if head_share == "auto" and len(self.coded_parts) < 2:
            share = None  # no coded head (head="raw", or no modules_to_save), or no LoRA part: nothing to split
        self.head_share = share  # the share in force (None: in proportion to size)
        if share is not None:
            if not 0.0 < share < 1.0 or len(self.coded_parts) < 2:
                raise ValueError(f"head_share must be in (0, 1), with a coded head and LoRA part; got {head_share}")
            total = sum(self.budget.values())  # the same bytes, split differently
            k_head = min(index["head"].numel(), max(1, round(share * total)))
            self.budget = {"lora": max(1, total - k_head), "head": k_head}
        self.raw_dim = index["head"].numel() if "head" in self.parts and head == "raw" else 0
        self.latent_dim = sum(self.budget.values()) + self.raw_dim
        # state: released (decoded) gradients only
        self.register_buffer("ema", torch.zeros(self.layout.dim))
        self.register_buffer("recent", torch.zeros(max(self.history - 1, 0), self.layout.dim))
        self.register_buffer("state_step", torch.zeros((), dtype=torch.long))
        self.stage1_privacy = {"public": True, "reason": "subspace codec: a public seed and released gradients only"}
        self._cache = None

    @classmethod
    def for_model(cls, model_or_layout, latent_ratio: float = 1 / 64, **kwargs) -> "SubspaceCodec":
        """A fresh codec for a PEFT model's trainable layout (or a `LoraLayout`)."""
        layout = model_or_layout if isinstance(model_or_layout, LoraLayout) else LoraLayout.from_model(model_or_layout)
        return cls(layout.to_dict(), latent_ratio, **kwargs)

    # the interface of GradientCodec -------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.state_step)


    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, model=None, layout=None, **kwargs):
        """``PyTorchModelHubMixin.from_pretrained`` (state included); with ``model=`` (or ``layout=``) a codec saved
        for another LoRA layout is refused."""
        codec = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if model is not None or layout is not None:
            codec.check_layout(layout if layout is not None else model)
        return codec

    def reset_state(self) -> None:
        self.ema.zero_()
        self.recent.zero_()
        self.state_step.zero_()
        self._cache = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._cache = None
        return result

    # the step's basis ---------------------------------------------------------------------------------------
    def _history_basis(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Orthonormal columns spanning the EMA and the recent decoded gradients of one part (at most k - 1 of them,
        so that one direction always explores; all k when k == 1 and there is a history)."""
        cols = [v[idx] for v in [self.ema, *self.recent] if float(v[idx].abs().max()) > 0]
        cap = min(self.history, k - 1 if k > 1 else 1)
        if not cols or cap == 0:
            return torch.zeros(idx.numel(), 0, device=self.ema.device)
        q, r = torch.linalg.qr(torch.stack(cols[:cap], 1))
        keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()
        return q[:, keep]

    def _sketch(self, part: str, d: int, r: int):
        """This step's random columns: bucket and signed weight of every coordinate (a public per-step seed)."""
        h = hashlib.sha256(f"subspace:{self.seed}:{self.step}:{part}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h[:7], "big"))
        bucket = torch.randperm(d, generator=g) % r
        sign = torch.randint(0, 2, (d,), generator=g).float() * 2 - 1
        counts = torch.bincount(bucket, minlength=r).float()
        dev = self.ema.device
        return bucket.to(dev), (sign / counts[bucket].sqrt()).to(dev)

    def _basis(self) -> dict:
        if self._cache is not None and self._cache[0] == self.step:
            return self._cache[1]
        out = {}
        for p in self.coded_parts:
            idx, k = getattr(self, f"index_{p}"), self.budget[p]
            qh = self._history_basis(idx, k)
            r = k - qh.shape[1]
            bucket, w = self._sketch(p, idx.numel(), r) if r else (None, None)
            gain = (idx.numel() - qh.shape[1]) / r if r and self.scale == "unbiased" else 1.0
            entry = {"qh": qh, "r": r, "bucket": bucket, "w": w, "gain": gain}
            if r:
                wmat = self._sketch_t(qh.t(), entry)  # Q_h^T S: h x r
                gram = torch.eye(qh.shape[1], device=qh.device) - wmat @ wmat.t()
                entry["wmat"], entry["inner"] = wmat, torch.linalg.inv(gram) if qh.shape[1] else gram
            out[p] = entry
        self._cache = (self.step, out)
        return out

    @staticmethod
    def _sketch_t(y: torch.Tensor, e: dict) -> torch.Tensor:
        """S^T y for y of shape (..., d): signed bucket sums."""
        out = torch.zeros(*y.shape[:-1], e["r"], dtype=y.dtype)
        return out.index_add_(-1, e["bucket"], y * e["w"])

    # encode / decode ----------------------------------------------------------------------------------------
    @torch.no_grad()
    @single_threaded
    def encode(self, grads, noise_std: float | None = None) -> torch.Tensor:
        """The latent ``U_t^T g`` of a gradient (flat ``(..., dim)`` or per-tensor list); linear in ``g``."""
        flat, _ = self._to_flat(grads)
        GradientCodec._check_finite(flat, "gradient")
        parts = []
        for p, e in self._basis().items():
            y = flat[..., getattr(self, f"index_{p}")]
            zh = y @ e["qh"]
            parts.append(zh)
            if e["r"]:
                parts.append(self._sketch_t(y, e) - zh @ e["wmat"])  # S'^T y, S' = (I - Q_h Q_h^T) S
        if self.raw_dim:
            parts.append(flat[..., self.index_head])
        return torch.cat(parts, -1)

    @torch.no_grad()
    @single_threaded
    def decode(self, latent: torch.Tensor, noise_std: float | None = None, as_tensors: bool = False):
        """The projection ``U_t z`` (least squares on the sketch part); ``noise_std`` is accepted for the interface."""
        latent = latent.float()
        if latent.shape[-1] != self.latent_dim:
            raise ValueError(f"latent has {latent.shape[-1]} values, this subspace codec's message has {self.latent_dim}")
        GradientCodec._check_finite(latent, "latent")
        out = torch.zeros(*latent.shape[:-1], self.layout.dim, device=latent.device)
        off = 0
        for p, e in self._basis().items():
            h = e["qh"].shape[1]
            zh, off = latent[..., off : off + h], off + h
            g = zh @ e["qh"].t()
            if e["r"]:
                zr, off = latent[..., off : off + e["r"]], off + e["r"]
                if h:  # (S'^T S')^{-1} = I + W^T (I - W W^T)^{-1} W
                    zr = zr + (zr @ e["wmat"].t()) @ e["inner"].t() @ e["wmat"]
                g = g + e["gain"] * (zr[..., e["bucket"]] * e["w"] - (zr @ e["wmat"].t()) @ e["qh"].t())
            out[..., getattr(self, f"index_{p}")] = g
        if self.raw_dim:
            out[..., self.index_head] = latent[..., off:]
        return self.layout.unflatten(out) if as_tensors else out

    @torch.no_grad()
    def observe(self, decoded) -> None:
        """A message was released: its decoded gradient joins the history, and the next step draws a new sketch."""
        flat, _ = self._to_flat(decoded if isinstance(decoded, torch.Tensor) else list(decoded))
        flat = flat.reshape(-1).to(self.ema.device)
        self.ema.mul_(self.momentum).add_(flat, alpha=1 - self.momentum)
        if self.recent.shape[0]:
            self.recent.copy_(torch.cat([flat[None], self.recent[:-1]]))
        self.state_step += 1
        self._cache = None

    def forward(self, grads, noise_std: float | None = None):
        return self.decode(self.encode(grads, noise_std), noise_std)

    def extra_repr(self) -> str:
        return (f"dim={self.layout.dim}, latent_dim={self.latent_dim}, budget={self.budget}, history={self.history}, "
                f"head={self.head}, scale={self.scale}, layout={self.layout.fingerprint}")


__all__ = ["SubspaceCodec"]
