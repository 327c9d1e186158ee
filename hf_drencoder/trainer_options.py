"""Training options of `PrivateTrainerMixin` that change what is trained or how released gradients are used:
FFA-LoRA (``lora_freeze_a``) and DP-AdamBC (``dp_adam_bias_correction``). Automatic clipping is a clipping mode of
the mechanism (hf_drencoder/privacy/clipping.py)."""

from __future__ import annotations

import logging

from .dp_adam import DPAdamBC, released_noise_variance
from .lora import freeze_lora_a

logger = logging.getLogger("hf_drencoder.trainer")


class _OptionsMixin:
    """FFA-LoRA and DP-AdamBC in `PrivateTrainerMixin`."""

    def _apply_lora_freeze_a(self, model, args) -> None:
        """Before the adapter check: frozen A factors are neither trained nor released (only B and the head are
        clipped and noised). A stays in the saved adapter: it is a function of the initialisation seed, not of
        the training data, so publishing it costs no privacy."""
        if args.lora_freeze_a:
            freeze_lora_a(model)

    def _check_optimizer_options(self) -> None:
        if self.args.dp_adam_bias_correction and (self.optimizer is not None or self.optimizer_cls_and_kwargs is not None):
            raise ValueError(
                "dp_adam_bias_correction=True builds its own optimizer (DP-AdamBC), but an optimizer was passed "
                "(optimizers= or optimizer_cls_and_kwargs=): pass one or the other"
            )

    @property
    def dp_adam_noise_variance(self) -> float:
        """Per-coordinate noise variance of the released mean gradient, (sigma C / B)^2: what DP-AdamBC subtracts."""
        if self.ledger is None:
            raise RuntimeError("the noise variance is known once train() has calibrated the noise")
        return released_noise_variance(self.ledger.noise_multiplier, self.args.per_sample_max_grad_norm,
                                       self.expected_batch_size)

    def create_optimizer(self, *args, **kwargs):
        if self.args.dp_adam_bias_correction and self.optimizer is None:
            # post-processing of the released gradients: the variance is a function of public constants
            self.optimizer_cls_and_kwargs = (DPAdamBC, dict(
                lr=self.args.learning_rate, betas=(self.args.adam_beta1, self.args.adam_beta2),
                noise_variance=self.dp_adam_noise_variance, gamma=self.args.dp_adam_gamma,
            ))
        return super().create_optimizer(*args, **kwargs)

    def released_dimension(self) -> int:
        """Coordinates of one released gradient (before a codec): the trainable adapter tensors."""
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _options_in_force(self) -> str:
        """The options' part of the privacy-in-force log line."""
        text = f"released dimension={self.released_dimension()}"
        if getattr(self, "codec", None) is not None and self.args.noise_space == "latent":
            text += f" (clipped and noised in the codec's latent: {self.codec.latent_dim} dimensions)"
        if self.args.clipping == "automatic":
            text += f", clipping_gamma={self.args.clipping_gamma:g}"
        if self.args.lora_freeze_a:
            text += " (lora_freeze_a: LoRA A frozen at its initialisation, only B and the head released)"
        if self.args.dp_adam_bias_correction:
            text += (f", optimizer=DP-AdamBC (noise variance {self.dp_adam_noise_variance:.3g} per coordinate, "
                     f"gamma' {self.args.dp_adam_gamma:g})")
        return text

    def _options_report(self) -> dict:
        report = {"released_dimension": self.released_dimension(), "lora_freeze_a": bool(self.args.lora_freeze_a),
                  "dp_adam_bias_correction": bool(self.args.dp_adam_bias_correction)}
        if self.args.clipping == "automatic":
            report["clipping_gamma"] = self.args.clipping_gamma
        return report
