"""The DR-Encoder codec inside a private trainer: loading a saved codec, or stage 1 (private statistics, prior,
pre-training) for ``codec="auto"``, and the uplink it implies. Stage 1's cost goes into the trainer's ledger before
the training noise is calibrated."""

from __future__ import annotations

import logging
import os

import torch

from .callbacks import CODEC_DIR
from .privacy.accounting import PrivacyBudgetError

logger = logging.getLogger("hf_drencoder.trainer")


class _CodecMixin:
    """Codec set-up of `PrivateTrainerMixin`."""

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
        if isinstance(spec, str) and spec == "subspace":
            # a public seed and the released gradients only: nothing to pay for, nothing to load
            from .codec.subspace import SubspaceCodec

            self.codec = self._checked_codec(SubspaceCodec.for_model(self.layout, self.args.codec_latent_ratio,
                                                                     seed=self.args.seed))
            if self.args.noise_space != "latent" and self.dp_enabled:
                logger.warning(
                    "DRTrainer: codec='subspace' with noise_space='gradient' clips each example's whole gradient and "
                    "projects the noised sum, which keeps little of the signal (on the demo task at 1/64: 0.53 accuracy "
                    "against 0.70 in latent space, docs/codec.md). Set noise_space='latent' to clip and noise the latent")
            return None
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
        from .codec.baselines import BaselineCodec

        codec.check_layout(self.layout)
        if self.args.noise_space == "latent" and isinstance(codec, BaselineCodec):
            raise ValueError(
                f"noise_space='latent' needs a fixed linear encoder; the {codec.kind} baseline compresses the released "
                "gradient (error feedback, a fresh projection per step). Use noise_space='gradient'"
            )
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

        dataset, collator = self._model_rows_and_collator()
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
        """Bytes one step sends off the party: with a codec its fp32 latent plus the fp32 head values sent raw next to
        it (every byte that leaves the party counted, head included), without one the fp32 LoRA gradient."""
        if self.codec is not None:
            return self.codec.payload_bytes
        return 4 * (self.layout.dim if self.layout is not None else sum(p.numel() for p in self._params))

    @property
    def uplink_ratio(self) -> float:
        return self.uplink_bytes / (4 * self.layout.dim)
