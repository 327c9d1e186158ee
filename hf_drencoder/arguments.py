"""DRTrainingArguments: TrainingArguments plus the differential-privacy settings of DR-Encoder."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from .privacy.accounting import ACCOUNTANTS, check_accountant
from .privacy.clipping import CLIPPING_MODES

NOISE_SPACES = ("gradient", "latent")

# What a plain TrainingArguments gets when it is handed to DRTrainer (the swap-in case).
SWAP_IN_DEFAULTS = {"target_epsilon": 8.0}


@dataclass
class DRTrainingArguments(TrainingArguments):
    """Arguments of `DRTrainer`: everything ``TrainingArguments`` has, plus the privacy settings.

    Privacy (the unit protected is one training example):
        target_epsilon / noise_multiplier: exactly one. With ``target_epsilon`` the noise multiplier is
            solved for the planned number of optimizer steps and training stops before the budget is exceeded.
        target_delta: delta of the (epsilon, delta) guarantee; default 1 / len(train_dataset).
        per_sample_max_grad_norm: C, the L2 bound on each example's LoRA gradient (the sensitivity).
        accountant: prv | pld | rdp, used to calibrate, for the budget stop and the headline ``epsilon``. GDP (an
            approximation for q < 1, not an upper bound) is refused here and logged as information.
        poisson_sampling: sample each example independently with rate q = expected global batch / N.
        clipping: flat (whole gradient) | per_layer (each tensor to C / sqrt(#tensors)).
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
            private statistics, prior, codec; its cost is in the same accountant), or a path / Hub id of a saved
            `GradientCodec`. A codec object can also be passed to ``DRTrainer(codec=...)``.
        noise_space: gradient (clip and noise the gradient, then encode: the codec is post-processing) |
            latent (encode each example's gradient with the codec's fixed linear encoder, clip and noise the
            latents: noise in k << d dimensions).
        codec_latent_ratio, codec_prior, codec_stats_noise_multiplier, codec_stats_batches,
        codec_stats_batch_size: stage 1 of ``codec="auto"``.

    LoRA (used only when the model is not a ``PeftModel`` and no ``peft_config`` is given):
        lora_r, lora_alpha, lora_dropout, lora_target_modules.

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
        metadata={"help": "flat: clip each example's whole gradient to C; per_layer: clip each tensor to C/sqrt(P).",
                  "choices": list(CLIPPING_MODES)},
    )
    noise_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the noise generator. Default: drawn from OS entropy. Seeded noise is reproducible "
                  "noise: use it for tests, not for a release."},
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
                  "training), a path or Hub id of a saved GradientCodec, or unset (no codec)."},
    )
    noise_space: str = field(
        default="gradient",
        metadata={"help": "Where clipping and noise happen with a codec: 'gradient' (then encode; the encoder only "
                  "sees noised gradients) or 'latent' (clip and noise per-example latents of the codec's fixed "
                  "linear encoder).", "choices": list(NOISE_SPACES)},
    )
    codec_latent_ratio: float = field(
        default=1 / 64, metadata={"help": "codec='auto': latent size over LoRA gradient size (the uplink ratio)."}
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
    lora_r: int = field(default=8, metadata={"help": "LoRA rank for the default LoRA config (plain model, no peft_config)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha for the default LoRA config."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout for the default LoRA config."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt for the default LoRA config (default: peft's choice for the architecture)."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.validate_privacy()

    def validate_privacy(self) -> None:
        """Refuse settings under which the guarantee cannot hold or is undefined (before any training)."""
        check_accountant(self.accountant)
        if self.clipping not in CLIPPING_MODES:
            raise ValueError(f"clipping={self.clipping!r} is unknown: choose one of {', '.join(CLIPPING_MODES)}")
        if self.noise_space not in NOISE_SPACES:
            raise ValueError(f"noise_space={self.noise_space!r} is unknown: choose one of {', '.join(NOISE_SPACES)}")
        if self.noise_space == "latent" and self.clipping != "flat":
            raise ValueError("noise_space='latent' clips the whole latent of an example: use clipping='flat'")
        if self.codec is not None and self.codec == "auto" and not (
            self.codec_stats_noise_multiplier > 0 and math.isfinite(self.codec_stats_noise_multiplier)
        ):
            raise ValueError("codec_stats_noise_multiplier must be positive and finite (stage 1 is a private release)")
        if self.codec_stats_batches < 1:
            raise ValueError("codec_stats_batches must be >= 1")
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

    @classmethod
    def from_training_arguments(cls, args: TrainingArguments, **overrides) -> "DRTrainingArguments":
        """A DRTrainingArguments with every field of ``args`` and the swap-in privacy defaults."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
        values.update(SWAP_IN_DEFAULTS)
        values.update(overrides)
        return cls(**values)


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
    parser.set_defaults(**defaults)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses(args=argv)
