"""What the Flower ServerApp and ClientApp share: the Flower import, the record names of the messages, the run
config and a ready codec. `.flower` has the strategy and the ServerApp, `.flower_party` the ClientApp."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Mapping

import numpy as np
import torch

from ..codec.codec import GradientCodec
from .arguments import FederatedArguments

try:
    from flwr.app import ArrayRecord
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
# randomness a party never takes from a message: whoever chose the seed could replay and subtract its noise
MESSAGE_SEED_KEYS = ("noise-seed", "noise_seed")


# ---- configuration ----------------------------------------------------------------------------------------
def federated_args_from_config(run_config: Mapping | None, **overrides) -> FederatedArguments:
    """`FederatedArguments` from a Flower run config (``[tool.flwr.app.config]`` and ``flwr run
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
    """The LoRA settings of `FederatedArguments` read from a run config (a ClientApp does not need,
    and may not have, the privacy settings that validating a whole FederatedArguments requires)."""
    fields = {f.name: f for f in dataclasses.fields(FederatedArguments)}
    out = {k: fields[k].default for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")}
    for key, value in dict(run_config or {}).items():
        name = str(key).replace("-", "_")
        if name in out:
            out[name] = _convert(value, str(fields[name].type))
    return {"r": out["lora_r"], "alpha": out["lora_alpha"], "dropout": out["lora_dropout"],
            "target_modules": out["lora_target_modules"]}


FREEZE_A_ON_FLOWER = (
    "lora_freeze_a is not available on Flower: each party builds its own model, so each would freeze a different "
    "random A while the server averages B as if they were one. Run FFA-LoRA in FederatedSimulation, or unset "
    "lora_freeze_a (lora-freeze-a in the run config)"
)


def _refuse_freeze_a(run_config: Mapping | None) -> None:
    """FFA-LoRA needs every party's frozen A to be the same tensor, which separate Flower processes do not share."""
    for key, value in dict(run_config or {}).items():
        if str(key).replace("-", "_") == "lora_freeze_a" and _convert(value, "bool"):
            raise ValueError(FREEZE_A_ON_FLOWER)


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
    from ..codec.loading import _is_subspace
    from ..codec.subspace import SubspaceCodec

    if isinstance(spec, SubspaceCodec) or spec == "subspace" or (
            isinstance(spec, str) and os.path.isfile(os.path.join(spec, "config.json")) and _is_subspace(spec)):
        raise ValueError(
            "the subspace codec is not available on Flower yet (its parties clip and noise their latent, which the "
            "Flower party and server do not implement): run it in FederatedSimulation, or use a GradientCodec"
        )
    if isinstance(spec, str):
        return GradientCodec.from_pretrained(spec, model=model)
    raise TypeError(f"codec must be a GradientCodec, a folder or Hub id, or None; got {type(spec).__name__}")


def _flat(record: ArrayRecord, key: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(record[key].numpy(), dtype=np.float32)).reshape(-1)
