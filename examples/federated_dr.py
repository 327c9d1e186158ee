"""Federated DP LoRA fine-tuning with the Python API: 100 parties on Reuters-R8, client-level epsilon 8.

    python examples/federated_dr.py --output_dir fed-out --num_rounds 30 --codec auto

Every field of FederatedArguments is an option (``--help`` lists them). The model and data are the embedded
MiniLM-L6 and Reuters-R8 (no Hub access); swap in your own model, tokenized dataset and compute_metrics.
"""

import json

from transformers import HfArgumentParser

from hf_drencoder.federated import FederatedArguments, FederatedSimulation
from hf_drencoder.federated.cli import FEDERATED_DEFAULTS, FederatedDataArguments, load_embedded


def main(argv=None):
    parser = HfArgumentParser((FederatedDataArguments, FederatedArguments))
    parser.set_defaults(**FEDERATED_DEFAULTS)
    data_args, fed_args = parser.parse_args_into_dataclasses(args=argv)

    model, train, test, compute_metrics, _ = load_embedded(data_args)
    sim = FederatedSimulation(model, train, fed_args, eval_dataset=test, compute_metrics=compute_metrics)
    history = sim.run()  # one dict per round: parties, uplink_bytes, epsilon per accountant, eval metrics
    sim.save_model()  # adapter, codec, privacy_report.json, federated_history.json in output_dir

    last = history[-1]
    print(json.dumps({k: last.get(k) for k in ("round", "eval_accuracy", "epsilon", "epsilon_rdp", "epsilon_prv", "epsilon_pld",
                                                "mu_gdp", "uplink_bytes_per_party")}, indent=2))
    return sim


if __name__ == "__main__":
    main()
