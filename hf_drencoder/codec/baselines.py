"""Baseline compressors with the interface of `GradientCodec`, to compare against at equal uplink bytes.

Each one takes the step's released (noised) LoRA gradient and returns the estimate the receiver applies; the
``modules_to_save`` tensors (the head) travel raw next to the payload by default, as with `GradientCodec`
(``raw_head=False``: coded with the rest, for comparisons at a total byte budget), and
``payload_bytes`` counts every byte that leaves the party, head included. None of them uses a prior or any data
of its own, so they add nothing to the privacy ledger (``stage1_history`` is ``[]``).

- `RandomProjectionCodec`: ``z = P y`` with ``P`` a fresh ``k x n`` standard Gaussian matrix every step, drawn from a
  seed both ends derive from the public run seed and the step number (never from the noise seed). The receiver
  decodes ``P^T z / k``, which is unbiased: ``E[P^T P] = k I``.
- `TopKCodec`: the ``k/2`` largest entries of the released gradient plus what earlier steps did not send (error
  feedback at the sender), as ``k/2`` values and ``k/2`` int32 indices: ``4 k`` bytes, like a latent of ``k``.
- `PowerSGDCodec`: one warm-started power iteration of rank ``rank`` per stack of equally shaped LoRA factors (as
  PowerSGD), with error feedback at the sender; its bytes follow from the rank, ``4 rank (rows + cols)`` per stack.

Top-k and PowerSGD select and remember what to send from the noised release: post-processing of the private
gradient (what is kept back for later steps is noise included), so they cost no privacy. They are not linear maps
of their input, so they serve ``noise_space="gradient"`` only, one message at a time.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from .codec import GradientCodec, check_latent_ratio, latent_size
from .interface import PublicCodecMixin
from .layout import LoraLayout
from .measurement import _lowrank_groups, _stack, _unstack

BASELINES = ("random-projection", "top-k", "powersgd")


class BaselineCodec(PublicCodecMixin, nn.Module):
    """What the baselines share: the layout, the raw head, the byte count and the message interface."""

    kind = "baseline"
    lora_rank = 0
    raw_head = True

    def __init__(self, layout, latent_ratio: float = 1 / 64, seed: int = 0, raw_head: bool = True):
        super().__init__()
        self.layout = layout if isinstance(layout, LoraLayout) else LoraLayout.from_dict(layout)
        self.latent_ratio = check_latent_ratio(latent_ratio)
        self.seed = int(seed)
        self.raw_head = bool(raw_head)
        raw = torch.zeros(self.layout.dim, dtype=torch.bool)
        for b, sl in self.layout.block_slices():
            raw[sl] = raw_head and b.factor == "head"
        self._set_raw(raw)
        self.budget = latent_size(self.coded_dim, latent_ratio) if self.coded_dim else 0
        self.prior_kind = self.kind
        self.stage1_privacy = {"public": True, "reason": f"{self.kind}: a compressor that uses no data"}
        self.step = 0

    def _set_raw(self, raw: torch.Tensor) -> None:
        self.register_buffer("raw_index", torch.nonzero(raw).reshape(-1), persistent=False)
        self.register_buffer("coded_index", torch.nonzero(~raw).reshape(-1), persistent=False)
        self.raw_dim, self.coded_dim = self.raw_index.numel(), self.coded_index.numel()

    # the interface GradientCodec's users rely on -------------------------------------------------------------
    payload_values = 0  # set by each baseline: numbers sent besides the raw head

    @property
    def latent_dim(self) -> int:
        return self.payload_values + self.raw_dim


    @torch.no_grad()
    def encode(self, grads, noise_std: float | None = None) -> torch.Tensor:
        flat, _ = self._to_flat(grads)
        GradientCodec._check_finite(flat, "gradient")
        return torch.cat([self._encode(flat[..., self.coded_index]), flat[..., self.raw_index]], -1)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, noise_std: float | None = None, as_tensors: bool = False):
        """The receiver's estimate; ``noise_std`` is accepted for the interface and not used (no noise model)."""
        latent = latent.float()
        if latent.shape[-1] != self.latent_dim:
            raise ValueError(f"latent has {latent.shape[-1]} values, the {self.kind} message has {self.latent_dim}")
        out = torch.zeros(*latent.shape[:-1], self.layout.dim)
        out[..., self.coded_index] = self._decode(latent[..., : self.payload_values])
        out[..., self.raw_index] = latent[..., self.payload_values :]
        return self.layout.unflatten(out) if as_tensors else out

    def observe(self, decoded) -> None:
        """The message is out: the next step uses fresh public per-step state."""
        self.step += 1

    def reset_state(self) -> None:
        self.step = 0

    def save_pretrained(self, folder: str) -> None:
        """A record of the configuration (``baseline.json``); a baseline cannot be resumed from it."""
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "baseline.json"), "w") as f:
            json.dump({"baseline": self.kind, "latent_ratio": self.latent_ratio, "seed": self.seed,
                       "step": self.step, "payload_bytes": self.payload_bytes}, f, indent=1)

    def _one_message(self, y: torch.Tensor) -> None:
        if y.dim() != 1:
            raise ValueError(f"the {self.kind} baseline keeps sender state (error feedback): encode one message at a time")

    def extra_repr(self) -> str:
        return f"dim={self.layout.dim}, payload_bytes={self.payload_bytes}, raw_dim={self.raw_dim}"


