"""The federated mode on Flower: one party per SuperNode (a ClientApp), the server step in a Strategy.

Nothing here re-implements privacy. The ClientApp runs the party step of `.party` (local training from
the global adapter, clip to C, add N(0, sigma^2 C^2 I) from the party's own generator, encode) and sends only
that message. `ClientLevelDPStrategy` runs the server step of `.server` (Poisson sampling of the
parties, ``sum / sqrt(k)``, decode) and counts each round in a `PrivacyLedger`
at (sigma, q) before anything is sent, exactly as `FederatedSimulation` does in
one process. docs/scaling.md ("Federation with Flower") has what runs where and what crosses the network.
The ClientApp is in `.flower_party`, what both sides share in `.flower_common`.

A Flower App (``pyproject.toml`` with ``[tool.flwr.app.components]``; ``examples/flower-app/`` is a complete one)
points at two objects built here::

    from hf_drencoder.federated.flower import FlowerParty, server_app

    server = server_app(model_fn)                      # FederatedArguments from the run config
    client = FlowerParty(model_fn, data_fn).client_app()

``model_fn(context)`` returns the base model (or a PeftModel) and ``data_fn(partition_id, num_partitions,
context)`` the tokenized training rows of one party. Run it with ``flwr run`` on a SuperLink and SuperNodes
(each started with ``--node-config "partition-id=<i> num-partitions=<N>"``), or with
``flwr.simulation.run_simulation`` (Flower's simulation engine, which sets the partition ids itself).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from typing import Callable

import numpy as np
import torch

from ..codec.layout import LoraLayout
from ..lora import trainable_adapter_parameters, wrap_with_lora
from ..privacy.accounting import PrivacyBudgetError
from .accounting import (SERVER_ONLY_KEYS, account_codec_prior, aggregation_report, client_level_ledger, is_local, public_history,
                         server_view_bound, server_view_epsilon, trust_report)
from .arguments import FederatedArguments
from .flower_common import (FREEZE_A_ON_FLOWER, GLOBAL_ADAPTER, MESSAGE_SEED_KEYS, PARTY_MESSAGE, PARTY_META,
                            ROUND_CONFIG, _flat, _load_codec, federated_args_from_config, logger)
from .flower_party import FlowerParty
from .party import PARTY_CODES, PartyMessage
from .server import FederatedServer
from .server_optimizer import ServerOptimizer
from .simulation import HISTORY_NAME, REPORT_NAME

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Result, Strategy  # noqa: E402


# ---- the server: a Strategy -----------------------------------------------------------------------------------
class ClientLevelDPStrategy(Strategy):
    """Client-level DP FedAvg over a fixed population of ``args.num_parties`` SuperNodes.

    Sampling: before the first round the strategy waits until ``num_parties`` nodes are connected and fixes
    them as the population (sorted node ids; more nodes are left out with a warning). In every round each party
    of the population joins independently with probability q = parties_per_round / num_parties
    (`FederatedServer.sample_parties`), whether it is online or not, or exactly ``parties_per_round`` of
    them with ``party_sampling="fixed"`` (sampling without replacement, see `.accounting.client_level_ledger`).
    Flower's own samplers are not used. A sampled party that does not answer within
    ``round_timeout`` seconds, or answers with an error or a malformed message, is left out of the round; the
    round is counted all the same, at (sigma, q) (or k of n), before any message is sent.

    Aggregation and decoding are `FederatedServer.aggregate_round` (``sum / sqrt(k)``, a server-drawn
    phantom message when k = 0, ``decode(R / sqrt(q N))``). Per round the strategy logs epsilon (every
    accountant), the uplink bytes and the parties, and it stops before a round the budget does not allow.
    The parties seed their noise themselves: no seed is ever sent to them (``args.noise_seed`` seeds only the
    server's own draw when k = 0). ``history`` is the server's own record; `.accounting.public_history`
    of it, and the metrics a round returns, carry nothing that depends on who took part.
    """

    def __init__(self, args: FederatedArguments, layout: LoraLayout, codec=None, *, round_timeout: float = 600.0,
                 wait_for_parties_s: float = 600.0):
        if args.codec == "auto" or codec == "auto":
            _load_codec("auto", None)
        if args.lora_freeze_a:
            raise ValueError(FREEZE_A_ON_FLOWER)
        self.args = args
        self.layout = layout
        self.codec = codec
        self.round_timeout = float(round_timeout)
        self.wait_for_parties_s = float(wait_for_parties_s)
        self.dp_enabled = not args.disable_dp
        self.ledger = client_level_ledger(args)
        account_codec_prior(self.ledger, codec, local=is_local(args))  # before calibrating: the prior is paid from the same budget
        self.ledger.calibrate(args.num_rounds)
        sigma = self.ledger.noise_multiplier if self.dp_enabled else 0.0
        self.server = FederatedServer(layout, args.num_parties, args.sample_rate,
                                      args.max_update_norm if self.dp_enabled else math.inf, sigma, codec,
                                      args.sampling_seed, args.noise_seed, fixed_size=args.party_sampling == "fixed",
                                      noise_shares=args.noise_shares)
        # post-processing of the released aggregates (no privacy cost); its state lives as long as the strategy
        self.server_optimizer = ServerOptimizer.from_args(args)
        self.population: list[int] | None = None
        self.reported_party: dict[int, int] = {}  # node id -> the partition-id it reported
        self.participation = np.zeros(args.num_parties, dtype=np.int64)
        self.history: list[dict] = []
        self.round = 0
        self._global: torch.Tensor | None = None
        self._sent: dict[int, int] = {}
        self._sampled: list[int] = []
        self._t0 = 0.0

    # population ------------------------------------------------------------------------------------------------
    def _fix_population(self, grid: Grid) -> None:
        n = self.args.num_parties
        deadline = time.monotonic() + self.wait_for_parties_s
        while len(nodes := sorted(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(nodes)} of num_parties={n} parties connected after {self.wait_for_parties_s:.0f} s")
            time.sleep(1.0)
        if len(nodes) > n:
            logger.warning("%d nodes are connected but num_parties=%d: only the first %d (by node id) are parties of "
                           "this federation", len(nodes), n, n)
        self.population = nodes[:n]

    # Strategy interface --------------------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid):
        if self.population is None:
            self._fix_population(grid)
        sent_seed = [k for k in MESSAGE_SEED_KEYS if k in config]
        if sent_seed:
            raise PrivacyBudgetError(
                f"the train config holds {sent_seed[0]!r}: a seed sent to the parties would let the server replay their "
                "noise, and the parties refuse it. Seed each party locally (--node-config 'noise-seed=<n>') instead"
            )
        self._t0 = time.perf_counter()
        self._global = _flat(arrays, "adapter")
        r = self.round
        self._sampled = self.server.sample_parties(r)
        # count first: a round the budget does not allow is refused before any party is asked
        self.ledger.record_step()
        a, s = self.args, self.server
        cfg = {
            "round-index": r, "num-parties": a.num_parties, "noise-multiplier": s.party_noise_multiplier,
            "max-update-norm": s.max_norm, "decode-noise-std": s.decode_noise_std, "layout": self.layout.fingerprint,
            "codec": self.codec is not None, "local-steps": a.local_steps, "local-batch-size": a.local_batch_size,
            "local-learning-rate": a.local_learning_rate, "local-optimizer": a.local_optimizer, "seed": a.seed,
        }
        content = RecordDict({GLOBAL_ADAPTER: arrays, ROUND_CONFIG: ConfigRecord({**dict(config), **cfg})})
        self._sent = {self.population[i]: i for i in self._sampled}
        return [Message(content=content, message_type="train", dst_node_id=node) for node in self._sent]

    def _read_reply(self, reply: Message) -> PartyMessage:
        """The party's message, after checks that it is the message this round expects."""
        node = reply.metadata.src_node_id
        if node not in self._sent:
            raise ValueError(f"a reply from node {node}, which was not sampled")
        if reply.has_error():
            # a party of this library answers with a fixed code; any other text is not logged (it may quote data)
            reason = reply.error.reason if reply.error.reason in PARTY_CODES else "an error reason that is not logged"
            raise RuntimeError(f"the party answered {reason} (code {reply.error.code}); its own log has the details")
        meta = reply.content[PARTY_META]
        reported = int(meta["party-id"])
        if self.reported_party.setdefault(node, reported) != reported:
            raise ValueError(f"node {node} reported partition-id {reported}, before {self.reported_party[node]}")
        others = [n for n, p in self.reported_party.items() if p == reported and n != node]
        if others:
            # one party's data on two nodes would be sampled and released twice: its sensitivity is no longer C
            raise PrivacyBudgetError(
                f"nodes {node} and {others[0]} both report partition-id {reported}: one party on two SuperNodes breaks "
                "the client-level guarantee. Give every SuperNode its own partition-id"
            )
        if meta["layout"] != self.layout.fingerprint:
            raise ValueError(f"layout {meta['layout']} is not the server's {self.layout.fingerprint}")
        payload = _flat(reply.content[PARTY_MESSAGE], "payload")
        if 4 * payload.numel() != self.server.message_bytes:
            raise ValueError(f"a payload of {4 * payload.numel()} bytes; this round expects {self.server.message_bytes}")
        return PartyMessage(self._sent[node], payload, str(meta["kind"]))

    def aggregate_train(self, server_round: int, replies):
        messages, failed, seen = [], [], set()
        for reply in replies:
            node = reply.metadata.src_node_id
            try:
                message = self._read_reply(reply)
            except PrivacyBudgetError:
                raise
            except Exception as e:  # noqa: BLE001 - a bad reply is left out, whatever is wrong with it
                logger.warning("round %d: the reply of node %s is left out (%s: %s)", self.round + 1, node, type(e).__name__, e)
                if node in self._sent:
                    failed.append(self._sent[node])
                    seen.add(node)
                continue
            if node in seen:
                logger.warning("round %d: a second reply of node %s is ignored", self.round + 1, node)
                continue
            seen.add(node)
            messages.append(message)
        failed += [i for n, i in self._sent.items() if n not in seen]  # no answer within round_timeout
        update = self.server.aggregate_round(messages, self.round)
        new_global = self.server_optimizer.step(self._global, update, self.round)
        for m in messages:
            self.participation[m.party_id] += 1
        self.round += 1
        metrics = self.ledger.metrics()
        record = {
            "stage": "train", "round": self.round, "parties": list(self._sampled),
            "received": [m.party_id for m in messages], "failed": sorted(failed), "num_received": len(messages),
            "uplink_bytes": sum(m.num_bytes for m in messages), "uplink_bytes_per_party": self.server.message_bytes,
            "downlink_bytes_per_party": 4 * self.layout.dim, "update_norm": float(update.norm()),
            "server_learning_rate": self.server_optimizer.lr_at(self.round - 1), **metrics,
            "epsilon_server_view": self.server_view_bound(), "epsilon_server_view_busiest": self.server_view_epsilon(),
            "round_time_s": time.perf_counter() - self._t0,
        }
        self.history.append(record)
        logger.info("round %d: %d/%d parties answered, epsilon %.4g (rdp %.4g, prv %.4g, pld %.4g), uplink %d bytes",
                    self.round, len(messages), len(self._sampled), metrics["epsilon"], metrics["epsilon_rdp"],
                    metrics["epsilon_prv"], metrics["epsilon_pld"], record["uplink_bytes"])
        # what the round returns may reach the user's logs: nothing in it depends on who took part
        numbers = {k: float(v) for k, v in record.items() if k not in SERVER_ONLY_KEYS
                   and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        return ArrayRecord({"adapter": Array(new_global.numpy())}), MetricRecord(numbers)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # evaluation on parties' data would be another release; evaluate on the server (evaluate_fn)

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        a = self.args
        if not self.dp_enabled:
            logger.warning("ClientLevelDPStrategy: disable_dp=True, federated training WITHOUT differential privacy.")
            return
        logger.info("ClientLevelDPStrategy: client-level DP, parties=%d, q=%.5g, noise_multiplier=%.4g, max_update_norm=%g, "
                    "delta=%.3g, accountant=%s, target_epsilon=%s, rounds=%d, message %d bytes", a.num_parties,
                    a.sample_rate, self.ledger.noise_multiplier, a.max_update_norm, a.delta, a.accountant,
                    a.target_epsilon, a.num_rounds, self.server.message_bytes)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int | None = None, timeout: float | None = None,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable | None = None) -> Result:
        """Run rounds until ``num_rounds`` (default ``args.num_rounds``) or until one more round would exceed
        ``target_epsilon``. Evaluation runs only on the server (``evaluate_fn(round, arrays)``)."""
        self.summary()
        end = self.args.num_rounds if num_rounds is None else num_rounds
        timeout = self.round_timeout if timeout is None else timeout
        train_config = train_config if train_config is not None else ConfigRecord()
        result = Result(arrays=initial_arrays)
        arrays = initial_arrays
        while self.round < end:
            if not self.ledger.budget_allows_step():
                logger.warning("Stopping after round %d: one more round would exceed target_epsilon=%s (epsilon spent: "
                               "%.4f).", self.round, self.args.target_epsilon, self.ledger.metrics()["epsilon"])
                break
            current = self.round + 1
            replies = grid.send_and_receive(self.configure_train(current, arrays, train_config, grid), timeout=timeout)
            arrays, metrics = self.aggregate_train(current, replies)
            result.arrays = arrays
            result.train_metrics_clientapp[current] = metrics
            if evaluate_fn is not None:
                res = evaluate_fn(current, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current] = res
        return result

    # privacy report ----------------------------------------------------------------------------------------------
    def server_view_bound(self) -> float:
        """epsilon against the server of a party that answered every round so far (public: no sample in it)."""
        if not self.dp_enabled:
            return math.inf
        return server_view_bound(0, self.round, self.server.party_noise_multiplier, 0.0, self.args.delta)

    def server_view_epsilon(self) -> float:
        """epsilon of the most exposed party against the server (see `.accounting.server_view_epsilon`):
        server-only, it tells whether anyone took part."""
        if not self.dp_enabled:
            return math.inf
        zeros = [0] * len(self.participation)
        return server_view_epsilon(self.participation.tolist(), zeros, self.server.party_noise_multiplier, 0.0, self.args.delta)

    def privacy_report(self) -> dict:
        """The privacy report written next to the model: nothing in it depends on who took part."""
        a = self.args
        report = self.ledger.report()
        report.update({
            "privacy_unit": "party", "num_parties": a.num_parties, "expected_parties_per_round": a.sample_rate * a.num_parties,
            "party_sampling": f"{a.party_sampling} (by the strategy, over the fixed population)", "max_update_norm": a.max_update_norm,
            "rounds": self.round, **trust_report(a), "epsilon_server_view": self.server_view_bound(), "engine": "flower",
            **aggregation_report(a, self.ledger.noise_multiplier),
            "codec_latent_dim": self.codec.latent_dim if self.codec is not None else None,
            **self.server_optimizer.describe(),  # post-processing: not part of the accounting
        })
        return report


# ---- the ServerApp ------------------------------------------------------------------------------------------------
def server_app(model_fn: Callable, args: FederatedArguments | None = None, *, peft_config=None, codec=None,
               evaluate_fn: Callable | None = None, round_timeout: float | None = None) -> ServerApp:
    """A ServerApp that runs `ClientLevelDPStrategy` and writes the result to ``args.output_dir``.

    ``args`` default: `federated_args_from_config` of the run config. ``round_timeout`` (default: the run
    config's ``round-timeout``, else 600 s) is how long a round waits for the sampled parties.
    ``evaluate_fn(model, round) -> dict`` (or ``evaluate_fn(model, round, context)``, with the ServerApp's Flower
    context and so its run config) evaluates the global adapter on the server after each round.
    Writes ``privacy_report.json`` and ``federated_history.json`` after every round, and the adapter
    (``save_pretrained``) at the end.
    """
    app = ServerApp()
    with_context = evaluate_fn is not None and _positional_parameters(evaluate_fn) >= 3

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        a = args if args is not None else federated_args_from_config(context.run_config)
        timeout = round_timeout if round_timeout is not None else float(context.run_config.get("round-timeout", 600.0))
        model = wrap_with_lora(model_fn(context), peft_config, r=a.lora_r, alpha=a.lora_alpha, dropout=a.lora_dropout,
                               target_modules=a.lora_target_modules)
        params = [p for _, p in trainable_adapter_parameters(model)]
        layout = LoraLayout.from_model(model)
        strategy = ClientLevelDPStrategy(a, layout, _load_codec(codec if codec is not None else a.codec, model),
                                         round_timeout=timeout)

        def set_global(arrays: ArrayRecord) -> None:
            with torch.no_grad():
                for p, t in zip(params, layout.unflatten(_flat(arrays, "adapter"))):
                    p.copy_(t.to(device=p.device, dtype=p.dtype))

        def after_round(rnd: int, arrays: ArrayRecord):
            set_global(arrays)
            res = None
            if evaluate_fn is not None:
                res = {k: float(v) for k, v in (evaluate_fn(model, rnd, context) if with_context else
                                                 evaluate_fn(model, rnd)).items()}
            if res:
                strategy.history[-1].update(res)
            _write_json(a.output_dir, HISTORY_NAME, public_history(strategy.history))
            _write_json(a.output_dir, REPORT_NAME, strategy.privacy_report())
            return MetricRecord(res) if res else None

        initial = ArrayRecord({"adapter": Array(layout.flatten([p.detach().cpu() for p in params]).numpy())})
        result = strategy.start(grid, initial, evaluate_fn=after_round)
        set_global(result.arrays)
        model.save_pretrained(a.output_dir)
        _write_json(a.output_dir, HISTORY_NAME, public_history(strategy.history))
        _write_json(a.output_dir, REPORT_NAME, strategy.privacy_report())

    return app


def _positional_parameters(fn: Callable) -> int:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 3
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def _write_json(folder: str, name: str, obj) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2)


__all__ = ["ClientLevelDPStrategy", "FlowerParty", "federated_args_from_config", "server_app"]
