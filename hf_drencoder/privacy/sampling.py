"""Poisson sampling of training batches.

Privacy amplification by subsampling, as the accountants model it, assumes that at every step each example
is included independently with probability q. A shuffled fixed-size batch is a different mechanism, so the
private path samples batches here rather than through Trainer's shuffling sampler.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

EMPTY_BATCH_KEY = "dr_empty_batch"


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields the micro-batches of Poisson-sampled logical batches.

    Each logical batch (one optimizer step) includes every one of ``num_samples`` examples independently
    with probability ``sample_rate``; it is split into ``micro_batches`` consecutive chunks, one per gradient
    accumulation step. Chunks (and whole batches) may be empty: that is a valid outcome of the mechanism and
    must still be a (noise-only) step, otherwise the batch size would leak.

    The draws come from a generator seeded with ``(seed, epoch)`` so that a resumed run that skips the
    first batches of an epoch replays the same draws.

    Data parallel (``num_replicas`` > 1): every process draws the same global batch (same seed) and keeps
    the share ``rank::num_replicas`` of each micro-batch, so the union over processes is exactly one Poisson
    sample at the global rate (the rate the accountant is given), whatever the number of processes.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps_per_epoch: int,
        micro_batches: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if num_samples <= 0:
            raise ValueError("PoissonBatchSampler needs a non-empty dataset")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.micro_batches = micro_batches
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        for _ in range(self.steps_per_epoch):
            mask = torch.rand(self.num_samples, generator=g) < self.sample_rate
            indices = mask.nonzero().flatten()
            for chunk in torch.tensor_split(indices, self.micro_batches):
                yield chunk[self.rank :: self.num_replicas].tolist()


class EmptyBatchCollator:
    """Wraps a data collator so that an empty micro-batch becomes a marker instead of a collator crash."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if len(features) == 0:
            return {EMPTY_BATCH_KEY: torch.ones(1)}
        return self.collator(features)
