"""The server step: sample parties, aggregate their already-noised messages, decode, produce the update.

Aggregation (docs/federated.md has the argument). With k messages m_i = clip_C(u_i) + N(0, sigma^2 C^2 I)

    R = sum_i m_i / sqrt(k)            (k >= 1)
    R = N(0, sigma^2 C^2 I), drawn by the server itself                        (k = 0)

so the noise in R is exactly N(0, sigma^2 C^2 I) whatever k is, and R = f(S) + noise with
f(S) = sum_{i in S} clip(u_i) / sqrt(|S|), whose add/remove-one sensitivity is <= C for every |S|: R is the
Gaussian mechanism with multiplier sigma on the Poisson sample S. A plain sum of the messages would NOT be:
its noise variance k sigma^2 C^2 reveals how many parties took part, which the subsampling analysis forbids.
The update applied is ``decode(R / sqrt(E[k]))`` at noise ``sigma C / sqrt(E[k])``, with E[k] = q N a public
constant; everything after R is post-processing. A linear encoder commutes with the sum, so latents are
aggregated the same way and decoded once.

Noise shares (``noise_shares = m > 1``): each party adds only ``N(0, s^2 I)`` with ``s = h sigma C / sqrt(m)``,
the server adds ``N(0, (m - k) s^2 I)`` when k < m messages arrive, and scales the total by
``sqrt(m / max(k, m))``, so the noise in R is ``N(0, (h sigma C)^2 I)`` whatever k is and
``f(S) = sqrt(m / max(|S|, m)) sum clip(u_i)``, whose add/remove-one sensitivity is at most ``h C`` with
``h = max(1, m - sqrt(m) (m - 1) / sqrt(m + 1))`` (`aggregate_sensitivity`; h < 1.5 for every m): R is again the
Gaussian mechanism with multiplier sigma. With m = q N the update ``R / sqrt(m q N)`` carries about
``sqrt(q N) / h`` times less noise than with m = 1, and each message alone is private against whoever reads it
only at multiplier ``h sigma / sqrt(m)``. m = 1 is the mechanism above, value for value.
"""

from __future__ import annotations

import math
import secrets
from typing import Callable, Sequence

import numpy as np
import torch

from ..codec.layout import LoraLayout
from ..codec.statistics import PARTS, GradientStatistics, _check_parts, _part_sizes
from ..privacy.noise import gaussian_noise_like, make_generator
from .party import PartyMessage, encode_message, statistics_message


class NonLinearCodecError(ValueError):
    """A codec whose encoder is not linear cannot have its latents aggregated."""


def check_linear_codec(codec, noise_std: float | None = None, tolerance: float = 1e-4) -> None:
    """Refuse a codec whose encoder is not linear in its input (its latents cannot be summed).

    ``lora_rank > 0`` (a data-dependent power iteration) is refused by name; any other encoder is checked
    numerically on random inputs: ``encode(2a - 3b) == 2 encode(a) - 3 encode(b)``.
    """
    if getattr(codec, "lowrank_payload", 0):
        raise NonLinearCodecError(
            f"the codec has a low-rank part (lora_rank={codec.lora_rank}): its encoder runs a power iteration on the "
            "message, which is not linear, so the server cannot aggregate latents and a per-message decode would not "
            "be a post-processing of the analysed mechanism. Use a codec pre-trained with lora_rank=0 (codec='auto' "
            "does this), or no codec"
        )
    g = torch.Generator().manual_seed(12345)
    a = torch.randn(codec.layout.dim, generator=g)
    b = torch.randn(codec.layout.dim, generator=g)
    lhs = codec.encode(2 * a - 3 * b, noise_std=noise_std)
    rhs = 2 * codec.encode(a, noise_std=noise_std) - 3 * codec.encode(b, noise_std=noise_std)
    if not torch.allclose(lhs, rhs, rtol=tolerance, atol=tolerance * float(rhs.abs().max() + 1e-12)):
        raise NonLinearCodecError(
            "the codec's encoder is not linear (encode(2a - 3b) != 2 encode(a) - 3 encode(b)): federated mode sums "
            "latents and needs a linear encoder"
        )


