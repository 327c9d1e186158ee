"""DRTrainingArguments: TrainingArguments plus the differential-privacy settings of DR-Encoder.

The privacy settings live in one dataclass mixin, `DRArgumentsMixin`, so that any arguments class of the
Trainer family (``TrainingArguments``, ``Seq2SeqTrainingArguments``, TRL's ``SFTConfig``) gets them:
`private_arguments_class` builds the combined class. Every privacy field can also be set from the environment
(``HF_DRENCODER_TARGET_EPSILON=3``) or a JSON/YAML file named in ``HF_DRENCODER_CONFIG``, so a script that parses
a plain ``TrainingArguments`` needs no edit to choose epsilon.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .environment import ALTERNATIVES, CONFIG_ENV, ENV_PREFIX, environment_overrides, settings_default
from .privacy.accounting import ACCOUNTANTS, check_accountant
from .privacy.clipping import CLIPPING_MODES, DEFAULT_CLIPPING_GAMMA

NOISE_SPACES = ("gradient", "latent")
PRIVACY_UNITS = ("example", "group")

logger = logging.getLogger(__name__)

# What a plain TrainingArguments gets when it is handed to DRTrainer (the swap-in case).
SWAP_IN_DEFAULTS = {"target_epsilon": 8.0}

@dataclass
class DRArgumentsMixin:
    """Arguments of `DRTrainer`: everything ``TrainingArguments`` has, plus the privacy settings.

    Privacy (the unit protected is one training example):
        target_epsilon / noise_multiplier: exactly one. With ``target_epsilon`` the noise multiplier is
            solved for the planned number of optimizer steps and training stops before the budget is exceeded.
        target_delta: delta of the (epsilon, delta) guarantee; default 1 / len(train_dataset).
        per_sample_max_grad_norm: C, the L2 bound on each example's LoRA gradient (the sensitivity).
        accountant: prv | pld | rdp, used to calibrate, for the budget stop and the headline ``epsilon``. GDP (an
            approximation for q < 1, not an upper bound) is refused here and logged as information.
        poisson_sampling: sample each example independently with rate q = expected global batch / N.
        clipping: flat (whole gradient) | per_layer (each tensor to C / sqrt(#tensors)) | automatic (each gradient
            scaled by C / (norm + clipping_gamma): norm < C for every example).
        lora_freeze_a: FFA-LoRA: the LoRA A matrices stay at their initialisation; only B (and the head) are
            trained, clipped, noised and released.
        dp_adam_bias_correction / dp_adam_gamma: DP-AdamBC, AdamW with the noise variance subtracted from its
            second moment (post-processing).
        noise_seed: seed of the noise generator (default: fresh OS entropy; set it only for tests). It is never
            written into saved arguments, checkpoints or the Hub.
        max_physical_batch_size: the most rows one forward/backward pass holds; a larger Poisson draw is split
            (memory only: the privacy step is unchanged).
        prior_privacy_report / assume_fresh_adapter: what an adapter that was already trained has spent (the
            ``privacy_report.json`` saved with it), or the explicit statement that its earlier training used
            none of this data.
        disable_dp: a non-private baseline through the same code path (no clipping, no noise, epsilon = inf).

    DR-Encoder codec (stage 2; see docs/codec.md):
        codec: ``None`` (send the LoRA gradient as is), ``"auto"`` (run stage 1 on the training data first:
            private statistics, prior, codec; its cost is in the same accountant), ``"subspace"`` (a subspace that
            follows training, from released gradients and a public seed: no stage 1, no privacy cost; best with
            ``noise_space="latent"``), or a path / Hub id of a saved codec. A codec object can also be passed to
            ``DRTrainer(codec=...)``.
        noise_space: gradient (clip and noise the gradient, then encode: the codec is post-processing) |
            latent (encode each example's gradient with the codec's fixed linear encoder, clip and noise the
            latents: noise in k << d dimensions).
        codec_latent_ratio: values sent per gradient value (``"auto"``, ``"subspace"``).
        codec_prior, codec_stats_noise_multiplier, codec_stats_batches, codec_stats_batch_size: stage 1 of
            ``codec="auto"``.

    LoRA (used only when the model is not a ``PeftModel`` and no ``peft_config`` is given):
        default_lora_r, default_lora_alpha, default_lora_dropout, default_lora_target_modules (named apart from
        a script's own ``lora_*`` arguments, e.g. TRL's ``ModelConfig``, so both parse side by side).

    From the environment: ``HF_DRENCODER_<FIELD>`` (e.g. ``HF_DRENCODER_TARGET_EPSILON=3``) or a JSON/YAML file of
    ``{field: value}`` named in ``HF_DRENCODER_CONFIG``. A value from there replaces a field left at its default
    (and one of target_epsilon / noise_multiplier replaces the other); one that contradicts a value the script set
    is refused. The privacy-in-force log line names what came from the environment.

    The expected batch of one optimizer step is
    ``per_device_train_batch_size * gradient_accumulation_steps * world_size``; with Poisson sampling the
    drawn batch varies around it.
    """

    target_epsilon: float | None = field(
        default=None,
        metadata={"help": "Privacy budget epsilon. The noise multiplier is calibrated to reach it at the planned "
                  "number of steps, and training stops before it is exceeded. Set exactly one of target_epsilon and "
                  "noise_multiplier."},
    )
    target_delta: float | None = field(
        default=None,
        metadata={"help": "delta of the (epsilon, delta) guarantee. Default: 1 / number of training examples. "
                  "Values above 1/N are refused (they allow releasing an example outright)."},
    )
    noise_multiplier: float | None = field(
        default=None,
        metadata={"help": "Noise standard deviation as a multiple of per_sample_max_grad_norm. Set exactly one of "
                  "target_epsilon and noise_multiplier."},
    )
    per_sample_max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "C: each example's LoRA gradient is clipped to L2 norm <= C (the sensitivity of the sum)."},
    )
    accountant: str = field(
        default="prv",
        metadata={"help": "Accountant for calibration, the budget stop and the headline epsilon: prv, pld or rdp (upper "
                  "bounds). All three are logged, with GDP's mu and epsilon as information (GDP is refused here: for q < 1 it "
                  "is an approximation that can under-report).", "choices": list(ACCOUNTANTS)},
    )
    poisson_sampling: bool = field(
        default=True,
        metadata={"help": "Poisson sampling: each example joins a batch independently with rate q = expected global "
                  "batch / N. Required under DP (the accountants assume it); false only with --disable_dp."},
    )
    clipping: str = field(
        default="flat",
        metadata={"help": "flat: clip each example's whole gradient to C; per_layer: clip each tensor to C/sqrt(P); "
                  "automatic: scale each example's gradient by C / (norm + clipping_gamma) (automatic clipping: every "
                  "example gets norm just under C, the sensitivity is still C).",
                  "choices": list(CLIPPING_MODES)},
    )
    clipping_gamma: float = field(
        default=DEFAULT_CLIPPING_GAMMA,
        metadata={"help": "clipping='automatic': gamma in C / (norm + gamma), > 0. Gradients with norm well above gamma "
                  "are scaled to norm ~C, smaller ones proportionally less."},
    )
    lora_freeze_a: bool = field(
        default=False,
        metadata={"help": "FFA-LoRA: keep every LoRA A matrix at its random initialisation and train (and release) only "
                  "B and the classification head: about half the released dimensions, so the same noise multiplier "
                  "puts noise in half as many coordinates. A depends on the initialisation seed, not on the data; it "
                  "is saved with the adapter."},
    )
    dp_adam_bias_correction: bool = field(
        default=False,
        metadata={"help": "DP-AdamBC: AdamW whose second-moment estimate has the known noise variance "
                  "(noise_multiplier * C / expected batch)^2 per coordinate subtracted, floored at dp_adam_gamma. "
                  "Post-processing of the released gradients (no privacy cost). Needs DP (refused with disable_dp), "
                  "optim='adamw_torch' and no codec."},
    )
    dp_adam_gamma: float = field(
        default=1e-8,
        metadata={"help": "dp_adam_bias_correction: the floor gamma' of the corrected second moment, "
                  "max(v_hat - noise variance, gamma'); it replaces Adam's epsilon. > 0."},
    )
    noise_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the noise generator. Default: drawn from OS entropy. Seeded noise is reproducible "
                  "noise: use it for tests, not for a release."},
    )
    privacy_unit: str = field(
        default="example",
        metadata={"help": "What the guarantee protects: 'example' (one row) or 'group' (all rows sharing a value of "
                  "group_by_column, e.g. one user). With 'group' the batch sizes count groups.",
                  "choices": list(PRIVACY_UNITS)},
    )
    group_by_column: str | None = field(
        default=None, metadata={"help": "privacy_unit='group': the column naming each row's group (e.g. user_id)."}
    )
    max_rows_per_group: int | None = field(
        default=None,
        metadata={"help": "privacy_unit='group': use at most this many of a sampled group's rows per step (chosen at "
                  "random); default: all of them."},
    )
    max_physical_batch_size: int | None = field(
        default=None,
        metadata={"help": "Most rows in one forward/backward pass. A Poisson micro-batch larger than this is split into "
                  "several passes whose clipped gradients are summed into the same step (memory only; the privacy "
                  "analysis is unchanged). Default: no cap."},
    )
    prior_privacy_report: str | None = field(
        default=None,
        metadata={"help": "The privacy_report.json (or the folder holding it) of the run that trained the adapter you "
                  "start from. Its releases are added to this run's accountant, so epsilon covers both runs."},
    )
    assume_fresh_adapter: bool = field(
        default=False,
        metadata={"help": "Start the privacy accounting from zero although the adapter has been trained before, "
                  "declaring that its earlier training used no row of this train_dataset (or only public data). "
                  "Wrong use under-reports epsilon."},
    )
    disable_dp: bool = field(
        default=False,
        metadata={"help": "Train without privacy through the same code path (a baseline). epsilon is reported as inf."},
    )
    codec: str | None = field(
        default=None,
        metadata={"help": "DR-Encoder gradient codec: 'auto' (stage 1 on the training data, privately, before "
                  "training), 'subspace' (a subspace that follows training: no stage 1, no privacy cost), a path or Hub id of "
                  "a saved codec, or unset (no codec)."},
    )
    noise_space: str = field(
        default="gradient",
        metadata={"help": "Where clipping and noise happen with a codec: 'gradient' (then encode; the encoder only "
                  "sees noised gradients) or 'latent' (clip and noise per-example latents of the codec's fixed "
                  "linear encoder).", "choices": list(NOISE_SPACES)},
    )
    codec_latent_ratio: float = field(
        default=1 / 64, metadata={"help": "codec='auto' or 'subspace': latent size over gradient size (the uplink ratio)."}
    )
    codec_prior: str = field(
        default="lowrank",
        metadata={"help": "codec='auto': prior built from the stage-1 statistics (paper, element, lowrank).",
                  "choices": ["paper", "element", "lowrank"]},
    )
    codec_stats_noise_multiplier: float = field(
        default=1.0, metadata={"help": "codec='auto': noise multiplier of the stage-1 statistics release."}
    )
    codec_stats_batches: int = field(
        default=4, metadata={"help": "codec='auto': number of Poisson batches whose statistics stage 1 releases."}
    )
    codec_stats_batch_size: int | None = field(
        default=None,
        metadata={"help": "codec='auto': expected batch of each stage-1 release (default: min(256, N))."},
    )
    default_lora_r: int = field(
        default=8, metadata={"help": "LoRA rank for the default LoRA config (a plain model and no peft_config)."}
    )
    default_lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha for the default LoRA config."})
    default_lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout for the default LoRA config."})
    default_lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt for the default LoRA config (default: peft's choice for the architecture)."},
    )

    def __post_init__(self):
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()
        self._apply_environment()
        self.validate_privacy()

    def _apply_environment(self) -> None:
        """Privacy settings from ``HF_DRENCODER_*`` / ``HF_DRENCODER_CONFIG`` (see the class docstring)."""
        overrides = environment_overrides(DRArgumentsMixin)
        applied = {}
        for name, value in overrides.items():
            current, default = getattr(self, name), settings_default(DRArgumentsMixin, name)
            if current == value:
                applied[name] = value
            elif current == default:
                setattr(self, name, value)
                applied[name] = value
            else:
                raise ValueError(
                    f"{name}: the script sets {current!r} and the environment ({ENV_PREFIX}{name.upper()} or "
                    f"{CONFIG_ENV}) sets {value!r}. Remove one of them"
                )
        for name in list(applied):
            other = ALTERNATIVES.get(name)
            if other and other not in overrides and applied[name] is not None and getattr(self, other) is not None:
                setattr(self, other, None)  # the environment chose the other alternative
        self._privacy_from_environment = applied

    def validate_privacy(self) -> None:
        """Refuse settings under which the guarantee cannot hold or is undefined (before any training)."""
        check_accountant(self.accountant)
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping={self.clipping!r} is unknown: choose one of {', '.join(CLIPPING_MODES)}")
        if self.noise_space not in NOISE_SPACES:
            raise ValueError(f"noise_space={self.noise_space!r} is unknown: choose one of {', '.join(NOISE_SPACES)}")
        if self.noise_space == "latent" and self.clipping == "per_layer":
            raise ValueError("noise_space='latent' clips the whole latent of an example: use clipping='flat' or "
                             "'automatic'")
        if not (self.clipping_gamma > 0 and math.isfinite(self.clipping_gamma)):
            raise ValueError(f"clipping_gamma={self.clipping_gamma} must be positive and finite")
        if self.dp_adam_bias_correction:
            self._check_dp_adam()
        if self.codec is not None and self.codec == "auto" and not (
            self.codec_stats_noise_multiplier > 0 and math.isfinite(self.codec_stats_noise_multiplier)
        ):
            raise ValueError("codec_stats_noise_multiplier must be positive and finite (stage 1 is a private release)")
        if self.codec_stats_batches < 1:
            raise ValueError("codec_stats_batches must be >= 1")
        if self.privacy_unit not in PRIVACY_UNITS:
            raise ValueError(f"privacy_unit={self.privacy_unit!r} is unknown: choose one of {', '.join(PRIVACY_UNITS)}")
        if self.privacy_unit == "group" and not self.group_by_column:
            raise ValueError("privacy_unit='group' needs group_by_column: the column that names each row's group")
        if self.privacy_unit != "group" and (self.group_by_column or self.max_rows_per_group):
            raise ValueError(
                "group_by_column / max_rows_per_group are only used with privacy_unit='group'; set privacy_unit='group' "
                "to protect whole groups, or unset them"
            )
        if self.max_rows_per_group is not None and self.max_rows_per_group < 1:
            raise ValueError(f"max_rows_per_group={self.max_rows_per_group} must be >= 1 (or unset: every row)")
        if self.privacy_unit == "group" and self.codec == "auto":
            raise ValueError(
                "codec='auto' with privacy_unit='group': stage 1 samples rows, not groups. Pre-train the codec "
                "(hf-drencoder pretrain-codec) and pass its path, or use no codec"
            )
        if self.max_physical_batch_size is not None and self.max_physical_batch_size < 1:
            raise ValueError(f"max_physical_batch_size={self.max_physical_batch_size} must be >= 1 (or unset: no cap)")
        if self.target_delta is not None and not (0 < self.target_delta < 1):
            raise ValueError(f"target_delta={self.target_delta} must be in (0, 1); typically well below 1/N")
        if self.disable_dp:
            return
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            which = "both" if self.target_epsilon is not None else "neither"
            raise ValueError(
                f"set exactly one of target_epsilon and noise_multiplier ({which} is set): target_epsilon to let "
                "DRTrainer calibrate the noise, or noise_multiplier to fix it; or disable_dp=True for a non-private run"
            )
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon={self.target_epsilon} must be a positive finite number")
        if self.noise_multiplier is not None and not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be positive (0 would be no privacy: use disable_dp)")
        if not (self.per_sample_max_grad_norm > 0 and math.isfinite(self.per_sample_max_grad_norm)):
            raise ValueError(
                f"per_sample_max_grad_norm={self.per_sample_max_grad_norm} must be a positive finite number (it is the "
                "sensitivity the noise is scaled to)"
            )
        if not self.poisson_sampling:
            raise ValueError(
                "poisson_sampling=False is refused under DP: the accountants analyse Poisson subsampling, and "
                "shuffled fixed-size batches have no matching analysis here. Keep poisson_sampling=True, or use "
                "disable_dp=True for a non-private run"
            )

    def _check_dp_adam(self) -> None:
        """DP-AdamBC subtracts the noise variance of the released gradient: refused where there is none, where the
        optimizer is not AdamW, or where a codec changes the noise the optimizer sees."""
        if self.disable_dp:
            raise ValueError("dp_adam_bias_correction=True with disable_dp=True: there is no noise to correct for; "
                             "unset dp_adam_bias_correction for the non-private run")
        if str(getattr(self.optim, "value", self.optim)) not in ("adamw_torch", "adamw_torch_fused"):
            raise ValueError(f"dp_adam_bias_correction=True replaces AdamW, but optim={self.optim!r}: use "
                             "optim='adamw_torch' (the default) or unset dp_adam_bias_correction")
        if self.codec is not None:
            raise ValueError("dp_adam_bias_correction=True with a codec: the decoded gradient's noise is not the "
                             "gradient mechanism's (noise_multiplier * C / B)^2 per coordinate; use one or the other")
        if not (self.dp_adam_gamma > 0 and math.isfinite(self.dp_adam_gamma)):
            raise ValueError(f"dp_adam_gamma={self.dp_adam_gamma} must be positive and finite")

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides):
        """Arguments of ``args``' own class plus the privacy settings: every field of ``args``, the swap-in
        privacy defaults (target_epsilon=8), the environment's privacy settings, then ``overrides``."""
        target = cls if issubclass(cls, type(args)) else private_arguments_class(type(args))
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(type(args)) if f.init}
        env = environment_overrides(DRArgumentsMixin)
        defaults = {k: v for k, v in SWAP_IN_DEFAULTS.items() if k not in env and ALTERNATIVES.get(k) not in env}
        values.update(defaults)
        values.update(overrides)
        return target(**values)


