"""The federated mode on Flower: one party per SuperNode (a ClientApp), the server step in a Strategy.

Nothing here re-implements privacy. The ClientApp runs the party step of :mod:`.party` (local training from
the global adapter, clip to C, add N(0, sigma^2 C^2 I) from the party's own generator, encode) and sends only
that message. :class:`ClientLevelDPStrategy` runs the server step of :mod:`.server` (Poisson sampling of the
parties, ``sum / sqrt(k)``, decode) and counts each round in a :class:`~hf_drencoder.privacy.PrivacyLedger`
at (sigma, q) before anything is sent, exactly as :class:`~hf_drencoder.federated.FederatedSimulation` does in
one process. docs/scaling.md ("Federation with Flower") has what runs where and what crosses the network.

A Flower App (``pyproject.toml`` with ``[tool.flwr.app.components]``) points at two objects built here::

    from hf_drencoder.federated.flower import FlowerParty, server_app

    server = server_app(model_fn)                      # FederatedArguments from the run config
    client = FlowerParty(model_fn, data_fn).client_app()

``model_fn(context)`` returns the base model (or a PeftModel) and ``data_fn(partition_id, num_partitions,
context)`` the tokenized training rows of one party. Run it with ``flwr run`` on a SuperLink and SuperNodes
(each started with ``--node-config "partition-id=<i> num-partitions=<N>"``), or with
``flwr.simulation.run_simulation`` (Flower's simulation engine, which sets the partition ids itself).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, Mapping

import numpy as np
import torch

from ..codec.codec import GradientCodec
from ..codec.layout import LoraLayout
from ..lora import trainable_adapter_parameters, wrap_with_lora
from ..losses import infer_task
from ..privacy.accounting import PrivacyBudgetError
from .accounting import account_codec_prior, client_level_ledger, public_history, server_view_epsilon
from .arguments import FederatedArguments
from .party import Party, PartyMessage
from .server import FederatedServer, party_round_randomness
from .simulation import HISTORY_NAME, REPORT_NAME

try:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import Result, Strategy
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        "hf_drencoder.federated.flower needs Flower: pip install 'hf-drencoder[flower]' (flwr>=1.42,<2; add "
        "flwr[simulation] for Flower's simulation engine)"
    ) from e

# a child of Flower's logger: the per-round lines reach `flwr run --stream` and `flwr log` with Flower's own
logger = logging.getLogger("flwr.hf_drencoder")

# record names of the messages (what crosses the network)
GLOBAL_ADAPTER = "global"  # downlink: ArrayRecord {"adapter": flat fp32 global LoRA tensors}
ROUND_CONFIG = "config"  # downlink: ConfigRecord, the round's public settings
PARTY_MESSAGE = "message"  # uplink: ArrayRecord {"payload": the encoded, noised update}
PARTY_META = "meta"  # uplink: ConfigRecord {"party-id", "kind", "layout"}: public bookkeeping only


# ---- configuration ----------------------------------------------------------------------------------------
def federated_args_from_config(run_config: Mapping | None, **overrides) -> FederatedArguments:
    """:class:`FederatedArguments` from a Flower run config (``[tool.flwr.app.config]`` and ``flwr run
    --run-config``): keys are field names with ``-`` or ``_`` (``noise-multiplier=1.0``); list fields take a
    comma-separated string. Keys that are not fields are left to the user's app. ``overrides`` win."""
    fields = {f.name: f for f in dataclasses.fields(FederatedArguments)}
    values = {}
    for key, value in dict(run_config or {}).items():
        name = str(key).replace("-", "_")
        if name in fields:
            values[name] = _convert(value, str(fields[name].type))
    values.update(overrides)
    return FederatedArguments(**values)


def _convert(value, annotation: str):
    if annotation.startswith("list"):
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)
    if annotation.startswith("bool"):
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if annotation.startswith("int") and not isinstance(value, bool):
        return int(value)
    if annotation.startswith("float") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