def aggregate(payloads: Sequence[torch.Tensor], phantom: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``sum(payloads) / sqrt(k)``, or ``phantom()`` (one message's noise on a zero signal) when k = 0."""
    if not payloads:
        return phantom().float()
    return torch.stack([p.float() for p in payloads]).sum(0) / math.sqrt(len(payloads))


def aggregate_sensitivity(noise_shares: int) -> float:
    """``h(m)``: the add/remove-one sensitivity, in units of C, of ``f(S) = sqrt(m / max(|S|, m)) sum_{i in S} clip(u_i)``.

    Below m messages f is a plain sum (sensitivity C). From k >= m to k + 1 (b the clipped sum of the k, v the new
    party's clipped update): ``sqrt(m) ||(b + v) / sqrt(k + 1) - b / sqrt(k)|| <= sqrt(m) C (sqrt(k) - (k - 1) / sqrt(k + 1))``
    (docs/federated.md), attained by ``v = -b / k`` with ``||b|| = k C``, and decreasing in k: its value at k = m
    is the maximum. From k = m - 1 to m the scale is 1 on both sides (change ``v``)."""
    m = int(noise_shares)
    if m < 1:
        raise ValueError(f"noise_shares must be >= 1, got {noise_shares}")
    return max(1.0, m - math.sqrt(m) * (m - 1) / math.sqrt(m + 1))


def derive_seed(base: int | None, *parts: int) -> int | None:
    """A 63-bit seed from ``base`` and ``parts`` (None stays None: fresh OS entropy downstream)."""
    if base is None:
        return None
    words = [int(base) % 2**32, int(base) // 2**32 % 2**32] + [int(p) % 2**32 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(2, dtype=np.uint64)[0] % (2**63))


def party_round_randomness(seed: int | None, noise_seed: int | None, round_index: int, party_id: int, private: bool):
    """A party's randomness in one training round, a function of (round, party) only: the seed of its local
    training and the generator of its noise (None without DP). Every engine derives them here, so the same
    seeds give the same messages in the simulation and under Flower."""
    generator = make_generator("cpu", derive_seed(noise_seed, 0, round_index, party_id)) if private else None
    return derive_seed(seed, round_index, party_id), generator


class FederatedServer:
    """Party sampling and aggregation for one federation (no model, no data: plain tensors in and out).

    Args:
        layout: the LoRA layout of the updates.
        num_parties: the parties that can be sampled.
        sample_rate: Poisson sampling: each party joins a round independently with this probability.
        max_norm: C, the clipping norm of every party's update.
        noise_multiplier: sigma of every party's message (0: no DP; the server then averages ``sum / k``).
        codec: a linear `GradientCodec` or None.
        sampling_seed: seed of the sampling; None draws one from OS entropy. It is secret like the noise
            (amplification by sampling assumes nobody knows who took part), so it is never written to a state.
        noise_seed: seed of the server's own noise draws (the k = 0 case); None: OS entropy.
        noise_shares: m; each party adds 1/m of the aggregate's noise variance and the server tops up below m
            messages (see the module docstring). 1: every message carries the full noise.
    """

    def __init__(self, layout: LoraLayout, num_parties: int, sample_rate: float, max_norm: float, noise_multiplier: float,
                 codec=None, sampling_seed: int | None = None, noise_seed: int | None = None, fixed_size: bool = False,
                 noise_shares: int = 1):
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.layout = layout
        self.num_parties = int(num_parties)
        self.sample_rate = float(sample_rate)
        # fixed size: exactly round(q N) parties without replacement (accounted by client_level_ledger)
        self.fixed_size = round(sample_rate * num_parties) if fixed_size else None
        self.max_norm = float(max_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.codec = codec
        self.sampling_seed = sampling_seed if sampling_seed is not None else secrets.randbits(63)
        self.noise_seed = noise_seed
        if int(noise_shares) != noise_shares or noise_shares < 1:
            raise ValueError(f"noise_shares must be a whole number >= 1, got {noise_shares}")
        if noise_shares > 1 and fixed_size:
            raise ValueError("noise_shares > 1 is analysed for Poisson party sampling only: use party_sampling='poisson'")
        self.noise_shares = int(noise_shares)
        if codec is not None:
            codec.check_layout(layout)
            check_linear_codec(codec, self.decode_noise_std or None)

    @property
    def dp_enabled(self) -> bool:
        return self.noise_multiplier > 0

    @property
    def expected_parties(self) -> float:
        """E[k] = q N: the public normaliser of the aggregate."""
        return self.sample_rate * self.num_parties

    @property
    def sensitivity(self) -> float:
        """h(m) C: the sensitivity of the aggregate R; its noise std is ``noise_multiplier`` times this."""
        return aggregate_sensitivity(self.noise_shares) * self.max_norm

    @property
    def party_noise_multiplier(self) -> float:
        """The multiplier of each party's own noise: its message is ``clip_C(u) + N(0, (this * C)^2 I)``, which is
        also what one message alone guarantees against whoever reads it (the server). sigma when m = 1."""
        return self.noise_multiplier * aggregate_sensitivity(self.noise_shares) / math.sqrt(self.noise_shares)

    @property
    def update_scale(self) -> float:
        """The public normaliser of R: ``sqrt(m E[k])`` (R is about this times the mean clipped update)."""
        return math.sqrt(self.noise_shares * self.expected_parties)

    @property
    def decode_noise_std(self) -> float:
        """Per-coordinate noise std of ``R / sqrt(m E[k])``: what the codec decodes at (0 without DP)."""
        return self.noise_multiplier * self.sensitivity / self.update_scale if self.dp_enabled else 0.0

    @property
    def message_bytes(self) -> int:
        """Bytes of one training message: the latent with a codec, else the fp32 update."""
        return self.codec.payload_bytes if self.codec is not None else 4 * self.layout.dim

    # sampling -----------------------------------------------------------------------------------------------
    def sample_parties(self, round_index: int) -> list[int]:
        """Parties of round ``round_index`` (Poisson: each independently with probability q). Stage-1 rounds
        use negative indices, so they never share draws with training rounds."""
        g = torch.Generator().manual_seed(derive_seed(self.sampling_seed, round_index + 2**31))
        if self.fixed_size is not None:
            return sorted(torch.randperm(self.num_parties, generator=g)[: self.fixed_size].tolist())
        return torch.nonzero(torch.rand(self.num_parties, generator=g) < self.sample_rate).flatten().tolist()

    def _generator(self, *parts: int) -> torch.Generator:
        return make_generator("cpu", derive_seed(self.noise_seed, *parts))

    # training rounds ---------------------------------------------------------------------------------------
    def phantom_message(self, round_index: int, shares: int = 1) -> torch.Tensor:
        """The server's own noise of a round with fewer than m messages: ``shares`` parties' noise on a zero update
        (m - k of them; m = 1, k = 0: one message's noise), encoded like a party's message."""
        g = self._generator(1, round_index)
        std = self.party_noise_multiplier * self.max_norm * math.sqrt(shares)
        if self.codec is not None and getattr(self.codec, "clips_in_latent", False):
            return gaussian_noise_like(torch.zeros(self.codec.latent_dim), std, g)  # parties noise their latents
        noise = gaussian_noise_like(torch.zeros(self.layout.dim), std, g)
        return encode_message(noise, self.codec, self.decode_noise_std or None)[0]

    def noised_aggregate(self, payloads: Sequence[torch.Tensor], round_index: int) -> torch.Tensor:
        """R: ``sum / sqrt(k)`` (m = 1), or the sum topped up to m parties' noise and scaled by
        ``sqrt(m / max(k, m))``; its noise is ``N(0, (h sigma C)^2)`` for every k."""
        m, k = self.noise_shares, len(payloads)
        if m == 1:
            return aggregate(payloads, lambda: self.phantom_message(round_index))
        total = torch.stack([p.float() for p in payloads]).sum(0) if payloads else None
        if k < m:
            top_up = self.phantom_message(round_index, shares=m - k).float()
            total = top_up if total is None else total + top_up
        return total * math.sqrt(m / max(k, m))

    def aggregate_round(self, messages: Sequence[PartyMessage], round_index: int) -> torch.Tensor:
        """The decoded update of a round (before the server learning rate), as a flat ``[dim]`` vector.

        Under DP: ``decode(R / sqrt(m E[k]))``; without: ``decode(sum / k)`` (zero when nobody answered). With a
        codec its temporal state observes the decoded update only (already private)."""
        want = "latent" if self.codec is not None else "update"
        for m in messages:
            if m.kind != want:
                raise ValueError(f"party {m.party_id} sent a {m.kind!r} message; this round expects {want!r}")
        payloads = [m.payload for m in messages]
        if self.dp_enabled:
            y = self.noised_aggregate(payloads, round_index) / self.update_scale
        elif payloads:
            y = torch.stack(payloads).sum(0) / len(payloads)
        else:
            return torch.zeros(self.layout.dim)
        if self.codec is None:
            return y
        decoded = self.codec.decode(y, noise_std=self.decode_noise_std or None)
        self.codec.observe(decoded)
        return decoded

    # stage-1 statistics rounds -----------------------------------------------------------------------------
    def phantom_statistics(self, round_index: int, stats_noise_multiplier: float, parts=PARTS) -> torch.Tensor:
        return statistics_message(None, self.layout, self.max_norm, stats_noise_multiplier,
                                  derive_seed(self.noise_seed, 2, round_index) if self.noise_seed is not None else None, parts)

    def aggregate_statistics(self, per_round: Sequence[Sequence[PartyMessage]], stats_noise_multiplier: float, parts=PARTS,
                             first_round_index: int = -1) -> GradientStatistics:
        """Stage-1 statistics from the parties' noised releases: per round ``sum / sqrt(k)`` (a phantom release
        when k = 0), summed over rounds. The normaliser ``expected_examples = rounds * sqrt(E[k])`` makes
        ``moment()`` the mean clipped party update; ``noise_multiplier`` is the one each party used, so
        ``noise_std()`` is exact."""
        parts = _check_parts(parts)
        total = None
        for r, messages in enumerate(per_round):
            for m in messages:
                if m.kind != "statistics":
                    raise ValueError(f"party {m.party_id} sent a {m.kind!r} message in a statistics round")
            idx = first_round_index - r
            agg = aggregate([m.payload for m in messages], lambda: self.phantom_statistics(idx, stats_noise_multiplier, parts))
            total = agg if total is None else total + agg
        if total is None:
            raise ValueError("no statistics round was run")
        sizes = _part_sizes(self.layout)
        totals, off = {}, 0
        for p in parts:
            totals[p] = total[off : off + sizes[p]].clone()
            off += sizes[p]
        rounds = len(per_round)
        return GradientStatistics(
            layout=self.layout, totals=totals, max_grad_norm=self.max_norm, noise_multiplier=stats_noise_multiplier,
            sample_rate=self.sample_rate, num_releases=rounds, expected_examples=rounds * math.sqrt(self.expected_parties),
            meta={"privacy_unit": "party", "num_parties": self.num_parties, "aggregation": "sum / sqrt(k) per round",
                  "accounted": [stats_noise_multiplier, self.sample_rate, rounds]},
        )

    def state_dict(self) -> dict:
        return {"noise_seed": self.noise_seed}


__all__ = ["FederatedServer", "NonLinearCodecError", "aggregate", "aggregate_sensitivity", "check_linear_codec", "derive_seed"]
