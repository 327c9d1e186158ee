"""The ServerApp: client-level DP FedAvg (ClientLevelDPStrategy) configured by the run config; the global adapter
is evaluated on the server after every round. Writes the adapter, privacy_report.json and federated_history.json
to ``output-dir``."""

from hf_drencoder.federated.flower import server_app

from .task import evaluate_fn, model_fn

app = server_app(model_fn, evaluate_fn=evaluate_fn)
