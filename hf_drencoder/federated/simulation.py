"""FederatedSimulation: N parties and a server in one process, with client-level differential privacy.

One round (docs/federated.md):

    server samples parties (Poisson, rate q)         the accountant counts the round first: (sigma, q)
    each sampled party, from the global adapter:
        local steps on its own data                  non-private locally: the unit is the party
        update u = local - global (flat LoRA tensors)
        m = clip_C(u) + N(0, s^2 I)                  its own generator: nothing un-noised leaves it
        [encode with a linear codec]                 the message and its byte size (s = sigma C with noise_shares=1)
    server: R = sum m / sqrt(k) (k = 0: its own draw of one message's noise; noise_shares: server.py)
        update = decode(R / sqrt(q N))               q N is public; decoding is post-processing
    global adapter = server optimizer step (fedavg: += server_lr * update; fedadam: Adam on -update); log epsilon (every accountant), eval metrics, uplink bytes, parties

A party that raises is left out of the round (logged); the round is still counted with the same (sigma, q).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import time
from typing import Callable

import numpy as np
import torch

from ..codec.codec import GradientCodec
from ..codec.layout import LoraLayout
from ..lora import freeze_lora_a, trainable_adapter_parameters, wrap_with_lora
from ..losses import infer_task, per_sample_losses
from ..privacy.ledger import PrivacyLedger
from .accounting import aggregation_report, client_level_ledger, public_history, server_view_bound, server_view_epsilon, trust_report
from .arguments import FEDADAM_DEFAULTS, FederatedArguments
from .checkpoint import CODEC_DIR, FederationCheckpointMixin
from .partition import partition_indices
from .party import Party, PartyMessage, _model_inputs, log_party_failure
from .server import FederatedServer, aggregate_sensitivity, derive_seed, party_round_randomness
from .stage1 import FederatedStage1Mixin
from .server_optimizer import ServerOptimizer

logger = logging.getLogger(__name__)

HISTORY_NAME = "federated_history.json"
REPORT_NAME = "privacy_report.json"


class FederatedSimulation(FederatedStage1Mixin, FederationCheckpointMixin):
    """Federated DP LoRA fine-tuning of ``model`` over parties holding parts of ``train_dataset``.

    Args:
        model: a ``PeftModel``, or a transformers model wrapped with ``peft_config`` (or a default LoRA config
            from ``args.lora_*``). Only adapter tensors may be trainable.
        train_dataset: a tokenized ``datasets.Dataset`` (model inputs and ``labels``); it is split among
            ``args.num_parties`` parties by ``args.partition`` unless ``partitions`` (row indices per party) is given.
        args: `FederatedArguments`.
        eval_dataset: evaluated on the global adapter every ``args.eval_every`` rounds.
        compute_metrics: takes an ``EvalPrediction``, as Trainer's does.
        codec: a `GradientCodec` or `SubspaceCodec`, a folder or Hub id, ``"subspace"``, ``"auto"`` (stage 1 from the
            parties), or None (default: ``args.codec``). Its encoder must be linear.
        data_collator: turns a list of rows into a batch (default ``transformers.default_data_collator``).

    ``run()`` returns the per-round history (a list of dicts), also written to ``output_dir``.
    """

    def __init__(self, model, train_dataset, args: FederatedArguments, eval_dataset=None, codec=None, data_collator=None,
                 compute_metrics: Callable | None = None, peft_config=None, partitions: list[list[int]] | None = None):
        from transformers import default_data_collator

        self.args = args
        self.model = wrap_with_lora(model, peft_config, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                    target_modules=args.lora_target_modules)
        if args.lora_freeze_a:
            # FFA-LoRA: the simulation's one model serves every party, so every party trains B against the same A
            freeze_lora_a(self.model)
        # only adapter tensors may train: anything else would change without being clipped or noised
        self.params = [p for _, p in trainable_adapter_parameters(self.model)]
        self.layout = LoraLayout.from_model(self.model)
        self.task = infer_task(self.model)
        self.data_collator = data_collator or default_data_collator
        if partitions is None:
            partitions = partition_indices(train_dataset, args.num_parties, args.partition, args.dirichlet_alpha,
                                           args.label_column, args.partition_seed)
        if len(partitions) != args.num_parties:
            raise ValueError(f"{len(partitions)} partitions given for num_parties={args.num_parties}")
        self.partition_sizes = [len(p) for p in partitions]
        self.parties = [Party(i, train_dataset.select(idx), self.data_collator) for i, idx in enumerate(partitions)]
        self.eval_dataset = eval_dataset
        self.compute_metrics = compute_metrics
        self.codec_spec = codec if codec is not None else args.codec
        self.codec: GradientCodec | None = None
        self.ledger: PrivacyLedger | None = None
        self.server: FederatedServer | None = None
        self.history: list[dict] = []
        self.round = 0
        self.participation = np.zeros(args.num_parties, dtype=np.int64)
        self.stats_participation = np.zeros(args.num_parties, dtype=np.int64)
        self.sampling_seed = args.sampling_seed if args.sampling_seed is not None else secrets.randbits(63)
        # post-processing of the released aggregates: its state is saved with the federation, it costs no privacy
        self.server_optimizer = ServerOptimizer.from_args(args)
        self._ready = False
        self._batcher = None  # BatchedParties, made at the first batched round
        self._server_view_cache: dict = {}

    # ---- properties ----------------------------------------------------------------------------------------
    @property
    def dp_enabled(self) -> bool:
        return not self.args.disable_dp

    @property
    def expected_parties(self) -> float:
        return self.args.sample_rate * self.args.num_parties

    def _global_flat(self) -> torch.Tensor:
        return self.layout.flatten([p.detach().cpu() for p in self.params])

    def _set_global(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, t in zip(self.params, self.layout.unflatten(flat)):
                p.copy_(t.to(device=p.device, dtype=p.dtype))

    # ---- setup: resume, stage 1, calibration ---------------------------------------------------------------
    def _setup(self) -> None:
        if self._ready:
            return
        a = self.args
        self.ledger = client_level_ledger(a)
        if a.resume_from_checkpoint:
            self._load_state(a.resume_from_checkpoint)
        else:
            self._resolve_codec()
        remaining = a.num_rounds - self.round
        if remaining > 0 or self.ledger.noise_multiplier is None:
            self.ledger.calibrate(self.ledger.steps + max(remaining, 1))
        if self.codec_spec == "auto" and self.codec is None:
            self._pretrain_codec()
        sigma = self.ledger.noise_multiplier if self.dp_enabled else 0.0
        self.server = FederatedServer(self.layout, a.num_parties, a.sample_rate, a.max_update_norm if self.dp_enabled else math.inf,
                                      sigma, self.codec, self.sampling_seed, a.noise_seed, fixed_size=a.party_sampling == "fixed",
                                      noise_shares=a.noise_shares)
        self._log_privacy_parameters()
        self._ready = True

    def _log_privacy_parameters(self) -> None:
        a = self.args
        if not self.dp_enabled:
            logger.warning("FederatedSimulation: disable_dp=True, federated training WITHOUT differential privacy (epsilon = inf).")
            return
        logger.warning(
            "FederatedSimulation: client-level DP (unit=party), parties=%d, expected per round=%.4g, q=%.5g, noise_multiplier=%.4g, "
            "max_update_norm=%g, delta=%.3g, accountant=%s, target_epsilon=%s, rounds=%d, codec=%s, budget lasts %s releases; "
            "released dimension=%d%s.",
            a.num_parties, self.expected_parties, a.sample_rate, self.ledger.noise_multiplier, a.max_update_norm, a.delta,
            a.accountant, a.target_epsilon, a.num_rounds, "none" if self.codec is None else f"{self.codec.latent_dim} values",
            self.ledger.max_total_steps if self.ledger.max_total_steps is not None else "unbounded", self.layout.dim,
            " (lora_freeze_a: LoRA A frozen at its initialisation, only B and the head sent)" if a.lora_freeze_a else "",
        )
        tau_per_norm = FEDADAM_DEFAULTS["server_tau"]  # the default tau is for max_update_norm 1
        if a.server_optimizer == "fedadam" and a.server_tau > 2 * tau_per_norm * a.max_update_norm:
            logger.warning(
                "FederatedSimulation: server_tau=%g is %.3g x max_update_norm=%g. Adam's step is m / (sqrt(v) + tau), and "
                "the updates shrink with max_update_norm while tau does not, so tau dominates and the server steps "
                "shrink (population benchmark, max_update_norm 0.1: 0.714 with tau 1e-3, 0.747 with 1e-4; "
                "docs/federated.md). Set server_tau = %g x max_update_norm = %.3g",
                a.server_tau, a.server_tau / a.max_update_norm, a.max_update_norm, tau_per_norm, tau_per_norm * a.max_update_norm)
        if self.codec is not None and getattr(self.codec, "clips_in_latent", False):
            k, d = self.codec.latent_dim, self.layout.dim
            shrink = math.sqrt(k / d)
            logger.warning(
                "FederatedSimulation: max_update_norm=%g bounds each party's latent (%d of %d values), and the noise scales "
                "with it. A latent keeps about sqrt(k/d) = %.3g of its update's norm: max_update_norm = C x %.3g gives the "
                "noise of an uncompressed run clipped at C (docs/codec.md, federated).", a.max_update_norm, k, d, shrink, shrink)

    # ---- one round ----------------------------------------------------------------------------------------
    def _local_update(self, party_id: int, round_index: int) -> torch.Tensor:
        a = self.args
        return self.parties[party_id].local_update(
            self.model, self.params, self.layout, steps=a.local_steps, batch_size=a.local_batch_size,
            learning_rate=a.local_learning_rate, optimizer=a.local_optimizer, task=self.task,
            seed=derive_seed(a.seed, round_index, party_id),
        )

    def party_step(self, party_id: int, round_index: int, update: torch.Tensor | None = None) -> PartyMessage:
        """What party ``party_id`` sends in training round ``round_index`` (the global adapter is unchanged);
        ``update``: its local update, already computed (by `batched_local_updates`)."""
        a = self.args
        s = self.server
        seed, generator = party_round_randomness(a.seed, a.noise_seed, round_index, party_id, self.dp_enabled)
        if update is not None:
            return self.parties[party_id].message(update, max_norm=s.max_norm, noise_multiplier=s.party_noise_multiplier,
                                                  generator=generator, codec=self.codec,
                                                  codec_noise_std=s.decode_noise_std or None)
        return self.parties[party_id].step(
            self.model, self.params, self.layout, steps=a.local_steps, batch_size=a.local_batch_size,
            learning_rate=a.local_learning_rate, optimizer=a.local_optimizer, task=self.task,
            seed=seed, max_norm=s.max_norm, noise_multiplier=s.party_noise_multiplier,
            generator=generator, codec=self.codec, codec_noise_std=s.decode_noise_std or None,
        )

    def _batched_updates(self, chunk: list[int], round_index: int) -> list[torch.Tensor] | None:
        """The local updates of ``chunk`` trained in one batch, or None (see `.batched.BatchedParties`)."""
        if self._batcher is None:
            from .batched import BatchedParties

            self._batcher = BatchedParties(self.model, self.params, self.layout, self.parties, self.data_collator,
                                           self.task)
        return self._batcher.updates(chunk, round_index, self.args)

    def run_round(self) -> dict:
        """One training round; returns its history record."""
        self._setup()
        r = self.round
        t0 = time.perf_counter()
        sampled = self.server.sample_parties(r)
        # count first: a round the budget does not allow is refused before any party trains
        self.ledger.record_step()
        messages, failed = [], []
        group = max(1, self.args.parallel_parties)
        for start in range(0, len(sampled), group):
            chunk = sampled[start : start + group]
            updates = self._batched_updates(chunk, r) if len(chunk) > 1 else None
            for i, pid in enumerate(chunk):
                try:
                    messages.append(self.party_step(pid, r) if updates is None else self.party_step(pid, r, updates[i]))
                except Exception as e:  # noqa: BLE001 - a failing party is left out, whatever it raised
                    failed.append(pid)
                    code = log_party_failure(pid, f"round {r + 1}", e)  # the full text: the party's log only
                    logger.warning("round %d: party %d is left out (%s)", r + 1, pid, code)
        update = self.server.aggregate_round(messages, r)
        self._set_global(self.server_optimizer.step(self._global_flat(), update, r))
        for m in messages:
            self.participation[m.party_id] += 1
        self.round += 1
        record = {
            "stage": "train", "round": self.round, "parties": sampled, "received": [m.party_id for m in messages],
            "failed": failed, "num_received": len(messages), "uplink_bytes": sum(m.num_bytes for m in messages),
            "uplink_bytes_per_party": self.server.message_bytes, "update_norm": float(update.norm()),
            "server_learning_rate": self.server_optimizer.lr_at(r),
            **self.ledger.metrics(), "epsilon_server_view": self.server_view_bound(),
            "epsilon_server_view_busiest": self.server_view_epsilon(),
        }
        a = self.args
        if self.eval_dataset is not None and (self.round == a.num_rounds or (a.eval_every and self.round % a.eval_every == 0)):
            record.update(self.evaluate())
        record["round_time_s"] = time.perf_counter() - t0
        self.history.append(record)
        logger.info("round %d: %d/%d parties, epsilon %.4g, uplink %d bytes%s", self.round, len(messages), len(sampled),
                    record["epsilon"], record["uplink_bytes"],
                    "".join(f", {k} {v:.4g}" for k, v in record.items() if k.startswith("eval_") and isinstance(v, float)))
        return record

    def run(self, max_rounds: int | None = None) -> list[dict]:
        """Run the remaining rounds (at most ``max_rounds`` in this call); returns the whole history."""
        from tqdm.auto import tqdm

        self._setup()
        a = self.args
        end = a.num_rounds if max_rounds is None else min(a.num_rounds, self.round + max_rounds)
        bar = tqdm(total=a.num_rounds, initial=self.round, desc="federated rounds", disable=a.disable_tqdm)
        try:
            while self.round < end:
                if not self.ledger.budget_allows_step():
                    logger.warning("Stopping after round %d: one more round would exceed target_epsilon=%s (epsilon spent: %.4f).",
                                   self.round, a.target_epsilon, self.ledger.metrics()["epsilon"])
                    break
                rec = self.run_round()
                post = {"eps": f"{rec['epsilon']:.3g}", "k": rec["num_received"]}
                post.update({k[5:]: f"{v:.3f}" for k, v in rec.items() if k.startswith("eval_") and isinstance(v, float)})
                bar.set_postfix(post)
                bar.update(1)
                self._write_history()
                if a.save_every and self.round % a.save_every == 0:
                    self.save_state(os.path.join(a.output_dir, f"round-{self.round}"))
        finally:
            bar.close()
        self.save_state(os.path.join(a.output_dir, "last-state"))
        self._write_history()
        return self.history

    # ---- evaluation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict:
        """``eval_loss`` (mean per-example loss) and ``eval_<metric>`` of ``compute_metrics`` on the global adapter."""
        from transformers import EvalPrediction

        data = eval_dataset if eval_dataset is not None else self.eval_dataset
        if data is None:
            raise ValueError("no eval_dataset")
        device = self.params[0].device
        keep = _model_inputs(self.model)
        problem_type = getattr(getattr(self.model, "config", None), "problem_type", None)
        was_training = self.model.training
        self.model.eval()
        losses, logits, labels = [], [], []
        bs = self.args.per_device_eval_batch_size
        try:
            for start in range(0, len(data), bs):
                batch = self.data_collator([data[i] for i in range(start, min(start + bs, len(data)))])
                y = batch["labels"].to(device)
                out = self.model(**{k: v.to(device) for k, v in batch.items() if k != "labels" and (keep is None or k in keep)})
                losses.append(per_sample_losses(out.logits, y, self.task, problem_type).cpu())
                if self.compute_metrics is not None:
                    logits.append(out.logits.float().cpu().numpy())
                    labels.append(y.cpu().numpy())
        finally:
            self.model.train(was_training)
        metrics = {"eval_loss": float(torch.cat(losses).mean())}
        if self.compute_metrics is not None:
            res = self.compute_metrics(EvalPrediction(predictions=np.concatenate(logits), label_ids=np.concatenate(labels)))
            metrics.update({f"eval_{k}": float(v) for k, v in res.items()})
        return metrics

    # ---- privacy report -----------------------------------------------------------------------------------
    def server_view_epsilon(self) -> float:
        """epsilon of the most exposed party against the server, which reads every message (see
        `.accounting.server_view_epsilon`)."""
        if not self.dp_enabled:
            return math.inf
        return server_view_epsilon(self.participation.tolist(), self.stats_participation.tolist(),
                                   self._party_noise_multiplier(), self.args.stats_noise_multiplier, self.args.delta,
                                   self._server_view_cache)

    def server_view_bound(self) -> float:
        """epsilon against the server of a party that sent a message in every round so far: a bound on every
        party's exposure that does not depend on who took part (see `.accounting.server_view_bound`)."""
        if not self.dp_enabled:
            return math.inf
        return server_view_bound(self._statistics_rounds(), self.round, self._party_noise_multiplier(),
                                 self.args.stats_noise_multiplier, self.args.delta, self._server_view_cache)

    def _party_noise_multiplier(self) -> float:
        """What one training message alone guarantees against its reader: each party's own noise multiplier."""
        a = self.args
        return self.ledger.noise_multiplier * aggregate_sensitivity(a.noise_shares) / math.sqrt(a.noise_shares)

    def _statistics_rounds(self) -> int:
        return int(sum(1 for h in self.history if h.get("stage") == "statistics"))

    def privacy_report(self) -> dict:
        """The privacy report written next to the model: nothing in it depends on who took part."""
        self._setup()
        a = self.args
        report = self.ledger.report()
        report.update({
            "privacy_unit": "party", "num_parties": a.num_parties, "expected_parties_per_round": self.expected_parties,
            "party_sampling": a.party_sampling, "max_update_norm": a.max_update_norm, "rounds": self.round,
            "statistics_rounds": self._statistics_rounds(),
            "stats_noise_multiplier": a.stats_noise_multiplier if self.codec_spec == "auto" else None,
            **trust_report(a), "epsilon_server_view": self.server_view_bound(),
            **aggregation_report(a, self.ledger.noise_multiplier),
            # post-processing of the released updates: not part of the accounting
            **self.server_optimizer.describe(),
            "codec_latent_dim": self.codec.latent_dim if self.codec is not None else None,
        })
        return report

    # ---- saving and resuming ------------------------------------------------------------------------------
    def public_history(self) -> list[dict]:
        """The history without who took part in each round and how many (see ``SERVER_ONLY_KEYS``)."""
        return public_history(self.history)

    def _write_history(self) -> None:
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, HISTORY_NAME), "w") as f:
            json.dump(self.public_history(), f, indent=2)

    def save_model(self, output_dir: str | None = None) -> None:
        """The global adapter (``save_pretrained``), the codec, the privacy report and the history."""
        output_dir = output_dir or self.args.output_dir
        self.model.save_pretrained(output_dir)
        if self.codec is not None:
            self.codec.save_pretrained(os.path.join(output_dir, CODEC_DIR))
        with open(os.path.join(output_dir, REPORT_NAME), "w") as f:
            json.dump(self.privacy_report(), f, indent=2)
        with open(os.path.join(output_dir, HISTORY_NAME), "w") as f:
            json.dump(self.public_history(), f, indent=2)


__all__ = ["FederatedSimulation"]
