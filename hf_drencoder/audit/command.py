"""The ``hf-drencoder audit`` command: built-in models and data, the arguments, the table and the JSON."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from .._jsonio import dumps
from .canaries import AUTO_CANARIES, CANARY_SAMPLING, CANARY_TYPES, DIRECTIONS, OBSERVE
from .central import run_audit
from .federated import run_federated_audit
from .result import AuditResult, PrivacyAuditError


_MODELS = ("tiny-bert", "tiny-llama", "minilm-r8")
MODES = ("central", "federated")


def _model_and_data(name: str, n: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    if name == "minilm-r8":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..embedded import load_reuters, minilm_path, tokenize_dataset

        data = load_reuters("r8")
        num_labels = data["train"].features["label"].num_classes
        path = minilm_path()
        tok = AutoTokenizer.from_pretrained(path)
        data = tokenize_dataset(data, tok, max_length=64)
        train = data["train"].select(range(min(n, len(data["train"])))) if n else data["train"]
        return lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels), train
    seq = 16
    if name == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, max_position_embeddings=64)
        ids = torch.randint(1, 100, (n, seq), generator=g)
        labels = torch.randint(0, 3, (n,), generator=g).tolist()
        cls = BertForSequenceClassification
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        ids = torch.randint(0, 128, (n, seq), generator=g)
        labels = ids.tolist()
        cls = LlamaForCausalLM
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels})

    def make_model():
        torch.manual_seed(seed)
        return cls(cfg)

    return make_model, data


@dataclass
class AuditArguments:
    mode: str = field(default="central", metadata={
        "help": "central: audit DRTrainer (example-level). federated: audit FederatedSimulation with canary parties "
                "(client-level); the other options are then FederatedArguments'.", "choices": list(MODES)})
    model: str = field(default="tiny-bert", metadata={"help": "tiny-bert | tiny-llama (from configs, random data) | "
                                                              "minilm-r8 (the embedded demo model and data)",
                                                      "choices": list(_MODELS)})
    train_examples: int = field(default=256, metadata={"help": "Training rows (random data for the tiny models; the "
                                                                "first N of R8 for minilm-r8, 0 = all)."})
    canary_type: str = field(default="gradient", metadata={"help": "gradient (white box) or input (black box).",
                                                           "choices": list(CANARY_TYPES)})
    num_canaries: int = field(default=0, metadata={
        "help": f"m: canaries, each included with probability 1/2. 0 (default): one for each of 90%% of the noised "
                f"coordinates (the rest measure the noise), up to {AUTO_CANARIES['dirac']:,} Dirac canaries "
                f"({AUTO_CANARIES['random']:,} random ones; 256 input canaries or canary parties). Time grows with "
                "canaries x noised dimension: 50,000 Dirac canaries on a 53,635-dimensional adapter take about 20 s "
                "per step on one CPU thread; the built-in tiny-bert (2,147 dimensions, 1,932 canaries, 20 steps) "
                "about 10 s in all."})
    canary_sampling: str = field(default="every_step", metadata={
        "help": "Gradient canaries: every_step (q = 1; compared with the accountant at q = 1) or poisson (the data's "
                "rate; compared with the reported epsilon).", "choices": list(CANARY_SAMPLING)})
    observe: str = field(default="release", metadata={
        "help": "Gradient canaries: release (the mechanism's noisy sum) or update (the decoded gradient the "
                "optimizer gets).", "choices": list(OBSERVE)})
    direction: str = field(default="dirac", metadata={
        "help": "dirac (default: each gradient canary on a coordinate of its own, the strongest white-box audit; no "
                "m x d matrix) or random (unit directions; keeps an m x d matrix).", "choices": list(DIRECTIONS)})
    canary_scale: float = field(default=1.0, metadata={"help": "Gradient canary norm in units of C (> 1 also tests clipping)."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence of the lower bound (1 - beta)."})
    audit_seed: int = field(default=0, metadata={"help": "Seed of the canaries and their membership."})
    audit_output: str | None = field(default=None, metadata={"help": "Write the JSON result to this file."})


AUDIT_DEFAULTS = dict(
    output_dir="drencoder-audit", per_device_train_batch_size=16, max_steps=20, learning_rate=1e-2,
    noise_multiplier=1.0, report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0,
    target_delta=1e-5,
)


FEDERATED_AUDIT_DEFAULTS = dict(
    output_dir="drencoder-audit-federated", num_parties=64, parties_per_round=4, num_rounds=10, local_steps=2,
    local_batch_size=4, local_learning_rate=0.1, local_optimizer="sgd", noise_multiplier=1.0, target_delta=1e-5, eval_every=0,
    disable_tqdm=True, seed=0,
)


def _mode(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1]
    return "central"


def main(argv: list[str] | None = None) -> AuditResult:
    """``hf-drencoder audit``: train once with canaries; print the table and the JSON; exit 1 if the bound
    exceeds the accountant's epsilon. ``--mode federated`` audits a FederatedSimulation with canary parties."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    federated = _mode(argv) == "federated"
    if federated:
        from ..federated import FederatedArguments, FederatedSimulation

        parser = HfArgumentParser((AuditArguments, FederatedArguments))
        parser.set_defaults(**FEDERATED_AUDIT_DEFAULTS)
    else:
        from ..arguments import DRTrainingArguments
        from ..trainer import DRTrainer

        parser = HfArgumentParser((AuditArguments, DRTrainingArguments))
        parser.set_defaults(**AUDIT_DEFAULTS)
    if any(a.startswith("--target_epsilon") for a in argv) or "--disable_dp" in argv:
        parser.set_defaults(noise_multiplier=None)
    a, run_args = parser.parse_args_into_dataclasses(args=argv)
    make_model, data = _model_and_data(a.model, a.train_examples, run_args.seed)
    num_canaries = a.num_canaries
    if num_canaries == 0 and (federated or a.canary_type == "input"):
        num_canaries = 256  # one training row or one party per canary: "as many as fit" does not apply
    common = dict(num_canaries=num_canaries, canary_sampling=a.canary_sampling, observe=a.observe,
                  direction=a.direction, canary_scale=a.canary_scale, confidence=a.confidence, seed=a.audit_seed,
                  check=True)
    if federated and a.canary_type != "gradient":
        raise SystemExit("hf-drencoder audit: --mode federated audits with canary parties (white-box updates); "
                         "use --canary_type gradient")

    try:
        if federated:
            result = run_federated_audit(lambda: FederatedSimulation(make_model(), data, run_args), **common)
        else:
            def build(train):
                return DRTrainer(model=make_model(), args=run_args, train_dataset=train)

            result = run_audit(build, data, canary_type=a.canary_type, **common)
        failed = None
    except PrivacyAuditError as e:
        if e.result is None:
            raise SystemExit(f"hf-drencoder audit: {e}") from None
        result, failed = e.result, e
    text = dumps({k: v for k, v in result.to_dict().items() if k != "report"})
    print(result.table())
    print(text)
    if a.audit_output:
        with open(a.audit_output, "w") as fh:
            fh.write(text + "\n")
    if failed is not None:
        print(f"hf-drencoder audit: {failed}", file=sys.stderr)
        raise SystemExit(1)
    return result
