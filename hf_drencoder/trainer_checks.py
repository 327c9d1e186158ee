"""What a private trainer checks before training: settings, data, the adapter's history, the processes.

Each check refuses (with the fix) before any private data is touched, or announces a setting that cannot learn.
The mathematics and the pure checks are in `hf_drencoder.safeguards`; this mixin applies them to a trainer.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers.utils import is_datasets_available

from .lora import trainable_adapter_parameters
from .privacy.accounting import PrivacyBudgetError
from .privacy.coupling import check_example_independence, check_up_front, probe_rows
from .privacy.ledger import PrivacyLedger
from .safeguards import (
    HOPELESS_NOISE_RATIO,
    adapter_looks_trained,
    dataset_fingerprint,
    load_prior_history,
    lora_init_problems,
    noise_to_signal_ratio,
    trainer_option_problems,
)

logger = logging.getLogger("hf_drencoder.trainer")


def _overrides_below_mixin(cls: type, name: str) -> bool:
    """True when a subclass of the private trainer (not the Trainer class it privatises) defines ``name``."""
    owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
    return owner is not None and issubclass(owner, _PreflightMixin)


class _PreflightMixin:
    """The checks of `PrivateTrainerMixin` (see there for the attributes they read)."""

    def _check_unsupported(self) -> None:
        if not self.dp_enabled:
            return
        problems = []
        if self.args.world_size > 1 and isinstance(self._codec_spec, str) and self._codec_spec == "auto":
            problems.append(
                "codec='auto' with several processes: stage 1 would run (and be paid for) once per process. Pre-train "
                "the codec in one process (hf-drencoder pretrain-codec) and pass its path"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            problems.append(
                f"the job was launched with {launched} processes but TrainingArguments sees one (on a CPU-only machine "
                "transformers needs use_cpu=True for that): every process would train and release on its own, each "
                "with its own epsilon. Set use_cpu=True (--use_cpu) on CPU, or launch one process"
            )
        if self.args.n_gpu > 1:
            problems.append(
                f"{self.args.n_gpu} GPUs in one process (torch DataParallel replicates the hooked modules); "
                "set CUDA_VISIBLE_DEVICES to one GPU"
            )
        if self.args.fp16:
            problems.append(
                "fp16 needs loss scaling, which would scale per-example gradients before clipping; use bf16 (per-example "
                "gradients, clipping and noise stay in fp32) or fp32"
            )
        if self.args.gradient_checkpointing or getattr(self.args, "activation_checkpointing", False):
            problems.append("gradient_checkpointing re-runs forward hooks and breaks per-sample gradients; turn it off")
        if self.args.label_smoothing_factor:
            problems.append("label_smoothing_factor is not applied by the per-example loss; set it to 0")
        problems += trainer_option_problems(self, _overrides_below_mixin(type(self), "compute_loss"))
        problems += lora_init_problems(self.model)
        if problems:
            raise ValueError(f"{type(self).__name__} cannot guarantee privacy with these settings:\n- " + "\n- ".join(problems))

    def _num_train_examples(self) -> int:
        try:
            n = len(self.train_dataset)
        except TypeError:
            raise ValueError(
                "train_dataset has no length (an IterableDataset?): Poisson sampling and the accountant need the "
                "number of examples N. Materialise it (e.g. datasets.Dataset.from_generator) or pass a map-style dataset"
            ) from None
        if n == 0:
            raise ValueError("train_dataset is empty")
        return n

    @property
    def _grouped(self) -> bool:
        return self.args.privacy_unit == "group"

    def _groups(self) -> list[list[int]]:
        """Row indices of each group (privacy unit 'group'), from ``group_by_column``; cached per dataset."""
        from .privacy.grouping import group_rows

        dataset, column = self.train_dataset, self.args.group_by_column
        cached = getattr(self, "_group_cache", None)
        if cached is not None and cached[0] is dataset:
            return cached[1]
        names = getattr(dataset, "column_names", None)
        if names is not None and column not in names:
            raise ValueError(f"group_by_column={column!r} is not a column of train_dataset; its columns: {', '.join(names)}")
        values = dataset[column] if names is not None else [dataset[i][column] for i in range(len(dataset))]
        groups = group_rows(values)
        self._group_cache = (dataset, groups)
        return groups

    def _num_train_units(self) -> int:
        """N of the accountant: rows, or groups with privacy_unit='group'."""
        n = self._num_train_examples()
        return len(self._groups()) if self._grouped else n

    def _check_train_dataset(self) -> int:
        n = self._num_train_units()
        unit = "groups" if self._grouped else "examples"
        if self.args.poisson_sampling and self.expected_batch_size > n:
            raise ValueError(
                f"the expected batch ({self.expected_batch_size} {unit} = per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes) is larger than the dataset ({n} {unit}): lower the batch size"
            )
        delta = self.target_delta(n)
        if self.dp_enabled and delta > 1.0 / n:
            raise ValueError(
                f"target_delta={delta:.3g} is above 1/N = {1.0 / n:.3g} (N = {n} {unit}): such a delta allows "
                "publishing a unit outright. Use target_delta <= 1/N (default 1/N; smaller is safer)"
            )
        return n

    def _check_data(self) -> None:
        """Labels present and in range, text tokenized: refused before anything is released (a failure after the
        first step has already spent privacy). Skipped when the user's own collator builds the batch from raw
        columns (``remove_unused_columns=False``) or the rows are not dicts."""
        from .data_checks import check_train_dataset

        if not self.args.remove_unused_columns or not isinstance(self.train_dataset[0], dict):
            return
        seq = self.task == "sequence_classification"
        config = getattr(self.model, "config", None)
        single_label = getattr(config, "problem_type", None) in (None, "single_label_classification")
        check_train_dataset(
            self.train_dataset, task="sequence_classification" if seq else "causal_lm",
            num_labels=getattr(config, "num_labels", None) if seq and single_label else None,
        )

    def _carry_earlier_releases(self, previous: PrivacyLedger | None) -> None:
        """An adapter that was trained before carries what that cost: a second ``train()`` of this trainer adds
        the first run's history; an adapter from elsewhere needs its saved report, or an explicit fresh start."""
        if not self.dp_enabled:
            return
        if previous is not None and not previous.disabled and previous.accountant.history:
            self.ledger.record_prior_releases(previous.accountant.history, source="an earlier train() of this trainer")
            logger.warning(
                "DRTrainer: this trainer has trained the adapter before (%d releases, epsilon %.4g): they are added to "
                "this run's accountant, so the reported epsilon covers every run that shaped the adapter.",
                previous.accountant.steps, previous.metrics()["epsilon"],
            )
            return
        if self.args.prior_privacy_report:
            history = load_prior_history(self.args.prior_privacy_report)
            self.ledger.record_prior_releases(history, source=f"prior_privacy_report={self.args.prior_privacy_report}")
            logger.warning(
                "DRTrainer: added the %d releases recorded in %s (the adapter's earlier training) to this run's "
                "accountant.", sum(t for _, _, t in history), self.args.prior_privacy_report,
            )
            return
        if self.args.assume_fresh_adapter:
            logger.warning(
                "DRTrainer: assume_fresh_adapter=True: privacy accounting starts from zero; the adapter's earlier "
                "training (if any) is declared to have used none of this data."
            )
            return
        if adapter_looks_trained(self.model):
            raise PrivacyBudgetError(
                "the adapter has been trained before (its LoRA B matrices are not zero) and no privacy history comes "
                "with it, so epsilon would count only this run. Pass prior_privacy_report=<the folder it was saved "
                "in, holding privacy_report.json, or a checkpoint> to add what it spent, or assume_fresh_adapter=True "
                "if its earlier training used no row of this train_dataset"
            )

    def _check_same_rows_on_every_process(self) -> None:
        """Every process draws the same Poisson indices and keeps its share: that is one sample of the dataset
        only if every process holds the same rows in the same order."""
        from .distributed import gather_from_processes

        prints = gather_from_processes(dataset_fingerprint(self.train_dataset))
        if len(set(prints)) > 1:
            raise ValueError(
                "the processes of this job hold different training sets (length or rows differ: "
                f"{', '.join(p.split(':')[0] + ' rows' for p in prints)}). Each process must load the same dataset in "
                "the same order (no per-process shuffle or shard before DRTrainer): DRTrainer draws one Poisson batch "
                "of indices and gives each process its share"
            )

    def _warn_if_noise_is_hopeless(self, planned: int) -> None:
        if not self.dp_enabled or not self.ledger.noise_multiplier:
            return
        dim = sum(p.numel() for _, p in trainable_adapter_parameters(self.model))
        ratio = noise_to_signal_ratio(self.ledger.noise_multiplier, dim, self.expected_batch_size, planned)
        if ratio > HOPELESS_NOISE_RATIO:
            logger.warning(
                "DRTrainer: the noise will bury the signal: noise multiplier %.4g on %d adapter values with expected "
                "batch %d over %d steps gives a noise-to-signal ratio of %.3g (above %g, training is unlikely to learn; "
                "the default demo runs at about 0.2). Raise target_epsilon, use a larger expected batch, or adapt "
                "fewer parameters.", self.ledger.noise_multiplier, dim, self.expected_batch_size, planned, ratio,
                HOPELESS_NOISE_RATIO,
            )

    def _model_rows_and_collator(self):
        """The training set and collator as the model sees them: Trainer's unused columns removed (from the
        dataset when it is a ``datasets.Dataset``, by the collator otherwise)."""
        dataset, collator = self.train_dataset, self.data_collator
        if is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                return self._remove_unused_columns(dataset, description="training"), collator
        return dataset, self._get_collator_with_removed_columns(collator, description="training")

    def _check_example_independence(self) -> None:
        """Refuse examples that influence each other's loss (see privacy/coupling.py): a few real rows, collated as
        ``get_train_dataloader`` does, must keep their per-example losses when one row leaves the batch."""
        dataset, collator = self._model_rows_and_collator()
        check_up_front(self.model, collator, self.args)
        if self._hooks is not None:
            raise RuntimeError("the example-independence check must run before opacus hooks are attached")
        rows = [dataset[i] for i in probe_rows(dataset)]
        with torch.random.fork_rng(devices=[]):  # a model with random layers must not move the training RNG
            check_example_independence(
                rows, collator, lambda batch: self.per_sample_losses(self.model, self._prepare_inputs(batch)),
                self.model, task=self.task, collator_name=f"the data collator {type(self.data_collator).__name__}",
            )
