"""The codec of a federation (`FederatedSimulation`): resolved from ``codec=`` (an object, a folder or Hub id,
``"subspace"``), or built by DR-Encoder's stage 1 from the parties (``"auto"``): statistics rounds, each party
releasing noised statistics of its clipped update, accounted before training's noise is calibrated, then a codec
pre-trained on the prior."""

from __future__ import annotations

import logging
import math

from ..codec.codec import GradientCodec
from ..codec.loading import load_codec
from ..codec.statistics import PARTS, _part_sizes
from ..codec.subspace import SubspaceCodec
from ..privacy.accounting import PrivacyBudgetError, compute_epsilon
from .accounting import account_codec_prior, accounting_rate, is_local
from .party import PartyMessage, log_party_failure, statistics_message
from .server import FederatedServer, aggregate_sensitivity, derive_seed

logger = logging.getLogger("hf_drencoder.federated.simulation")  # the server's log, as the rest of the simulation (docs/federated.md)


FEDERATED_SUBSPACE_HISTORY = 0  # codec="subspace" in federated runs: a fresh random projection every round


class FederatedStage1Mixin:
    """The codec half of `FederatedSimulation` (it uses the simulation's args, ledger, parties and layout)."""

    def _resolve_codec(self) -> None:
        spec = self.codec_spec
        if spec is None:
            return
        if isinstance(spec, (GradientCodec, SubspaceCodec)):
            self.codec = spec
        elif spec == "subspace":  # a public seed and released updates only: no stage 1, no privacy cost
            # unbiased: the server applies the decoded update at its learning rate (a projection on k of d directions
            # would keep k/d of it). No history: in the population benchmark a fresh shared-seed projection every
            # round beat the subspace of released updates at 1/16 (0.744 against 0.707, 3 seeds) and tied it at 1/4
            # (0.783, 0.781), as those updates are mostly noise there (docs/codec.md). The budget is split in proportion
            # to size (head_share=None): half on the head, the central default, gave 0.688 against 0.744 at 1/16 (3
            # seeds). A SubspaceCodec object sets its own.
            self.codec = SubspaceCodec.for_model(self.model, self.args.codec_latent_ratio, seed=self.args.seed,
                                                 scale="unbiased", history=FEDERATED_SUBSPACE_HISTORY, head_share=None)
        elif spec == "auto":
            if self.args.stats_rounds < 1:
                raise ValueError("codec='auto' needs stats_rounds >= 1 (the prior is built from the parties' statistics)")
            self._run_statistics_rounds()
            return
        elif isinstance(spec, str):
            self.codec = load_codec(spec, self.model)
        else:
            raise TypeError(f"codec must be a GradientCodec or SubspaceCodec, a folder or Hub id, 'auto', 'subspace' or "
                            f"None; got {type(spec).__name__}")
        self.codec.check_layout(self.model)
        account_codec_prior(self.ledger, self.codec, local=is_local(self.args))

    def _run_statistics_rounds(self) -> None:
        """Stage 1 from the parties: each sampled party releases noised statistics of its clipped update
        (locally); the server aggregates them and builds the prior. One accountant step (z, q) per round."""
        from ..codec.priors import build_prior

        a = self.args
        z = a.stats_noise_multiplier if self.dp_enabled else 0.0
        rate = accounting_rate(a)
        if self.dp_enabled and a.target_epsilon is not None:
            spent = compute_epsilon([(z, rate, a.stats_rounds)], a.delta, a.accountant)
            if spent >= a.target_epsilon:
                raise PrivacyBudgetError(
                    f"the {a.stats_rounds} stage-1 statistics rounds alone would spend epsilon={spent:.3f} >= "
                    f"target_epsilon={a.target_epsilon}: raise stats_noise_multiplier or lower stats_rounds"
                )
        stats_server = FederatedServer(self.layout, a.num_parties, a.sample_rate, a.max_update_norm, z, None,
                                       self.sampling_seed, a.noise_seed)
        per_round = []
        for t in range(a.stats_rounds):
            index = -(t + 1)
            sampled = stats_server.sample_parties(index)
            if self.dp_enabled:
                self.ledger.accountant.step(z, rate)  # counted before anything is released
            messages, failed = [], []
            for pid in sampled:
                try:
                    update = self._local_update(pid, index)
                    seed = derive_seed(a.noise_seed, 3, index, pid)
                    payload = statistics_message(update, self.layout, a.max_update_norm, z, seed)
                    messages.append(PartyMessage(pid, payload, "statistics"))
                except Exception as e:  # noqa: BLE001 - a failing party is left out, whatever it raised
                    failed.append(pid)
                    code = log_party_failure(pid, f"stage-1 round {t + 1}", e)  # the full text: the party's log only
                    logger.warning("stage-1 round %d: party %d is left out (%s)", t + 1, pid, code)
            for m in messages:
                self.stats_participation[m.party_id] += 1
            per_round.append(messages)
            record = {"stage": "statistics", "round": t + 1, "parties": sampled, "received": [m.party_id for m in messages],
                      "failed": failed, "num_received": len(messages),
                      "uplink_bytes": sum(m.num_bytes for m in messages),
                      "uplink_bytes_per_party": 4 * sum(_part_sizes(self.layout)[p] for p in PARTS),
                      **self.ledger.metrics(), "noise_multiplier": z}
            self.history.append(record)
        self._statistics = stats_server.aggregate_statistics(per_round, z)
        self._prior = build_prior(self._statistics, a.codec_prior, expected_batch_size=self.expected_parties)

    def _pretrain_codec(self) -> None:
        from ..codec.pretrain import pretrain_codec

        sigma = self.ledger.noise_multiplier if self.dp_enabled else 0.0
        a = self.args
        # the noise the server decodes at: that of R / sqrt(m q N) (FederatedServer.decode_noise_std)
        noise = sigma * aggregate_sensitivity(a.noise_shares) * a.max_update_norm / math.sqrt(a.noise_shares * self.expected_parties)
        # lora_rank=0: the low-rank part's encoder is not linear, and latents are summed across parties
        self.codec = pretrain_codec(self._prior, self.args.codec_latent_ratio, noise_std=noise if noise > 0 else None,
                                    lora_rank=0, seed=self.args.seed, progress=False)


__all__ = ["FederatedStage1Mixin"]
