"""What a private run tells its user: the privacy parameters logged when training starts, epsilon and the uplink
bytes in every log (``report_to`` included), and `privacy_report`, for `PrivateTrainerMixin`."""

from __future__ import annotations

import logging

from .arguments import SWAP_IN_DEFAULTS
from .callbacks import PrivacyCallback

logger = logging.getLogger("hf_drencoder.trainer")


class _ReportingMixin:
    """Logging and the privacy report for `PrivateTrainerMixin`."""

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
        name = type(self).__name__
        env = getattr(self.args, "_privacy_from_environment", None) or {}
        swapped = {k: v for k, v in SWAP_IN_DEFAULTS.items() if k not in env and getattr(self.args, k) == v}
        prefix = (
            f"{name} got a plain {self._swap_in} and added the privacy settings"
            + (f" (defaults: {', '.join(f'{k}={v}' for k, v in swapped.items())})" if swapped else "") + ". "
            if self._swap_in else f"{name}: "
        )
        if env:
            prefix += "From the environment: " + ", ".join(f"{k}={v}" for k, v in env.items()) + ". "
        if self._wrapped_plain_model:
            cfg = self.model.peft_config["default"]
            prefix += (
                f"The model is not a PeftModel: training a LoRA adapter (r={cfg.r}, target modules "
                f"{sorted(cfg.target_modules or [])}) instead of the full model. "
            )
        logger.warning(
            "%sprivacy in force: unit=%s, N=%d, expected batch=%d, sample_rate=%.5g, noise_multiplier=%.4g, "
            "per_sample_max_grad_norm=%g, clipping=%s, delta=%.3g, accountant=%s, target_epsilon=%s, planned steps=%d, "
            "budget lasts %s steps; %s.",
            prefix, self.ledger.unit, n, self.expected_batch_size, self.ledger.sample_rate, self.ledger.noise_multiplier,
            self.ledger.max_grad_norm, self.args.clipping, self.ledger.delta, self.args.accountant,
            self.args.target_epsilon, planned,
            self.ledger.max_total_steps if self.ledger.max_total_steps is not None else "unbounded",
            self._options_in_force(),
        )

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
        report.update(self._options_report())
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
