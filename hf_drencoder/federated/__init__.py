"""Federated mode: N parties train one LoRA adapter with client-level differential privacy.

Reading order: `.partition` (the parties' data), `.party` (local training, clip, local noise,
encode), `.server` (sampling, aggregation, decoding), `.simulation` (rounds, accounting, resume),
`.cli` (``hf-drencoder federated``). docs/federated.md has the privacy argument.
"""

from .arguments import FederatedArguments
from .partition import PARTITIONS, partition_dataset, partition_indices
from .party import Party, PartyMessage, encode_message, privatize_update, statistics_message
from .server import FederatedServer, NonLinearCodecError, aggregate, check_linear_codec
from .simulation import FederatedSimulation

__all__ = [
    "FederatedArguments",
    "FederatedServer",
    "FederatedSimulation",
    "NonLinearCodecError",
    "PARTITIONS",
    "Party",
    "PartyMessage",
    "aggregate",
    "check_linear_codec",
    "encode_message",
    "partition_dataset",
    "partition_indices",
    "privatize_update",
    "statistics_message",
]