def _lora_defaults(run_config: Mapping | None) -> dict:
    """The LoRA settings of :class:`FederatedArguments` read from a run config (a ClientApp does not need,
    and may not have, the privacy settings that validating a whole FederatedArguments requires)."""
    fields = {f.name: f for f in dataclasses.fields(FederatedArguments)}
    out = {k: fields[k].default for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    for key, value in dict(run_config or {}).items():
        name = str(key).replace("-", "_")
        if name in out:
            out[name] = _convert(value, str(fields[name].type))
    return {"r": out["lora_r"], "alpha": out["lora_alpha"], "dropout": out["lora_dropout"],
            "target_modules": out["lora_target_modules"]}


def _load_codec(spec, model):
    """A ready codec (object, folder or Hub id), or None. ``'auto'`` (stage 1 from the parties) is refused:
    its statistics rounds are not implemented on Flower."""
    if spec is None or isinstance(spec, GradientCodec):
        return spec
    if spec == "auto":
        raise ValueError(
            "codec='auto' is not available on Flower (its stage-1 statistics rounds run only in FederatedSimulation). "
            "Pre-train a codec (hf-drencoder pretrain-codec, or FederatedSimulation with codec='auto'), publish it, and "
            "give its folder or Hub id as codec= on the server and the parties"
        )
    if isinstance(spec, str):
        return GradientCodec.from_pretrained(spec, model=model)
    raise TypeError(f"codec must be a GradientCodec, a folder or Hub id, or None; got {type(spec).__name__}")


def _flat(record: ArrayRecord, key: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(record[key].numpy(), dtype=np.float32)).reshape(-1)


# ---- the party: a ClientApp ---------------------------------------------------------------------------------
class FlowerParty:
    """The ClientApp side: one SuperNode is one party (the privacy unit), identified by its node config's
    ``partition-id``.

    Args:
        model_fn: ``model_fn(context)`` -> the base model or a PeftModel (the same architecture as the server's).
        data_fn: ``data_fn(partition_id, num_partitions, context)`` -> this party's tokenized rows (with ``labels``).
        peft_config: LoRA config when ``model_fn`` returns a plain model (default: the run config's ``lora-*``).
        codec: a ready codec (object, folder or Hub id) or None; it must be the server's codec.
        data_collator: rows -> batch (default ``transformers.default_data_collator``).
        min_noise_multiplier: the smallest sigma this party accepts from the server (the SuperNode's node config
            ``min-noise-multiplier`` overrides it). With None the party takes the server's sigma but never sends
            an un-noised update unless its node config says ``allow-non-private=true``.

    The party's noise is drawn from OS entropy unless the server sends a ``noise-seed`` (tests only: whoever knows
    the seed can subtract the noise).
    """

    def __init__(self, model_fn: Callable, data_fn: Callable, *, peft_config=None, codec=None,
                 data_collator: Callable | None = None, min_noise_multiplier: float | None = None):
        self.model_fn = model_fn
        self.data_fn = data_fn
        self.peft_config = peft_config
        self.codec_spec = codec
        self.data_collator = data_collator
        self.min_noise_multiplier = min_noise_multiplier
        self._state: dict | None = None  # kept while the process lives (simulation actors reuse it)

    def client_app(self) -> ClientApp:
        app = ClientApp()
        app.train()(self.train)
        return app

    def _setup(self, context: Context, partition_id: int, num_partitions: int) -> dict:
        key = (context.run_id, partition_id)
        if self._state is not None and self._state["key"] == key:
            return self._state
        from transformers import default_data_collator

        model = wrap_with_lora(self.model_fn(context), self.peft_config, **_lora_defaults(context.run_config))
        params = [p for _, p in trainable_adapter_parameters(model)]
        data = self.data_fn(partition_id, num_partitions, context)
        self._state = {
            "key": key, "model": model, "params": params, "layout": LoraLayout.from_model(model),
            "task": infer_task(model), "codec": _load_codec(self.codec_spec, model),
            "party": Party(partition_id, data, self.data_collator or default_data_collator),
        }
        return self._state

    def _check_privacy(self, cfg: ConfigRecord, context: Context) -> tuple[float, float]:
        """The party's own guard on what the server asks: the message never leaves with less noise than the
        party accepts, whatever the server sends."""
        sigma, max_norm = float(cfg["noise-multiplier"]), float(cfg["max-update-norm"])
        node = context.node_config
        floor = node.get("min-noise-multiplier", self.min_noise_multiplier)
        if sigma <= 0 or not math.isfinite(max_norm):
            if str(node.get("allow-non-private", "false")).lower() not in ("1", "true", "yes"):
                raise PrivacyBudgetError(
                    f"the server asked for a non-private update (noise_multiplier={sigma}, max_update_norm={max_norm}); "
                    "this party refuses. Start the SuperNode with --node-config 'allow-non-private=true' to allow it"
                )
            return 0.0, math.inf
        if floor is not None and sigma < float(floor):
            raise PrivacyBudgetError(f"the server asked for noise_multiplier={sigma} < this party's minimum {floor}; refusing")
        if not max_norm > 0:
            raise PrivacyBudgetError(f"max_update_norm={max_norm} must be > 0")
        return sigma, max_norm

    def train(self, msg: Message, context: Context) -> Message:
        """One round on this party: the party step of :mod:`.party`; the reply holds only its message."""
        if "partition-id" not in context.node_config:
            raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=<i> num-partitions=<N>'")
        pid = int(context.node_config["partition-id"])
        cfg = msg.content[ROUND_CONFIG]
        num_partitions = int(context.node_config.get("num-partitions", cfg["num-parties"]))
        sigma, max_norm = self._check_privacy(cfg, context)
        st = self._setup(context, pid, num_partitions)
        layout: LoraLayout = st["layout"]
        if layout.fingerprint != cfg["layout"]:
            raise ValueError(f"this party's LoRA layout ({layout.fingerprint}) is not the server's ({cfg['layout']}): "
                             "use the same model and LoRA configuration on both sides")
        if (st["codec"] is not None) != bool(cfg["codec"]):
            raise ValueError("the server and this party disagree on whether a codec is used: give both the same codec")
        with torch.no_grad():
            for p, t in zip(st["params"], layout.unflatten(_flat(msg.content[GLOBAL_ADAPTER], "adapter"))):
                p.copy_(t.to(device=p.device, dtype=p.dtype))
        r = int(cfg["round-index"])
        noise_seed = int(cfg["noise-seed"]) if "noise-seed" in cfg else None
        seed, generator = party_round_randomness(int(cfg["seed"]), noise_seed, r, pid, sigma > 0)
        decode_std = float(cfg["decode-noise-std"])
        message: PartyMessage = st["party"].step(
            st["model"], st["params"], layout, steps=int(cfg["local-steps"]), batch_size=int(cfg["local-batch-size"]),
            learning_rate=float(cfg["local-learning-rate"]), optimizer=str(cfg["local-optimizer"]), task=st["task"],
            seed=seed, max_norm=max_norm, noise_multiplier=sigma, generator=generator,
            codec=st["codec"], codec_noise_std=decode_std or None,
        )
        content = RecordDict({
            PARTY_MESSAGE: ArrayRecord({"payload": Array(message.payload.numpy())}),
            PARTY_META: ConfigRecord({"party-id": pid, "kind": message.kind, "layout": layout.fingerprint}),
        })
        return Message(content, reply_to=msg)


# ---- the server: a Strategy -----------------------------------------------------------------------------------
class ClientLevelDPStrategy(Strategy):
    """Client-level DP FedAvg over a fixed population of ``args.num_parties`` SuperNodes.

    Sampling: before the first round the strategy waits until ``num_parties`` nodes are connected and fixes
    them as the population (sorted node ids; more nodes are left out with a warning). In every round each party
    of the population joins independently with probability q = parties_per_round / num_parties
    (:meth:`FederatedServer.sample_parties`), whether it is online or not, or exactly ``parties_per_round`` of
    them with ``party_sampling="fixed"`` (accounted without amplification, see :func:`.accounting.client_level_ledger`).
    Flower's own samplers are not used. A sampled party that does not answer within
    ``round_timeout`` seconds, or answers with an error or a malformed message, is left out of the round; the
    round is counted all the same, at (sigma, q), before any message is sent.

    Aggregation and decoding are :meth:`FederatedServer.aggregate_round` (``sum / sqrt(k)``, a server-drawn
    phantom message when k = 0, ``decode(R / sqrt(q N))``). Per round the strategy logs epsilon (every
    accountant), the uplink bytes and the parties, and it stops before a round the budget does not allow.
    """

    def __init__(self, args: FederatedArguments, layout: LoraLayout, codec=None, *, round_timeout: float = 600.0,
                 wait_for_parties_s: float = 600.0):
        if args.codec == "auto" or codec == "auto":
            _load_codec("auto", None)
        self.args = args
        self.layout = layout
        self.codec = codec
        self.round_timeout = float(round_timeout)
        self.wait_for_parties_s = float(wait_for_parties_s)
        self.dp_enabled = not args.disable_dp
        self.ledger = client_level_ledger(args)
        account_codec_prior(self.ledger, codec)  # before calibrating: the prior is paid from the same budget
        self.ledger.calibrate(args.num_rounds)
        sigma = self.ledger.noise_multiplier if self.dp_enabled else 0.0
        self.server = FederatedServer(layout, args.num_parties, args.sample_rate,
                                      args.max_update_norm if self.dp_enabled else math.inf, sigma, codec,
                                      args.sampling_seed, args.noise_seed, fixed_size=args.party_sampling == "fixed")
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
        self._t0 = time.perf_counter()
        self._global = _flat(arrays, "adapter")
        r = self.round
        self._sampled = self.server.sample_parties(r)
        # count first: a round the budget does not allow is refused before any party is asked
        self.ledger.record_step()
        a, s = self.args, self.server
        cfg = {
            "round-index": r, "num-parties": a.num_parties, "noise-multiplier": s.noise_multiplier,
            "max-update-norm": s.max_norm, "decode-noise-std": s.decode_noise_std, "layout": self.layout.fingerprint,
            "codec": self.codec is not None, "local-steps": a.local_steps, "local-batch-size": a.local_batch_size,
            "local-learning-rate": a.local_learning_rate, "local-optimizer": a.local_optimizer, "seed": a.seed,
            **({"noise-seed": int(a.noise_seed)} if a.noise_seed is not None else {}),
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
            raise RuntimeError(reply.error.reason)
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
        new_global = self._global + self.args.server_learning_rate * update
        for m in messages:
            self.participation[m.party_id] += 1
        self.round += 1
        metrics = self.ledger.metrics()
        record = {
            "stage": "train", "round": self.round, "parties": list(self._sampled),
            "received": [m.party_id for m in messages], "failed": sorted(failed), "num_received": len(messages),
            "uplink_bytes": sum(m.num_bytes for m in messages), "uplink_bytes_per_party": self.server.message_bytes,
            "downlink_bytes_per_party": 4 * self.layout.dim, "update_norm": float(update.norm()), **metrics,
            "epsilon_server_view": self.server_view_epsilon(), "round_time_s": time.perf_counter() - self._t0,
        }
        self.history.append(record)
        logger.info("round %d: %d/%d parties answered, epsilon %.4g (rdp %.4g, prv %.4g), uplink %d bytes", self.round,
                    len(messages), len(self._sampled), metrics["epsilon"], metrics["epsilon_rdp"], metrics["epsilon_prv"],
                    record["uplink_bytes"])
        numbers = {k: float(v) for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
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
    def server_view_epsilon(self) -> float:
        """epsilon of the most exposed party against the server (see :func:`.accounting.server_view_epsilon`)."""
        if not self.dp_enabled:
            return math.inf
        zeros = [0] * len(self.participation)
        return server_view_epsilon(self.participation.tolist(), zeros, self.ledger.noise_multiplier, 0.0, self.args.delta)

    def privacy_report(self) -> dict:
        a = self.args
        report = self.ledger.report()
        report.update({
            "privacy_unit": "party", "num_parties": a.num_parties, "expected_parties_per_round": a.sample_rate * a.num_parties,
            "party_sampling": f"{a.party_sampling} (by the strategy, over the fixed population)", "max_update_norm": a.max_update_norm,
            "rounds": self.round, "epsilon_server_view": self.server_view_epsilon(), "engine": "flower",
            "aggregation": "R = sum of locally noised messages / sqrt(k); update = decode(R / sqrt(q N))",
            "codec_latent_dim": self.codec.latent_dim if self.codec is not None else None,
        })
        return report


# ---- the ServerApp ------------------------------------------------------------------------------------------------
def server_app(model_fn: Callable, args: FederatedArguments | None = None, *, peft_config=None, codec=None,
               evaluate_fn: Callable | None = None, round_timeout: float | None = None) -> ServerApp:
    """A ServerApp that runs :class:`ClientLevelDPStrategy` and writes the result to ``args.output_dir``.

    ``args`` default: :func:`federated_args_from_config` of the run config. ``round_timeout`` (default: the run
    config's ``round-timeout``, else 600 s) is how long a round waits for the sampled parties.
    ``evaluate_fn(model, round) -> dict`` evaluates the global adapter on the server after each round.
    Writes ``privacy_report.json`` and ``federated_history.json`` after every round, and the adapter
    (``save_pretrained``) at the end.
    """
    app = ServerApp()

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
            res = {k: float(v) for k, v in evaluate_fn(model, rnd).items()} if evaluate_fn is not None else None
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


def _write_json(folder: str, name: str, obj) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f, indent=2)


__all__ = ["ClientLevelDPStrategy", "FlowerParty", "federated_args_from_config", "server_app"]
