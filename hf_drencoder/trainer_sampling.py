"""Poisson batches for `PrivateTrainerMixin`: the secret sampling seed, the planned steps the noise is calibrated
for, and the training loader (each example, or each group under user-level privacy, joins a step independently
with rate q = expected batch / N, as the accountants assume)."""

from __future__ import annotations

import math
import secrets

from torch.utils.data import DataLoader

from .distributed import from_main_process
from .privacy.grouping import GroupIndexCollator, GroupPoissonBatchSampler
from .privacy.sampling import EmptyBatchCollator, PoissonBatchSampler


class _SamplingMixin:
    """Poisson sampling in `PrivateTrainerMixin`: ``get_train_dataloader`` and the step counts derived from it."""

    def _steps_per_epoch(self, n: int) -> int:
        return max(n // self.expected_batch_size, 1)

    def _sampling_seed(self) -> int:
        """Seed of the Poisson sampler. Under DP it is secret like the noise: the accountants' amplification by
        subsampling assumes nobody knows which examples a step used, and ``seed`` / ``data_seed`` are saved
        with the run's arguments. So: fresh OS entropy (the same on every process), or derived from
        ``noise_seed`` when that is set (reproducible runs for tests). Without DP: ``data_seed`` or ``seed``."""
        if not self.dp_enabled:
            return self.args.data_seed if self.args.data_seed is not None else self.args.seed
        if getattr(self, "_secret_sampling_seed", None) is None:
            if self._noise_seed is not None:
                seed = (self._noise_seed * 1_000_033 + 7) % (2**62)
            else:
                seed = secrets.randbits(62)
            self._secret_sampling_seed = from_main_process(seed) if self.args.world_size > 1 else seed
        return self._secret_sampling_seed

    def planned_optimizer_steps(self) -> int:
        """Optimizer steps Trainer will run: the number the noise is calibrated for."""
        if self.args.max_steps > 0:
            return self.args.max_steps
        return math.ceil(self.args.num_train_epochs * self._steps_per_epoch(self._num_train_units()))

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.poisson_sampling:
            return super().get_train_dataloader()
        n = self._check_train_dataset()
        self._set_signature_columns_if_needed()
        signature = list(self._signature_columns)
        if self._grouped:
            # the group column survives Trainer's column removal for the training loader only; GroupIndexCollator
            # takes it out of every row before the collator and the model see it
            self._signature_columns = signature + [self.args.group_by_column]
        try:
            dataset, collator = self._model_rows_and_collator()
        finally:
            self._signature_columns = signature
        common = dict(
            sample_rate=self.expected_batch_size / n, steps_per_epoch=self._steps_per_epoch(n),
            micro_batches=self.args.gradient_accumulation_steps, seed=self._sampling_seed(),
            num_replicas=self.args.world_size, rank=self.args.process_index,
        )
        if self._grouped:
            # Poisson over groups; a group's rows stay in one micro-batch on one process
            sampler = GroupPoissonBatchSampler(self._groups(), max_rows_per_group=self.args.max_rows_per_group, **common)
            collator = GroupIndexCollator(collator, self.args.group_by_column)
        else:
            sampler = PoissonBatchSampler(num_samples=n, **common)
        loader_cls = DataLoader if self.args.world_size == 1 else _PoissonShareLoader
        loader = loader_cls(
            dataset,
            batch_sampler=sampler,
            collate_fn=EmptyBatchCollator(collator),
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        if self.args.world_size > 1:
            # accelerate would deal whole batches out to processes in turn (N Poisson batches per step: N times the
            # rate the accountant is given); the sampler already gives each process its share of one batch
            return loader
        return self.accelerator.prepare(loader)


class _PoissonShareLoader(DataLoader):
    """A process's loader of its share of each Poisson batch (data parallel), with Trainer's ``set_epoch``."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