@dataclass
class DRTrainingArguments(DRArgumentsMixin, TrainingArguments):
    __doc__ = DRArgumentsMixin.__doc__


_PRIVATE_CLASSES: dict[type, type] = {TrainingArguments: DRTrainingArguments}


def private_arguments_class(base: type) -> type:
    """``base`` (a ``TrainingArguments`` subclass, e.g. ``Seq2SeqTrainingArguments`` or TRL's ``SFTConfig``) with
    the privacy fields of `DRArgumentsMixin` added; ``base`` itself when it has them already."""
    if issubclass(base, DRArgumentsMixin):
        return base
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"expected a TrainingArguments class, got {base!r}")
    if base not in _PRIVATE_CLASSES:
        name = f"DR{base.__name__}"
        body = {"__doc__": DRArgumentsMixin.__doc__, "__module__": __name__}
        if any(f.name == "gradient_checkpointing" and f.default is True for f in dataclasses.fields(base)):
            # (TRL's SFTConfig turns it on by default; it re-runs forward hooks and breaks per-example gradients)
            body["__annotations__"] = {"gradient_checkpointing": bool}
            body["gradient_checkpointing"] = field(default=False, metadata={"help": "Refused under DP."})
        cls = dataclass(type(name, (DRArgumentsMixin, base), body))
        globals()[name] = cls  # importable by name, so that saved arguments unpickle in this process
        _PRIVATE_CLASSES[base] = cls
    return _PRIVATE_CLASSES[base]


def parse_args_with_defaults(parser, defaults: dict, argv: list[str] | None = None):
    """``parser.parse_args_into_dataclasses`` with script defaults (``parser`` is an ``HfArgumentParser`` over
    dataclasses that include `DRTrainingArguments`); a single ``.json`` argument is read as a file.

    A ``--noise_multiplier`` on the command line drops a default ``target_epsilon``: the two are alternatives,
    and a script default must not make the user's choice an error."""
    import os
    import sys

    args = sys.argv[1:] if argv is None else argv
    defaults = dict(defaults)
    if "--noise_multiplier" in {a.split("=")[0] for a in args}:
        defaults.pop("target_epsilon", None)
    env = environment_overrides(DRArgumentsMixin)  # the environment's privacy settings replace the script's defaults
    for name in env:
        defaults.pop(name, None)
        defaults.pop(ALTERNATIVES.get(name), None)
    parser.set_defaults(**defaults)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)