class RandomProjectionCodec(BaselineCodec):
    """``k`` Gaussian measurements, a fresh matrix every step from a public per-step seed; unbiased decoding."""

    kind = "random-projection"
    _CHUNK = 256  # rows of P drawn at a time (P itself, k x n, is never held)

    def __init__(self, layout, latent_ratio: float = 1 / 64, seed: int = 0, raw_head: bool = True):
        super().__init__(layout, latent_ratio, seed, raw_head)
        self.payload_values = self.budget

    def step_seed(self) -> int:
        """The seed of this step's matrix: a hash of the public run seed and the step, known to both ends."""
        return int.from_bytes(hashlib.sha256(f"random-projection:{self.seed}:{self.step}".encode()).digest()[:7], "big")

    def _rows(self):
        g = torch.Generator().manual_seed(self.step_seed())
        for start in range(0, self.payload_values, self._CHUNK):
            yield start, torch.randn(min(self._CHUNK, self.payload_values - start), self.coded_dim, generator=g)

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y @ p.t() for _, p in self._rows()], -1)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*z.shape[:-1], self.coded_dim)
        for start, p in self._rows():
            out += z[..., start : start + p.shape[0]] @ p
        return out / self.payload_values


class TopKCodec(BaselineCodec):
    """The largest entries of (released gradient + what was not sent before), as values and int32 indices."""

    kind = "top-k"

    def __init__(self, layout, latent_ratio: float = 1 / 64, seed: int = 0, raw_head: bool = True):
        super().__init__(layout, latent_ratio, seed, raw_head)
        if self.coded_dim >= 2**24:
            raise ValueError("top-k indices travel as float32 in the latent: at most 2^24 coordinates")
        self.num_values = max(1, self.budget // 2)
        self.payload_values = 2 * self.num_values  # values, then indices (4 bytes each)
        self.register_buffer("error", torch.zeros(self.coded_dim))

    def _encode(self, y: torch.Tensor) -> torch.Tensor:
        self._one_message(y)
        u = y + self.error
        idx = torch.topk(u.abs(), self.num_values).indices
        vals = u[idx]
        self.error.copy_(u)
        self.error[idx] = 0.0  # error feedback: what is not sent now is added to the next step's gradient
        return torch.cat([vals, idx.float()])

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(*z.shape[:-1], self.coded_dim)
        vals, idx = z[..., : self.num_values], z[..., self.num_values :].long()
        return out.scatter_(-1, idx, vals)

    def reset_state(self) -> None:
        super().reset_state()
        self.error.zero_()


class PowerSGDCodec(BaselineCodec):
    """Rank-``rank`` PowerSGD per stack of equally shaped LoRA factors, with error feedback at the sender."""

    kind = "powersgd"

    def __init__(self, layout, rank: int = 1, seed: int = 0):
        layout = layout if isinstance(layout, LoraLayout) else LoraLayout.from_dict(layout)
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        groups = _lowrank_groups(layout, int(rank), float("inf"))
        super().__init__(layout, 1.0, seed)
        self.rank = int(rank)
        covered = torch.zeros(layout.dim, dtype=torch.bool)
        for g in groups:
            for off, n in g["spans"]:
                covered[off : off + n] = True
        self._set_raw(~covered)  # the head, and any tensor that is not a LoRA matrix, travel raw
        self._groups = groups
        self.payload_values = sum(g["rank"] * (g["rows"] + g["cols"]) for g in groups)
        self.latent_ratio = self.payload_values / max(self.coded_dim, 1)
        self.register_buffer("error", torch.zeros(layout.dim))
        self.register_buffer("warm_q", torch.zeros(sum(g["cols"] * g["rank"] for g in groups)))
        self.reset_state()

    def encode(self, grads, noise_std: float | None = None) -> torch.Tensor:
        flat, _ = self._to_flat(grads)
        self._one_message(flat)
        GradientCodec._check_finite(flat, "gradient")
        u = flat + self.error
        parts, approx, off = [], torch.zeros_like(u), 0
        for g in self._groups:
            r, c = g["rank"], g["cols"]
            m = _stack(u, g)
            p = torch.linalg.qr(m @ self.warm_q[off : off + c * r].reshape(c, r)).Q
            q = m.t() @ p
            self.warm_q[off : off + c * r] = q.reshape(-1)
            off += c * r
            _unstack(p @ q.t(), g, approx)
            parts += [p.reshape(-1), q.reshape(-1)]
        self.error.copy_(u - approx)
        self.error[self.raw_index] = 0.0  # sent raw: nothing kept back
        return torch.cat(parts + [flat[self.raw_index]])

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        full, off = torch.zeros(self.layout.dim), 0
        for g in self._groups:
            r, rows, cols = g["rank"], g["rows"], g["cols"]
            p = z[off : off + rows * r].reshape(rows, r)
            q = z[off + rows * r : off + (rows + cols) * r].reshape(cols, r)
            off += (rows + cols) * r
            _unstack(p @ q.t(), g, full)
        return full[self.coded_index]

    def reset_state(self) -> None:
        super().reset_state()
        self.error.zero_()
        g = torch.Generator().manual_seed(self.seed + 1)
        self.warm_q.copy_(torch.randn(self.warm_q.shape, generator=g))


def make_baseline(kind: str, layout, latent_ratio: float = 1 / 64, seed: int = 0, rank: int = 1,
                  raw_head: bool = True) -> BaselineCodec:
    """The baseline ``kind`` (one of `BASELINES`) for ``layout`` (a `LoraLayout`, its dict, or a PEFT model).
    ``raw_head=False`` codes the head with the LoRA factors in one vector at ``latent_ratio`` (random projection and
    top-k; PowerSGD factors LoRA matrices only and always sends the head raw)."""
    if isinstance(layout, nn.Module):
        layout = LoraLayout.from_model(layout)
    if kind == "random-projection":
        return RandomProjectionCodec(layout, latent_ratio, seed, raw_head)
    if kind == "top-k":
        return TopKCodec(layout, latent_ratio, seed, raw_head)
    if kind == "powersgd":
        return PowerSGDCodec(layout, rank, seed)
    raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES}")


__all__ = ["BASELINES", "BaselineCodec", "PowerSGDCodec", "RandomProjectionCodec", "TopKCodec", "make_baseline"]
