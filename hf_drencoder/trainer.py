"""DRTrainer and `make_private`: Hugging Face trainers with differentially private LoRA training.

One private optimizer step (DESIGN.md section 2) is `hf_drencoder.private_step.PrivateStep`:

    Poisson batch -> per-example loss -> per-sample LoRA gradients (opacus hooks) -> clip each to C -> sum
    -> + N(0, sigma^2 C^2) once -> / expected batch -> [codec: encode -> decode, noise-aware]
    -> [post-processing hooks] -> param.grad -> optimizer.step(); the accountant counts the release.

`PrivateTrainerMixin` puts it into any ``Trainer`` subclass through the hooks it overrides: ``__init__`` (LoRA,
arguments, refusals), ``get_train_dataloader`` (Poisson batches), ``train`` (ledger, checks, codec, calibration),
``training_step`` (the private step), ``log`` (epsilon in every log) and saving (trainer_hub.py). The checks are
in trainer_checks.py, the codec set-up in trainer_codec.py, the Poisson batches in trainer_sampling.py, the logs and
the privacy report in trainer_reporting.py. Everything happens inside ``training_step``, so that
nothing Trainer does after it (``grad_norm`` logging, callbacks, the optimizer) sees an un-noised gradient.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from typing import Callable

import torch
from peft import PeftModel
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from .arguments import DRArgumentsMixin, DRTrainingArguments
from .callbacks import load_privacy_state
from .distributed import sum_over_processes
from .lora import trainable_adapter_parameters, wrap_with_lora
from .losses import base_model_of, infer_task, per_sample_losses
from .preference import preference_mixin_for
from .private_step import PrivateStep
from .privacy.coupling import check_up_front
from .privacy.ledger import PrivacyLedger
from .privacy.mechanism import GaussianGradientMechanism
from .privacy.grouping import GROUP_INDEX_KEY
from .privacy.sampling import EMPTY_BATCH_KEY
from .safeguards import split_rows
from .trainer_checks import _PreflightMixin
from .trainer_codec import _CodecMixin
from .trainer_hub import _HubMixin
from .trainer_models import bind_trainer_arguments, load_named_model
from .trainer_options import _OptionsMixin
from .trainer_reporting import _ReportingMixin
from .trainer_sampling import _SamplingMixin

logger = logging.getLogger(__name__)


class PrivateTrainerMixin(_OptionsMixin, _PreflightMixin, _CodecMixin, _HubMixin, _SamplingMixin, _ReportingMixin):
    """Differentially private LoRA training for a ``Trainer`` class: put it first among the bases, or use
    `make_private`.

    Args:
        model: a ``PeftModel``, or a transformers model that is wrapped with ``peft_config`` or, without one,
            with a LoRA config of peft's defaults for its architecture (see ``default_lora_*`` in the arguments);
            the log line of the privacy in force says so. A name or local path when the privatised class loads
            one (TRL's trainers): loaded as that class loads it (``trainer_models.load_named_model``), then wrapped.
        args: ``DRTrainingArguments`` (or the privacy version of the trainer's own arguments class); a plain one
            is accepted and gets the privacy settings: target_epsilon=8 unless the environment says otherwise
            (``HF_DRENCODER_*``), delta=1/N, C=1, PRV accountant, Poisson sampling.
        peft_config: a ``peft.LoraConfig`` to wrap a plain model with.
        codec: a `GradientCodec`, a path or Hub id of a saved one, or ``"auto"``
            (stage 1 on the training data before training); overrides ``args.codec``. See docs/codec.md.

    Every other argument is Trainer's.

    Privacy unit: one training example (one row of ``train_dataset``; for TRL's ``DPOTrainer`` one preference pair,
    see `hf_drencoder.preference`). What is protected: the trained adapter
    and everything derived from it. Training loss and evaluation metrics are computed on data and logged as
    Trainer does; they are not covered by the guarantee.
    """

    def __init__(self, model=None, *trainer_args, peft_config=None, codec=None, **kwargs):
        # positional arguments by their names in the privatised class (TRL's DPOTrainer takes ref_model second)
        kwargs = bind_trainer_arguments(type(self), trainer_args, kwargs)
        args: TrainingArguments | None = kwargs.pop("args", None)
        peft_config = kwargs.pop("peft_config", peft_config)
        if kwargs.get("model_init") is not None:
            raise ValueError(
                f"{type(self).__name__} does not support model_init: pass the model (the adapter is checked before "
                "training)"
            )
        if args is None:
            args = self._default_arguments()
        # the name of the script's plain arguments class when privacy settings had to be added to it
        self._swap_in = None if isinstance(args, DRArgumentsMixin) else type(args).__name__
        if self._swap_in:
            # the script's own arguments class (TrainingArguments, Seq2SeqTrainingArguments, SFTConfig, ...) with
            # the privacy fields added: swap-in defaults and the environment's HF_DRENCODER_* settings
            args = DRTrainingArguments.from_training_arguments(args)
        else:
            args = copy.copy(args)  # the caller's object keeps its noise_seed
        self._check_private_arguments(args)
        # The noise seed regenerates the noise and the batches: it stays in this process and is never written into
        # training_args.bin, a checkpoint, a report_to backend or the Hub.
        self._noise_seed, args.noise_seed = args.noise_seed, None
        checkpointing = args.gradient_checkpointing or getattr(args, "activation_checkpointing", False)
        if self._swap_in and checkpointing and not args.disable_dp:
            logger.warning(
                "%s: gradient_checkpointing is turned off (it was on in the %s given): it re-runs the forward pass in "
                "backward, which breaks per-example gradients.", type(self).__name__, self._swap_in,
            )
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False
        if model is None:
            raise ValueError(f"{type(self).__name__} needs a model")
        if isinstance(model, (str, os.PathLike)):
            # loaded as the privatised class loads a name (TRL: create_model_from_path), or refused with the fix
            model = load_named_model(type(self), os.fspath(model), args, kwargs)
        self._wrapped_plain_model = not isinstance(model, PeftModel) and peft_config is None
        self._fresh_adapter = not isinstance(model, PeftModel)  # the adapter is created here (LoRA's zero init)
        model = wrap_with_lora(
            model, peft_config, r=args.default_lora_r, alpha=args.default_lora_alpha, dropout=args.default_lora_dropout,
            target_modules=args.default_lora_target_modules,
        )
        self._apply_lora_freeze_a(model, args)
        # Only adapter tensors may train: anything else would be released without clipping or noise.
        trainable_adapter_parameters(model)
        if args.push_to_hub and self._noise_seed is not None and not args.disable_dp:
            # checked before Trainer's __init__, which creates the Hub repository
            raise ValueError(
                "DRTrainer cannot guarantee privacy with these settings:\n- push_to_hub=True with a fixed noise_seed: "
                "whoever knows the seed can regenerate the noise (and the batches) and remove it from the shared "
                "adapter. Unset noise_seed for a run whose model leaves the machine"
            )
        super().__init__(model, args=args, **kwargs)
        self._after_trainer_init()
        self._codec_spec = codec if codec is not None else self.args.codec
        self._check_unsupported()
        self._check_optimizer_options()
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
        self._step: PrivateStep | None = None
        if self.train_dataset is not None:
            self._check_train_dataset()

    def _default_arguments(self):
        return TrainingArguments(output_dir="trainer_output")

    # hooks for a trainer family with its own privacy unit (preference.py: one DPO pair)
    def _check_private_arguments(self, args) -> None:
        """Refuse settings of ``args`` before the model is loaded or the data is touched."""
        if not args.disable_dp and getattr(args, "activation_offloading", False):
            raise ValueError(
                f"{type(self).__name__} cannot guarantee privacy with these settings:\n- activation_offloading is "
                "applied by the trainer's own training_step, which the private step replaces: it would be off without "
                "a word. Set activation_offloading=False"
            )

    def _after_trainer_init(self) -> None:
        """Adjust or refuse what the privatised class's ``__init__`` set up, before the checks that follow it."""

    def _privacy_unit_name(self) -> str:
        return f"group ({self.args.group_by_column})" if self._grouped else "example"

    def _rows_of_units(self, inputs, num_units: int) -> torch.Tensor | None:
        """For each row of the model's batch, the privacy unit (of ``num_units``) it belongs to; None when each
        row is one unit. The rows of a unit are summed before clipping."""
        return None

    # the private step's pieces, as the audit and tests reach them
    @property
    def _mechanism(self) -> GaussianGradientMechanism | None:
        return self._step.mechanism if self._step is not None else None

    @_mechanism.setter
    def _mechanism(self, mechanism) -> None:
        self._step.mechanism = mechanism

    @property
    def _hooks(self):
        return self._step.hooks if self._step is not None else None

    @property
    def _latent_noise(self) -> bool:
        return self.codec is not None and self.args.noise_space == "latent"

    @property
    def dp_enabled(self) -> bool:
        return not self.args.disable_dp

    @property
    def expected_batch_size(self) -> int:
        """Expected examples per optimizer step (the public denominator of the mean gradient)."""
        return self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size

    def target_delta(self, n: int | None = None) -> float:
        if self.args.target_delta is not None:
            return self.args.target_delta
        return 1.0 / (n if n is not None else self._num_train_units())

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
            unit=self._privacy_unit_name(),
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

    def _start_mechanism(self, resumed_step: int) -> None:
        params = [p for _, p in trainable_adapter_parameters(self.model)]
        seed = self._noise_seed
        if seed is not None:
            # A resumed, seeded run draws fresh noise for the steps it has not taken (never replays old draws).
            seed = seed + 1_000_003 * resumed_step
        self._params = params
        latent = self._latent_noise
        mechanism = GaussianGradientMechanism(
            # in latent space the mechanism's one "tensor" is the latent; only its shape and device are used
            [torch.zeros(self.codec.latent_dim, device=params[0].device)] if latent else params,
            max_grad_norm=self.args.per_sample_max_grad_norm if self.dp_enabled else math.inf,
            noise_multiplier=self.ledger.noise_multiplier if self.dp_enabled else 0.0,
            expected_batch_size=self.expected_batch_size,
            clipping=self.args.clipping,
            clipping_gamma=self.args.clipping_gamma,
            noise_seed=seed,
            draws_noise=self.args.process_index == 0,  # one draw per step for the whole job (main process)
        )
        self._step = PrivateStep(
            params, self.ledger, mechanism, dp=self.dp_enabled, codec=self.codec, layout=self.layout, latent=latent,
            decode_noise_std=self.codec_noise_std, post_hooks=self.post_privacy_hooks,
            all_reduce=sum_over_processes if self.args.world_size > 1 else None,
        )
        self._step.attach(self.model)

    def _stop_mechanism(self) -> None:
        if self._step is not None:
            self._step.detach()

    def per_sample_losses(self, model, inputs) -> torch.Tensor:
        """One loss per example (``[B]``); the private gradient is that of their sum. Override for a custom head."""
        labels = inputs.pop("labels")
        if self.task == "seq2seq_lm" and "decoder_input_ids" not in inputs:
            # the decoder reads the labels shifted right, as the model does when it is given labels
            inputs["decoder_input_ids"] = base_model_of(model).prepare_decoder_input_ids_from_labels(labels=labels)
        outputs = model(**inputs)
        problem_type = getattr(getattr(self.model, "config", None), "problem_type", None)
        return per_sample_losses(outputs.logits, labels, self.task, problem_type)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        if self._mechanism is None:
            raise RuntimeError("DRTrainer.training_step called outside DRTrainer.train()")
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        step = self.state.global_step + 1
        self._step.check(step)  # also: no parameter outside the released ones has become trainable
        loss = torch.zeros((), device=self.args.device)
        if EMPTY_BATCH_KEY not in inputs:
            inputs = self._prepare_inputs(inputs)
            if self.args.world_size > 1:
                # the hooked modules themselves, not DDP: its forward/backward collectives would wait for processes
                # whose Poisson share is empty; the one collective of a step is the noised sum in the release
                model = self.accelerator.unwrap_model(model)
            groups = inputs.get(GROUP_INDEX_KEY)
            num_groups = int(groups.max()) + 1 if groups is not None and groups.numel() else None
            cap = self.args.max_physical_batch_size
            for piece in split_rows(inputs, cap) if cap else [inputs]:
                # a Poisson draw larger than the cap runs as several passes summed into the same step: memory only
                index = piece.pop(GROUP_INDEX_KEY, None)
                with self.compute_loss_context_manager(), self.accelerator.autocast():
                    losses = self.per_sample_losses(model, piece)
                rows = self._rows_of_units(piece, losses.shape[0])
                if rows is not None:  # several rows per unit (a preference pair): summed, then clipped once
                    index, num_groups = rows, losses.shape[0]
                # (several processes: the release check stops every process together instead of one here)
                loss = loss + self._step.backward(losses, step, check_finite=self.args.world_size == 1,
                                                  group_index=index, num_groups=num_groups)
            self._step.end_micro_batch()
            # Trainer averages the logged loss over processes: each reports its share times the number of processes
            loss = loss * self.args.world_size / self.expected_batch_size
        if self.accelerator.sync_gradients:
            self._step.release(step)
        return loss

    def _get_num_items_in_batch(self, batch_samples, device):
        # The per-example loss does not use Trainer's token count, and an empty Poisson micro-batch has no labels.
        return None

class DRTrainer(PrivateTrainerMixin, Trainer):
    """A drop-in ``Trainer`` that trains LoRA adapters with differential privacy (DP-SGD on the adapter).

    ``PrivateTrainerMixin`` on transformers' ``Trainer``; see there for the arguments. For another trainer class
    (TRL's ``SFTTrainer``, ``Seq2SeqTrainer``) use ``make_private(cls)``.
    """


_PRIVATE_TRAINERS: dict[type, type] = {Trainer: DRTrainer}


def make_private(trainer_cls: type) -> type:
    """``trainer_cls`` (a ``Trainer`` subclass, e.g. TRL's ``SFTTrainer`` or ``Seq2SeqTrainer``) with the private
    step: ``class DR<Name>(PrivateTrainerMixin, trainer_cls)``. Its arguments class gets the privacy fields
    (`hf_drencoder.arguments.private_arguments_class`), and a plain one is converted as for ``DRTrainer``.

    The private step replaces the class's ``training_step``; its ``compute_loss`` is not used for training (the
    per-example loss is ``per_sample_losses``), and collators or options that couple examples are refused. For
    TRL's ``DPOTrainer`` the class also gets `hf_drencoder.preference.PreferencePairsMixin` (one pair per unit)."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"make_private needs a Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, PrivateTrainerMixin):
        return trainer_cls
    if trainer_cls not in _PRIVATE_TRAINERS:
        name = f"DR{trainer_cls.__name__}"
        family = preference_mixin_for(trainer_cls)  # TRL's DPOTrainer: one preference pair per privacy unit
        cls = type(name, ((family,) if family else ()) + (PrivateTrainerMixin, trainer_cls), {
            "__doc__": f"``{trainer_cls.__name__}`` with differentially private LoRA training (see PrivateTrainerMixin).",
            "__module__": __name__,
        })
        globals()[name] = cls
        _PRIVATE_TRAINERS[trainer_cls] = cls
    return _PRIVATE_TRAINERS[trainer_cls]
