"""DRTrainer: the Hugging Face Trainer with differentially private LoRA training.

One private optimizer step (DESIGN.md section 2):

    Poisson batch -> per-example loss -> per-sample LoRA gradients (opacus hooks) -> clip each to C -> sum
    -> + N(0, sigma^2 C^2) once -> / expected batch -> [codec: encode -> decode, noise-aware]
    -> [post-processing hooks] -> param.grad -> optimizer.step(); the accountant counts the release.

With ``noise_space="latent"`` each example's gradient is first encoded by the codec's fixed linear encoder
and the latents are clipped and noised instead (the same Gaussian mechanism, in k << d dimensions).

Everything is done inside ``training_step`` so that nothing Trainer does after it (``grad_norm`` logging,
callbacks, the optimizer) ever sees an un-noised gradient.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import secrets
import warnings
from typing import Callable

import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import is_datasets_available

from .arguments import SWAP_IN_DEFAULTS, DRTrainingArguments
from .distributed import from_main_process, sum_over_processes
from .callbacks import CODEC_DIR, PrivacyCallback, load_privacy_state
from .lora import trainable_adapter_parameters, wrap_with_lora
from .losses import infer_task, per_sample_losses
from .privacy.accounting import PrivacyBudgetError
from .privacy.coupling import check_example_independence, check_up_front, probe_rows
from .privacy.ledger import PrivacyLedger
from .privacy.mechanism import GaussianGradientMechanism
from .privacy.per_sample import attach_grad_sample_hooks, pop_per_sample_gradients
from .privacy.sampling import EMPTY_BATCH_KEY, EmptyBatchCollator, PoissonBatchSampler
from .safeguards import (
    HOPELESS_NOISE_RATIO,
    PRIVACY_REPORT_NAME,
    adapter_looks_trained,
    dataset_fingerprint,
    first_non_finite,
    gradient_hook_problems,
    load_prior_history,
    lora_init_problems,
    noise_to_signal_ratio,
    split_rows,
    trainer_option_problems,
)

logger = logging.getLogger(__name__)


class DRTrainer(Trainer):
    """A drop-in ``Trainer`` that trains LoRA adapters with differential privacy (DP-SGD on the adapter).

    Args:
        model: a ``PeftModel``, or a transformers model that is wrapped with ``peft_config`` or, without one,
            with a default LoRA config for its architecture (see ``DRTrainingArguments.lora_*``).
        args: ``DRTrainingArguments``; a plain ``TrainingArguments`` is accepted and gets the DR defaults
            (target_epsilon=8, delta=1/N, C=1, PRV accountant, Poisson sampling).
        peft_config: a ``peft.LoraConfig`` to wrap a plain model with.
        codec: a :class:`~hf_drencoder.codec.GradientCodec`, a path or Hub id of a saved one, or ``"auto"``
            (stage 1 on the training data before training); overrides ``args.codec``. See docs/codec.md.

    Every other argument is Trainer's.

    Privacy unit: one training example (one row of ``train_dataset``). What is protected: the trained adapter
    and everything derived from it. Training loss and evaluation metrics are computed on data and logged as
    Trainer does; they are not covered by the guarantee.
    """

    def __init__(
        self, model=None, args: TrainingArguments | None = None, *trainer_args, peft_config=None, codec=None, **kwargs
    ):
        if kwargs.get("model_init") is not None:
            raise ValueError("DRTrainer does not support model_init: pass the model (the adapter is checked before training)")
        if args is None:
            args = TrainingArguments(output_dir="trainer_output")
        self._swap_in = not isinstance(args, DRTrainingArguments)
        if self._swap_in:
            args = DRTrainingArguments.from_training_arguments(args)
        else:
            args = copy.copy(args)  # the caller's object keeps its noise_seed
        # The noise seed regenerates the noise and the batches: it stays in this process and is never written into
        # training_args.bin, a checkpoint, a report_to backend or the Hub.
        self._noise_seed, args.noise_seed = args.noise_seed, None
        if model is None:
            raise ValueError("DRTrainer needs a model")
        model = wrap_with_lora(
            model, peft_config, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
            target_modules=args.lora_target_modules,
        )
        # Only adapter tensors may train: anything else would be released without clipping or noise.
        trainable_adapter_parameters(model)
        if args.push_to_hub and self._noise_seed is not None and not args.disable_dp:
            # checked before Trainer's __init__, which creates the Hub repository
            raise ValueError(
                "DRTrainer cannot guarantee privacy with these settings:\n- push_to_hub=True with a fixed noise_seed: "
                "whoever knows the seed can regenerate the noise (and the batches) and remove it from the shared "
                "adapter. Unset noise_seed for a run whose model leaves the machine"
            )
        super().__init__(model, args, *trainer_args, **kwargs)
        self._codec_spec = codec if codec is not None else self.args.codec
        self._check_unsupported()
        if self.dp_enabled:
            check_up_front(self.model, self.data_collator, self.args)  # BatchNorm, flattening collators, packing
        if self.dp_enabled and self.args.world_size > 1:
            # Trainer would all-gather token counts only on processes whose first micro-batch has labels; a Poisson
            # share can be empty, and the per-example loss does not use the count
            self.args.average_tokens_across_devices = False
        if self.dp_enabled and self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.info(
                "DRTrainer: Trainer's batch-gradient clipping (max_grad_norm=%s) is off under DP: each example is "
                "clipped to per_sample_max_grad_norm=%s instead.", self.args.max_grad_norm,
                self.args.per_sample_max_grad_norm,
            )
            self.args.max_grad_norm = 0.0
        self.task = infer_task(self.model)
        self.post_privacy_hooks: list[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = []
        if self.args.noise_space == "latent" and self._codec_spec is None:
            raise ValueError("noise_space='latent' needs a codec: pass codec= or set codec='auto'")
        self.codec = None  # the GradientCodec in use, set up by train()
        self.layout = None
        self.ledger: PrivacyLedger | None = None
        self._mechanism: GaussianGradientMechanism | None = None
        self._hooks = None
        if self.train_dataset is not None:
            self._check_train_dataset()

    # ---- checks made before any training ----

    @property
    def dp_enabled(self) -> bool:
        return not self.args.disable_dp

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
        problems += trainer_option_problems(self, DRTrainer.compute_loss)
        problems += lora_init_problems(self.model)
        if problems:
            raise ValueError("DRTrainer cannot guarantee privacy with these settings:\n- " + "\n- ".join(problems))

    @property
    def expected_batch_size(self) -> int:
        """Expected examples per optimizer step (the public denominator of the mean gradient)."""
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

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

    def _check_train_dataset(self) -> int:
        n = self._num_train_examples()
        if self.args.poisson_sampling and self.expected_batch_size > n:
            raise ValueError(
                f"the expected batch ({self.expected_batch_size} = per_device_train_batch_size x "
                f"gradient_accumulation_steps x processes) is larger than the dataset ({n} examples): lower the batch size"
            )
        delta = self.target_delta(n)
        if self.dp_enabled and delta > 1.0 / n:
            raise ValueError(
                f"target_delta={delta:.3g} is above 1/N = {1.0 / n:.3g}: such a delta allows publishing an example "
                "outright. Use target_delta <= 1/N (default 1/N; smaller is safer)"
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

    def target_delta(self, n: int | None = None) -> float:
        if self.args.target_delta is not None:
            return self.args.target_delta
        return 1.0 / (n if n is not None else self._num_train_examples())

    # ---- data ----

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
        return math.ceil(self.args.num_train_epochs * self._steps_per_epoch(self._num_train_examples()))

    def get_train_dataloader(self) -> DataLoader:
        if not self.args.poisson_sampling:
            return super().get_train_dataloader()
        n = self._check_train_dataset()
        dataset, collator = self.train_dataset, self.data_collator
        is_hf_dataset = False
        if is_datasets_available():
            import datasets

            is_hf_dataset = isinstance(dataset, datasets.Dataset)
        if is_hf_dataset:
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="training")
        sampler = PoissonBatchSampler(
            num_samples=n,
            sample_rate=self.expected_batch_size / n,
            steps_per_epoch=self._steps_per_epoch(n),
            micro_batches=self.args.gradient_accumulation_steps,
            seed=self._sampling_seed(),
            num_replicas=self.args.world_size,
            rank=self.args.process_index,
        )
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

    # ---- training ----

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        if self.train_dataset is None:
            raise ValueError("DRTrainer.train() needs a train_dataset")
        n = self._check_train_dataset()
        self._check_data()
        planned = self.planned_optimizer_steps()
        if planned < 1:
            raise ValueError(
                f"0 optimizer steps planned (num_train_epochs={self.args.num_train_epochs}, max_steps="
                f"{self.args.max_steps}): set max_steps or num_train_epochs so that at least one step runs"
            )
        self._secret_sampling_seed = None  # every run draws its own (secret) batches
        previous = self.ledger
        self.ledger = PrivacyLedger(
            delta=self.target_delta(n),
            sample_rate=self.expected_batch_size / n,
            max_grad_norm=self.args.per_sample_max_grad_norm,
            accountant_name=self.args.accountant,
            noise_multiplier=self.args.noise_multiplier,
            target_epsilon=self.args.target_epsilon,
            disabled=not self.dp_enabled,
        )
        if resume_from_checkpoint is True or (isinstance(resume_from_checkpoint, bool) and resume_from_checkpoint):
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
        resumed_step = 0
        if resume_from_checkpoint:
            self.ledger.load_state_dict(load_privacy_state(resume_from_checkpoint)["ledger"])
            with open(os.path.join(resume_from_checkpoint, "trainer_state.json")) as f:
                resumed_step = json.load(f).get("global_step", 0)
        else:
            self._carry_earlier_releases(previous)
        if self.dp_enabled and self.args.world_size > 1:
            self._check_same_rows_on_every_process()
        if self.dp_enabled:
            self._check_example_independence()  # before codec stage 1 and the mechanism: no noise drawn, no hooks yet
        stage1 = self._setup_codec(resume_from_checkpoint, n)
        self.ledger.calibrate(planned)
        self._warn_if_noise_is_hopeless(planned)
        if stage1 is not None:
            self._pretrain_codec(stage1)
        self._install_privacy_callback(planned)
        self._log_privacy_parameters(n, planned)
        self._start_mechanism(resumed_step)
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._stop_mechanism()

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

    def _check_example_independence(self) -> None:
        """Refuse examples that influence each other's loss (see privacy/coupling.py): a few real rows, collated as
        ``get_train_dataloader`` does, must keep their per-example losses when one row leaves the batch."""
        dataset, collator = self.train_dataset, self.data_collator
        if is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="training")
        check_up_front(self.model, collator, self.args)
        if self._hooks is not None:
            raise RuntimeError("the example-independence check must run before opacus hooks are attached")
        rows = [dataset[i] for i in probe_rows(dataset)]
        with torch.random.fork_rng(devices=[]):  # a model with random layers must not move the training RNG
            check_example_independence(
                rows, collator, lambda batch: self.per_sample_losses(self.model, self._prepare_inputs(batch)),
                self.model, task=self.task, collator_name=f"the data collator {type(self.data_collator).__name__}",
            )

    # ---- the DR-Encoder codec ----

    @property
    def codec_noise_std(self) -> float:
        """Per-coordinate noise std of the released mean gradient (or latent): sigma C / B. The decoder needs it."""
        if not self.dp_enabled or self.ledger is None or not self.ledger.noise_multiplier:
            return 0.0
        return self.ledger.noise_multiplier * self.args.per_sample_max_grad_norm / self.expected_batch_size

    def _setup_codec(self, resume_from_checkpoint, n: int):
        """Load or build the codec before the noise is calibrated, so that a prior's privacy cost (stage 1) is
        in the ledger first. Returns the stage-1 statistics when a codec still has to be pre-trained from them."""
        from .codec import LoraLayout, load_codec

        self.layout = LoraLayout.from_model(self.model)
        spec = self._codec_spec
        if spec is None:
            self.codec = None
            return None
        saved = os.path.join(resume_from_checkpoint, CODEC_DIR) if resume_from_checkpoint else None
        if saved is not None and os.path.isdir(saved):
            # The checkpoint's codec (with its temporal state); its stage-1 cost is already in the saved ledger.
            self.codec = self._checked_codec(load_codec(saved, self.model))
            return None
        if resume_from_checkpoint:
            if isinstance(spec, str) and spec == "auto":
                raise ValueError(
                    f"{resume_from_checkpoint} has no {CODEC_DIR}/ folder: the codec built by codec='auto' cannot be "
                    "rebuilt without paying for stage 1 again. Resume from a checkpoint written by this run"
                )
            logger.warning("DRTrainer: %s has no codec state; resuming with a fresh codec state", resume_from_checkpoint)
        elif isinstance(spec, str) and spec == "auto":
            return self._stage1_statistics(n)
        codec = load_codec(spec, self.model)  # names the path and what is wrong with it
        self.codec = self._checked_codec(codec)
        self.codec.reset_state()
        if self.dp_enabled and not resume_from_checkpoint:
            history = self.codec.stage1_history
            if history is None:
                raise PrivacyBudgetError(
                    "the codec does not record what its prior cost (stage1_privacy is unknown): a prior fitted to "
                    "private data would leak it through the decoder and, with noise_space='latent', the encoder. "
                    "Use a codec built by hf-drencoder stage 1 (pretrain-codec, or codec='auto'), whose cost is "
                    "recorded and added to this run's accountant, or call codec.mark_public(reason) if its prior "
                    "depends on no private data"
                )
            self.ledger.record_prior_releases(history, source="codec stage 1")
        return None

    def _checked_codec(self, codec):
        codec.check_layout(self.layout)
        if self.args.noise_space == "latent" and codec.lora_rank > 0:
            raise ValueError(
                f"noise_space='latent' needs an encoder that is a fixed linear map, but this codec's low-rank part "
                f"(lora_rank={codec.lora_rank}) is a power iteration on each input, so the per-example latents would "
                "depend on the private data in a way no clipping bounds. Use a codec with lora_rank=0 (codec='auto' "
                "builds one in latent mode) or noise_space='gradient'"
            )
        return codec.to(self.args.device)

    def _stage1_statistics(self, n: int):
        """Stage 1 of codec='auto': privatised statistics of clipped per-example gradients of the training data,
        recorded in this run's accountant (the same Gaussian mechanism and unit as training)."""
        from .codec import collect_gradient_statistics
        from .privacy.accounting import PrivacyAccountant

        dataset, collator = self.train_dataset, self.data_collator
        if is_datasets_available():
            import datasets

            if isinstance(dataset, datasets.Dataset):
                dataset = self._remove_unused_columns(dataset, description="training")
            else:
                collator = self._get_collator_with_removed_columns(collator, description="training")
        device = self.args.device

        def collate(rows):
            return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in collator(rows).items()}

        batch = self.args.codec_stats_batch_size or min(256, n)
        seed = None if self._noise_seed is None else self._noise_seed + 17
        logger.warning(
            "DRTrainer: codec='auto', stage 1: releasing gradient statistics of %d Poisson batches of expected size %d "
            "(noise multiplier %g); the cost is added to this run's accountant.",
            self.args.codec_stats_batches, batch, self.args.codec_stats_noise_multiplier,
        )
        stage1 = PrivacyAccountant(self.ledger.delta, self.args.accountant)
        stats = collect_gradient_statistics(
            self.model, dataset, collate,
            max_grad_norm=self.args.per_sample_max_grad_norm,
            noise_multiplier=self.args.codec_stats_noise_multiplier,
            expected_batch_size=batch,
            num_batches=self.args.codec_stats_batches,
            accountant=stage1 if self.dp_enabled else None,
            micro_batch_size=self.args.per_device_train_batch_size,
            seed=self._sampling_seed() + 1,
            noise_seed=seed,
            progress=not self.args.disable_tqdm,
        )
        if self.dp_enabled:
            self.ledger.record_prior_releases(stage1.history, source="codec='auto' stage 1")
        return stats

    def _pretrain_codec(self, stats) -> None:
        from .codec import build_prior, pretrain_codec

        prior = build_prior(stats, self.args.codec_prior, expected_batch_size=self.expected_batch_size)
        s = self.codec_noise_std
        codec = pretrain_codec(
            prior, self.args.codec_latent_ratio, noise_std=(s / 4, s) if s > 0 else None,
            lora_rank=0 if self.args.noise_space == "latent" else None, seed=self.args.seed,
            progress=not self.args.disable_tqdm,
        )
        self.codec = self._checked_codec(codec)

    @property
    def uplink_bytes(self) -> int:
        """Bytes one step sends off the party: the fp32 latent with a codec, the fp32 LoRA gradient without."""
        if self.codec is not None:
            return self.codec.payload_bytes
        return 4 * (self.layout.dim if self.layout is not None else sum(p.numel() for p in self._params))

    @property
    def uplink_ratio(self) -> float:
        return self.uplink_bytes / (4 * self.layout.dim)

    def _install_privacy_callback(self, planned: int) -> None:
        for cb in list(self.callback_handler.callbacks):
            if isinstance(cb, PrivacyCallback):
                self.callback_handler.remove_callback(cb)
        # First in the list, so that its budget stop is seen before any other callback acts on the step.
        self.callback_handler.callbacks.insert(0, PrivacyCallback(self.ledger, planned))

    def _log_privacy_parameters(self, n: int, planned: int) -> None:
        if not self.dp_enabled:
            logger.warning("DRTrainer: disable_dp=True, training WITHOUT differential privacy (epsilon = inf).")
            return
        prefix = (
            f"DRTrainer got a plain TrainingArguments: training with the DR defaults "
            f"({', '.join(f'{k}={v}' for k, v in SWAP_IN_DEFAULTS.items())}). "
            if self._swap_in else "DRTrainer: "
        )
        logger.warning(
            "%sprivacy in force: unit=example, N=%d, expected batch=%d, sample_rate=%.5g, noise_multiplier=%.4g, "
            "per_sample_max_grad_norm=%g, clipping=%s, delta=%.3g, accountant=%s, target_epsilon=%s, planned steps=%d, "
            "budget lasts %s steps.",
            prefix, n, self.expected_batch_size, self.ledger.sample_rate, self.ledger.noise_multiplier,
            self.ledger.max_grad_norm, self.args.clipping, self.ledger.delta, self.args.accountant,
            self.args.target_epsilon, planned,
            self.ledger.max_total_steps if self.ledger.max_total_steps is not None else "unbounded",
        )

    def _start_mechanism(self, resumed_step: int) -> None:
        params = [p for _, p in trainable_adapter_parameters(self.model)]
        seed = self._noise_seed
        if seed is not None:
            # A resumed, seeded run draws fresh noise for the steps it has not taken (never replays old draws).
            seed = seed + 1_000_003 * resumed_step
        self._params = params
        latent = self.codec is not None and self.args.noise_space == "latent"
        self._mechanism = GaussianGradientMechanism(
            # in latent space the mechanism's one "tensor" is the latent; only its shape and device are used
            [torch.zeros(self.codec.latent_dim, device=params[0].device)] if latent else params,
            max_grad_norm=self.args.per_sample_max_grad_norm if self.dp_enabled else math.inf,
            noise_multiplier=self.ledger.noise_multiplier if self.dp_enabled else 0.0,
            expected_batch_size=self.expected_batch_size,
            clipping=self.args.clipping,
            noise_seed=seed,
            draws_noise=self.args.process_index == 0,  # one draw per step for the whole job (main process)
        )
        if self.dp_enabled:
            # Hooks on the submodules, not a wrapper: the PeftModel stays what save_model/push_to_hub expect.
            self._hooks = attach_grad_sample_hooks(self.model)

    def _stop_mechanism(self) -> None:
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None
        for p in getattr(self, "_params", []):
            p.grad_sample = None

    def per_sample_losses(self, model, inputs) -> torch.Tensor:
        """One loss per example (``[B]``); the private gradient is that of their sum. Override for a custom head."""
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        problem_type = getattr(getattr(self.model, "config", None), "problem_type", None)
        return per_sample_losses(outputs.logits, labels, self.task, problem_type)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self._mechanism is None:
            raise RuntimeError("DRTrainer.training_step called outside DRTrainer.train()")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._check_before_step()
        loss = torch.zeros((), device=self.args.device)
        if EMPTY_BATCH_KEY not in inputs:
            inputs = self._prepare_inputs(inputs)
            if self.args.world_size > 1:
                # the hooked modules themselves, not DDP: its forward/backward collectives would wait for processes
                # whose Poisson share is empty; the one collective of a step is the noised sum in the release
                model = self.accelerator.unwrap_model(model)
            cap = self.args.max_physical_batch_size
            for piece in split_rows(inputs, cap) if cap else [inputs]:
                # a Poisson draw larger than the cap runs as several passes summed into the same step: memory only
                loss = loss + self._backward_per_example(model, piece)
            # Trainer averages the logged loss over processes: each reports its share times the number of processes
            loss = loss * self.args.world_size / self.expected_batch_size
        if self.accelerator.sync_gradients:
            self._release_private_gradient()
        return loss

    def _backward_per_example(self, model, inputs) -> torch.Tensor:
        """Forward, backward and clipping of one physical batch; returns the sum of its losses."""
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            losses = self.per_sample_losses(model, inputs)
        if self.args.world_size == 1 and first_non_finite([losses.detach()]) is not None:
            # (several processes: the release check below stops every process together instead)
            raise FloatingPointError(
                f"step {self.state.global_step + 1}: an example's loss is not finite (NaN or inf). Check the inputs "
                "and labels (e.g. a row whose labels are all -100 in a custom loss), the learning rate, and bf16 overflow"
            )
        with warnings.catch_warnings():
            # torch warns that the first hooked LoRA layer's input needs no grad (the base is frozen): expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        self._collect_gradients(losses.shape[0])
        return losses.detach().float().sum()

    def _check_before_step(self) -> None:
        """Before touching the step's data: nothing may act on a raw gradient during backward, and the adapter
        must still be finite (a non-finite adapter trains on silently and is shared as if it were a model)."""
        problems = gradient_hook_problems(self._params)
        if problems:
            raise ValueError("DRTrainer cannot guarantee privacy: " + problems[0])
        if first_non_finite([p.detach() for p in self._params]) is not None:
            raise FloatingPointError(
                f"the adapter is not finite after step {self.state.global_step}: lower the learning rate, check "
                "warmup and weight decay, or use fp32 instead of bf16"
            )

    def _get_num_items_in_batch(self, batch_samples, device):
        # The per-example loss does not use Trainer's token count, and an empty Poisson micro-batch has no labels.
        return None

    @property
    def _latent_noise(self) -> bool:
        return self.codec is not None and self.args.noise_space == "latent"

    def _collect_gradients(self, batch: int) -> None:
        """Move this micro-batch's gradients into the mechanism and wipe them from the parameters, so that a
        raw gradient is never left where the optimizer or a logger could read it."""
        if self.dp_enabled:
            grads = pop_per_sample_gradients(self._params, batch)
            if self._latent_noise:
                # the encoder is a fixed linear map (public prior + released history): clipping the latents
                # bounds each example's influence on the released latent by C
                grads = [self.codec.encode(self.layout.flatten(grads), self.codec_noise_std)]
            self._mechanism.add_per_sample(grads)
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params]
        if self._latent_noise:
            grads = [self.codec.encode(self.layout.flatten(grads), 0.0)]
        self._mechanism.add_summed(grads)
        for p in self._params:
            p.grad = None

    def _release_private_gradient(self) -> None:
        # Count first: a release the budget does not allow is refused before any noise is drawn or used.
        self.ledger.record_step()
        grads = self._mechanism.release(all_reduce=sum_over_processes if self.args.world_size > 1 else None)
        if self._latent_noise:
            decoded = self.codec.decode(grads[0], self.codec_noise_std)
            self.codec.observe(decoded)  # the temporal state follows released (decoded) gradients only
            grads = self.layout.unflatten(decoded)
        elif self.codec is not None:
            # the encoder sees the noised mean only: encoding and decoding are post-processing
            grads = self.codec.roundtrip(grads, noise_std=self.codec_noise_std)
        for hook in self.post_privacy_hooks:
            grads = hook(grads)  # post-processing of an already private gradient: costs no privacy
        if first_non_finite(grads) is not None:
            # the step is already counted: epsilon covers it, and the non-finite release is never applied
            raise FloatingPointError(
                f"step {self.state.global_step + 1}: the released gradient is not finite (NaN or inf); it was not "
                "applied. Check the inputs and labels, the learning rate, and bf16 overflow"
            )
        for p, g in zip(self._params, grads):
            p.grad = g.to(p.dtype)

    # ---- logging, reporting, saving ----

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.ledger is not None:
            logs.update(self.ledger.metrics())
            logs["uplink_bytes"] = self.uplink_bytes
            logs["uplink_ratio"] = self.uplink_ratio
        super().log(logs, *args, **kwargs)

    def privacy_report(self) -> dict:
        """epsilon per accountant, delta, noise multiplier, sample rate, steps, clipping norm and privacy unit."""
        if self.ledger is None:
            raise RuntimeError("privacy_report() is available once train() has started")
        report = self.ledger.report()
        report["clipping"] = self.args.clipping
        report["expected_batch_size"] = self.expected_batch_size
        report["uplink_bytes"] = self.uplink_bytes
        report["uplink_ratio"] = self.uplink_ratio
        report["noise_space"] = self.args.noise_space if self.codec is not None else None
        report["noise_seeded"] = self._noise_seed is not None
        if self.codec is not None:
            report["codec_latent_ratio"] = self.codec.latent_ratio
            report["codec_latent_dim"] = self.codec.latent_dim
            report["codec_prior"] = self.codec.prior_kind
            report["codec_stage1_privacy"] = self.codec.stage1_privacy
        return report

    def push_to_hub(self, *args, allow_seeded_noise: bool = False, **kwargs):
        """Trainer's ``push_to_hub`` (adapter, codec, card, privacy report). A model trained with a fixed
        ``noise_seed`` is refused: whoever knows the seed can regenerate the noise and the batches and remove the
        noise from the adapter. ``allow_seeded_noise=True`` pushes it anyway (for a test repository only)."""
        if self.dp_enabled and self._noise_seed is not None and not allow_seeded_noise:
            raise PrivacyBudgetError(
                "this model was trained with a fixed noise_seed, so its noise can be regenerated and removed: it must "
                "not be shared. Train again without noise_seed (fresh OS entropy) to push it, or pass "
                "allow_seeded_noise=True if the repository is a test"
            )
        return super().push_to_hub(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Trainer's save (the adapter), then ``privacy_report.json``, the model card ``README.md`` carrying the
        privacy report, and the gradient codec (``codec/``) when one is used."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.ledger is not None:
            report = self.privacy_report()
            with open(os.path.join(output_dir, PRIVACY_REPORT_NAME), "w") as f:
                json.dump(report, f, indent=2)
            # Replaces the card peft's save_pretrained just wrote: the shared model states its guarantee.
            self._model_card(report).save(os.path.join(output_dir, "README.md"))
        codec = getattr(self, "codec", None)
        if codec is not None:
            # The codec's state is built from prior samples and already released (private) updates only.
            codec.save_pretrained(os.path.join(output_dir, CODEC_DIR))

    def _model_card(self, report: dict, finetuned_from: str | None = None, **kwargs):
        from .hub import build_model_card

        if finetuned_from is None:
            peft_config = getattr(self.model, "peft_config", {}).get("default")
            finetuned_from = getattr(peft_config, "base_model_name_or_path", None)
        eval_results = None
        for entry in reversed(self.state.log_history if self.state is not None else []):
            if any(k.startswith("eval_") for k in entry):
                eval_results = {k: v for k, v in entry.items() if k.startswith("eval_")}
                break
        from .hub import pipeline_tag_for

        kwargs.setdefault("pipeline_tag", pipeline_tag_for(self.model))
        return build_model_card(report, base_model=finetuned_from, eval_results=eval_results, **kwargs)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write ``README.md`` in ``output_dir``: Hub metadata and the privacy report (called by ``push_to_hub``).

        Before ``train()`` there is no privacy report, and Trainer's own card is written. ``tasks`` and
        ``dataset_args`` are accepted for compatibility and not used; ``dataset`` / ``dataset_tags`` go into the
        ``datasets`` metadata and should be Hub dataset ids.
        """
        if not self.is_world_process_zero():
            return
        if self.ledger is None:
            return super().create_model_card(
                language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
                tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            )
        datasets = dataset_tags if dataset_tags is not None else dataset
        card = self._model_card(
            self.privacy_report(), finetuned_from=finetuned_from, datasets=datasets, tags=tags, model_name=model_name,
            language=language, license=license,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))


class _PoissonShareLoader(DataLoader):
    """A process's loader of its share of each Poisson batch (data parallel), with Trainer's ``set_epoch``."""

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)
