"""The party on Flower: one SuperNode is one party (a ClientApp) and runs the party step of `.party`.

What leaves the party is its noised, encoded update, or a fixed code when it sends none (``party-error``: it
failed; ``party-refused``: its own privacy guard refused the round). The exception's text, which can quote the
party's data, stays in the party's own log. The party's noise comes from its own randomness: OS entropy, or a
seed from its own local setting (``FlowerParty(noise_seed=...)`` or the SuperNode's ``--node-config
noise-seed=<n>``), never from a message, so the server cannot replay and subtract it.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch

from ..codec.layout import LoraLayout
from ..lora import trainable_adapter_parameters, wrap_with_lora
from ..losses import infer_task
from ..privacy.accounting import PrivacyBudgetError
from .flower_common import (GLOBAL_ADAPTER, MESSAGE_SEED_KEYS, PARTY_MESSAGE, PARTY_META, ROUND_CONFIG, _flat,
                            _load_codec, _lora_defaults, _refuse_freeze_a)
from .party import PARTY_ERROR, PARTY_REFUSED, Party, PartyMessage, log_party_failure
from .server import party_round_randomness

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

# the party's own log (on the SuperNode; a child of Flower's logger, printed with Flower's own lines)
party_log = logging.getLogger("flwr.hf_drencoder.party")

# the Error code of a reply without a message (its reason is one of PARTY_CODES, never an exception's text)
PARTY_ERROR_CODE = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class PartyRefusal(PrivacyBudgetError):
    """The party's own guard refused what the server asked (the server is told only ``party-refused``)."""


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes")


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
        noise_seed: seed of this party's noise (the node config's ``noise-seed`` overrides it). Default: OS
            entropy. For reproducible tests only: whoever knows the seed can subtract the noise. A seed in a
            message from the server is refused (the round is answered ``party-refused``); the run config is not
            read for it either, since it comes from whoever submitted the run.
    """

    def __init__(self, model_fn: Callable, data_fn: Callable, *, peft_config=None, codec=None,
                 data_collator: Callable | None = None, min_noise_multiplier: float | None = None,
                 noise_seed: int | None = None):
        self.model_fn = model_fn
        self.data_fn = data_fn
        self.peft_config = peft_config
        self.codec_spec = codec
        self.data_collator = data_collator
        self.min_noise_multiplier = min_noise_multiplier
        self.noise_seed = noise_seed
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

        _refuse_freeze_a(context.run_config)
        model = wrap_with_lora(self.model_fn(context), self.peft_config, **_lora_defaults(context.run_config))
        params = [p for _, p in trainable_adapter_parameters(model)]
        data = self.data_fn(partition_id, num_partitions, context)
        # the party's own log (it stays on its SuperNode): which partition this node trains on
        party_log.info("party %d of %d: %d training rows", partition_id, num_partitions, len(data))
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
            if not _truthy(node.get("allow-non-private", "false")):
                raise PartyRefusal(
                    f"the server asked for a non-private update (noise_multiplier={sigma}, max_update_norm={max_norm}); "
                    "this party refuses. Start the SuperNode with --node-config 'allow-non-private=true' to allow it"
                )
            return 0.0, math.inf
        if floor is not None and sigma < float(floor):
            raise PartyRefusal(f"the server asked for noise_multiplier={sigma} < this party's minimum {floor}; refusing")
        if not max_norm > 0:
            raise PartyRefusal(f"max_update_norm={max_norm} must be > 0")
        return sigma, max_norm

    def _check_no_seed_in_message(self, msg: Message) -> None:
        for name, record in msg.content.config_records.items():
            sent = [k for k in MESSAGE_SEED_KEYS if k in record]
            if sent:
                raise PartyRefusal(
                    f"the server sent {sent[0]!r} in the message ({name!r} record): a party's noise comes from its own "
                    "randomness, and whoever chose the seed could subtract it. Remove noise_seed from the server's "
                    "settings; for a reproducible test, seed each party locally with --node-config 'noise-seed=<n>' "
                    "(or FlowerParty(noise_seed=...))"
                )

    def local_noise_seed(self, context: Context) -> int | None:
        """This party's own noise seed: the node config's ``noise-seed``, else ``noise_seed``, else None (OS entropy)."""
        seed = context.node_config.get("noise-seed", self.noise_seed)
        return None if seed is None or seed == "" else int(seed)

    def train(self, msg: Message, context: Context) -> Message:
        """One round on this party: the party step of `.party`. The reply holds only its message, or a
        fixed code (``party-error``, ``party-refused``) with the full reason in this party's log."""
        pid = context.node_config.get("partition-id", "?")
        try:
            return self._train(msg, context)
        except PartyRefusal as e:
            code = log_party_failure(pid, self._round_label(msg), e, PARTY_REFUSED, log=party_log)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, its text stays here
            code = log_party_failure(pid, self._round_label(msg), e, PARTY_ERROR, log=party_log)
        return Message(Error(code=PARTY_ERROR_CODE, reason=code), reply_to=msg)

    @staticmethod
    def _round_label(msg: Message) -> str:
        try:
            return f"round {int(msg.content[ROUND_CONFIG]['round-index']) + 1}"
        except Exception:  # noqa: BLE001 - only a label for the party's own log
            return "a round"

    def _train(self, msg: Message, context: Context) -> Message:
        if "partition-id" not in context.node_config:
            raise ValueError("this SuperNode has no partition-id: start it with --node-config 'partition-id=<i> num-partitions=<N>'")
        self._check_no_seed_in_message(msg)
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
        # the local-training seed may come from the server (batch order; the message is private whatever it is);
        # the noise never does
        seed, generator = party_round_randomness(int(cfg["seed"]), self.local_noise_seed(context), r, pid, sigma > 0)
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


__all__ = ["FlowerParty", "PARTY_ERROR_CODE", "PartyRefusal"]
