"""The ClientApp: one SuperNode is one party. Its data is partition ``partition-id`` of ``num-partitions``
(the SuperNode's node config); its noise comes from its own randomness, never from a message."""

from hf_drencoder.federated.flower import FlowerParty

from .task import data_fn, model_fn

app = FlowerParty(model_fn, data_fn).client_app()
