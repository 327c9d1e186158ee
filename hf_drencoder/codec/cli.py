"""``hf-drencoder pretrain-codec``: stage 1 from the command line.

Loads a model (a local folder with weights, or a ``config.json`` for a randomly initialised one), applies
LoRA (peft's default target modules for the architecture unless --lora-target-modules names them), obtains
private gradient statistics (from a saved release, or by releasing them now on a dataset and recording the
release in a privacy ledger), builds the prior and pre-trains a codec, then writes::

    OUTPUT_DIR/config.json, model.safetensors, README.md   the codec (GradientCodec.from_pretrained(OUTPUT_DIR))
    OUTPUT_DIR/statistics/                                  the released statistics (reusable)
    OUTPUT_DIR/privacy_accountant.json                      the ledger of the release, to continue in training

The dataset is 'embedded-r8', 'synthetic', or yours: a ``datasets`` save_to_disk folder, a CSV or a JSON lines
file with a text column and (for classification) a label column of class ids (--text-column, --label-column).
Every argument and the data (labels present and in range, text tokenizable) are checked before anything
private is released. Options take dashes or underscores (--lora-r or --lora_r).
"""

from __future__ import annotations

import argparse
import json
import math
import os

PRETRAIN_CODEC_HELP = "pre-train a gradient codec on synthetic gradients drawn from private statistics"


def _ratio(text: str) -> float:
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a ratio like 1/64 or 0.015625, got {text!r}") from None


def _opt(group, name: str, **kwargs):
    """An option under both spellings (``--num-labels`` and ``--num_labels``), stored under one ``dest``."""
    from ..cli import flags

    names = flags(name)
    kwargs.setdefault("dest", names[0][2:].replace("-", "_"))
    return group.add_argument(*names, **kwargs)


def add_pretrain_codec_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pretrain-codec`` on an ``argparse`` subparsers object; returns the sub-parser.

    Every option takes dashes or underscores (``--lora-r`` or ``--lora_r``).
    """
    p = subparsers.add_parser("pretrain-codec", help=PRETRAIN_CODEC_HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and LoRA")
    _opt(m, "--model", required=True, help="local model folder (weights) or a config.json / folder with only a config")
    _opt(m, "--task", choices=("causal_lm", "sequence_classification"), default=None,
         help="head to load (default: from the config's architectures)")
    _opt(m, "--num-labels", type=int, default=None,
         help="labels of a sequence-classification head (default: the dataset's ClassLabel, else the config's)")
    _opt(m, "--lora-r", type=int, default=8)
    _opt(m, "--lora-alpha", type=int, default=16)
    _opt(m, "--lora-target-modules", default=None,
         help="comma-separated module names (default: peft's default target modules for the architecture)")
    _opt(m, "--modules-to-save", default=None, help="comma-separated extra trainable modules (heads)")
    s = p.add_argument_group("private statistics (stage 1)")
    _opt(s, "--statistics", default=None, help="folder of already released statistics (no new privacy cost)")
    _opt(s, "--dataset", default=None,
         help="'embedded-r8' (Reuters-R8), 'synthetic' (random tokens, for trials), or your data: a datasets "
              "save_to_disk folder, a .csv or a .json / .jsonl file with a text and a label column")
    _opt(s, "--text-column", default="text", help="text column of a user dataset (tokenized with --tokenizer)")
    _opt(s, "--label-column", default="label",
         help="label column of a user dataset (class ids 0 .. num_labels - 1; not needed for causal_lm)")
    _opt(s, "--split", default="train", help="split of a saved DatasetDict to use")
    _opt(s, "--tokenizer", default=None, help="tokenizer folder (default: the model folder)")
    _opt(s, "--max-length", type=int, default=64)
    _opt(s, "--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    _opt(s, "--stats-noise-multiplier", type=float, default=1.0, help="noise multiplier z of the release (recorded in the ledger)")
    _opt(s, "--stats-batch-size", type=float, default=256, help="expected (Poisson) batch size of each release")
    _opt(s, "--stats-batches", type=int, default=4, help="number of batch releases")
    _opt(s, "--target-delta", type=float, default=None, help="delta of the ledger (default 1/len(dataset))")
    _opt(s, "--accountant", choices=("rdp", "prv", "gdp"), default="prv")
    c = p.add_argument_group("codec")
    _opt(c, "--prior", choices=("paper", "element", "lowrank"), default="lowrank")
    _opt(c, "--latent-ratio", type=_ratio, default=1 / 64, help="payload over gradient size, e.g. 1/64")
    _opt(c, "--expected-batch-size", type=float, default=32, help="expected batch size of the training steps the codec will encode")
    _opt(c, "--train-noise-multiplier", type=float, default=1.0, help="sigma of training, to validate decoding at noise sigma C / B")
    _opt(c, "--temporal-rho", type=float, default=0.8, help="AR(1) persistence of the temporal prior (0: static prior)")
    _opt(c, "--lora-rank", type=int, default=1, help="rank of the low-rank part for the LoRA factors (0: off)")
    _opt(c, "--decoder", choices=("mmse", "mlp"), default="mmse")
    _opt(c, "--max-steps", type=int, default=300, help="training steps of the learned residual (decoder mlp)")
    _opt(c, "--seed", type=int, default=0)
    _opt(p, "--output-dir", required=True)
    _opt(p, "--push-to-hub", default=None, metavar="REPO_ID", help="also push the codec to this Hub repository")
    p.set_defaults(func=run_pretrain_codec)
    return p


def _fail(message: str):
    from ..cli import ConfigError

    raise ConfigError(message)


def check_args(args) -> None:
    """Refuse what cannot run, before the model is loaded and long before anything private is released."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from .codec import check_latent_ratio

    if (args.statistics is None) == (args.dataset is None):
        _fail("give exactly one statistics source: --statistics DIR (already released) or --dataset NAME (release now)")
    if not os.path.exists(args.model):
        _fail(f"--model {args.model!r} does not exist: give a local model folder, or a config.json for a random model")
    if args.statistics is not None and not os.path.isdir(args.statistics):
        _fail(f"--statistics {args.statistics!r} is not a folder of released statistics")
    if args.dataset is not None and args.dataset not in ("embedded-r8", "synthetic"):
        if not os.path.exists(args.dataset):
            _fail(f"--dataset {args.dataset!r} is neither 'embedded-r8', 'synthetic' nor an existing file or folder")
        if os.path.isfile(args.dataset) and not args.dataset.endswith((".csv", ".json", ".jsonl")):
            _fail(f"--dataset {args.dataset!r}: a file must be .csv, .json or .jsonl (or pass a save_to_disk folder)")
    positive = {"--max-length": args.max_length, "--max-grad-norm": args.max_grad_norm,
                "--stats-noise-multiplier": args.stats_noise_multiplier, "--stats-batch-size": args.stats_batch_size,
                "--stats-batches": args.stats_batches, "--expected-batch-size": args.expected_batch_size,
                "--lora-r": args.lora_r, "--max-steps": args.max_steps}
    for name, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            _fail(f"{name} must be positive and finite, got {value}")
    if not (args.train_noise_multiplier >= 0 and math.isfinite(args.train_noise_multiplier)):
        _fail(f"--train-noise-multiplier must be >= 0, got {args.train_noise_multiplier}")
    if args.target_delta is not None and not (0 < args.target_delta < 1):
        _fail(f"--target-delta must be in (0, 1), got {args.target_delta}")
    if args.num_labels is not None and args.num_labels < 1:
        _fail(f"--num-labels must be >= 1, got {args.num_labels}")
    if not (0 <= args.temporal_rho < 1):
        _fail(f"--temporal-rho must be in [0, 1), got {args.temporal_rho}")
    if args.lora_rank < 0:
        _fail(f"--lora-rank must be >= 0, got {args.lora_rank}")
    try:
        check_latent_ratio(args.latent_ratio)
    except ValueError as e:
        _fail(f"--latent-ratio: {e}")
    if os.path.isfile(args.output_dir):
        _fail(f"--output-dir {args.output_dir!r} is a file")
    parent = os.path.dirname(os.path.abspath(args.output_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        _fail(f"--output-dir {args.output_dir!r} cannot be created: {parent} is not writable")
    if args.push_to_hub:
        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as e:
            _fail(f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id: {e}")


def _config_and_task(args):
    from transformers import AutoConfig

    path = args.model
    folder = os.path.dirname(path) if path.endswith(".json") else path
    config = AutoConfig.from_pretrained(path if path.endswith(".json") else folder)
    task = args.task
    if task is None:
        arch = " ".join(getattr(config, "architectures", None) or [])
        task = "sequence_classification" if "SequenceClassification" in arch or args.num_labels else "causal_lm"
    return config, task, folder


def _load_model(args, config, task, folder, num_labels):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = args.model
    if task == "sequence_classification" and num_labels:
        config.num_labels = num_labels
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    has_weights = os.path.isdir(folder) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)
    ) and not path.endswith(".json")
    # dropout off: the statistics are of the gradients the private steps will compute
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return cls.from_pretrained(folder, config=config) if has_weights else cls.from_config(config)


def load_user_dataset(path: str, split: str = "train"):
    """A user's raw dataset: a ``save_to_disk`` folder (a Dataset, or a DatasetDict and its ``split``), a .csv,
    or a .json / .jsonl file."""
    import datasets

    if os.path.isdir(path):
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                _fail(f"--dataset {path!r} has splits {', '.join(data)}, not {split!r}: choose one with --split")
            data = data[split]
        return data
    kind = "csv" if path.endswith(".csv") else "json"
    return datasets.load_dataset(kind, data_files=path, split="train")


def _tokenize_user_dataset(args, raw, task, folder):
    from transformers import AutoTokenizer

    from ..data_checks import check_has_labels

    columns = raw.column_names
    if "input_ids" in columns:  # already tokenized: used as is
        if task != "causal_lm":
            label = check_has_labels(raw, candidates=(args.label_column, "labels", "label"), what=f"--dataset {args.dataset}")
            if label != "labels":
                raw = raw.rename_column(label, "labels")
        return raw
    if args.text_column not in columns:
        _fail(f"--dataset {args.dataset!r} has no text column {args.text_column!r}; its columns are: "
              f"{', '.join(columns)} (choose one with --text-column)")
    if task != "causal_lm" and args.label_column not in columns:
        _fail(f"--dataset {args.dataset!r} has no label column {args.label_column!r}; its columns are: "
              f"{', '.join(columns)} (choose one with --label-column)")
    tok_path = args.tokenizer or folder
    try:
        tok = AutoTokenizer.from_pretrained(tok_path)
    except (OSError, ValueError) as e:
        _fail(f"no tokenizer in {tok_path!r} for the text of --dataset ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
              "pass --tokenizer FOLDER")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def encode(batch):
        return tok(batch[args.text_column], truncation=True, padding="max_length", max_length=args.max_length)

    keep = [] if task == "causal_lm" else [args.label_column]
    data = raw.map(encode, batched=True, remove_columns=[c for c in columns if c not in keep], desc="Tokenizing")
    if task != "causal_lm" and args.label_column != "labels":
        data = data.rename_column(args.label_column, "labels")
    return data


def _num_labels(args, raw, config, task):
    """--num-labels, else the dataset's ClassLabel, else the config's (only for classification)."""
    if task != "sequence_classification":
        return None
    if args.num_labels:
        return args.num_labels
    features = getattr(raw, "features", None) or {}
    for name in (args.label_column, "labels", "label"):
        feature = features.get(name)
        if feature is not None and hasattr(feature, "num_classes"):
            return feature.num_classes
    return getattr(config, "num_labels", None)


def _dataset(args, model, task, folder, raw=None):
    import torch

    if args.dataset == "synthetic":
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(args.seed)
        n = 512
        ids = torch.randint(vocab, (n, args.max_length), generator=g)
        labels = torch.randint(max(getattr(model.config, "num_labels", 2), 1), (n,), generator=g)
        data = [{"input_ids": ids[i], "label": labels[i]} for i in range(n)]
    elif args.dataset == "embedded-r8":
        from transformers import AutoTokenizer

        from ..embedded import tokenize_dataset

        tok = AutoTokenizer.from_pretrained(args.tokenizer or folder)
        data = tokenize_dataset(raw, tok, args.max_length)
        data.set_format("torch")
    else:
        data = _tokenize_user_dataset(args, raw, task, folder)
        data.set_format("torch")

    def collate(rows):
        batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0] if k not in ("label", "labels")}
        if task == "causal_lm":
            labels = batch["input_ids"].clone()
            if "attention_mask" in batch:
                labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        else:
            key = "labels" if "labels" in rows[0] else "label"
            batch["labels"] = torch.stack([torch.as_tensor(r[key]) for r in rows])
        return batch

    return data, collate


def _released(stats, args) -> str:
    return (f"{', '.join(stats.parts)} of the clipped (C = {args.max_grad_norm:g}) per-example LoRA gradients, "
            f"summed over {stats.num_releases} Poisson batches (expected size {args.stats_batch_size:g}) with Gaussian "
            f"noise (multiplier {args.stats_noise_multiplier:g}); {stats.nbytes} bytes in all")


def run_pretrain_codec(args: argparse.Namespace):
    """Run ``pretrain-codec`` with parsed ``args``; returns the codec.

    Every argument, the model, the LoRA layout, the data (labels present and in range, text tokenized) and the
    codec's settings are checked before the statistics are released: a refusal costs no privacy.
    """
    from peft import LoraConfig, get_peft_model

    from ..data_checks import check_train_dataset
    from ..privacy.accounting import PrivacyAccountant
    from .codec import GradientCodec
    from .layout import LoraLayout
    from .pretrain import pretrain_codec
    from .priors import build_prior
    from .statistics import GradientStatistics, collect_gradient_statistics

    check_args(args)
    config, task, folder = _config_and_task(args)
    raw = None
    if args.dataset == "embedded-r8":
        from ..embedded import load_reuters

        raw = load_reuters("r8")["train"]
    elif args.dataset not in (None, "synthetic"):
        raw = load_user_dataset(args.dataset, args.split)
    num_labels = _num_labels(args, raw, config, task) if raw is not None else args.num_labels
    model = _load_model(args, config, task, folder, num_labels)
    targets = [t for t in args.lora_target_modules.split(",") if t] if args.lora_target_modules else None
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
        target_modules=targets,  # None: peft's default modules for this architecture
        modules_to_save=[t for t in args.modules_to_save.split(",") if t] if args.modules_to_save else None,
        task_type="SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        which = ",".join(targets) if targets else f"peft's default for model type {model.config.model_type!r}"
        _fail(f"LoRA target modules ({which}) do not fit the model: {e}")
    layout = LoraLayout.from_model(model)
    # the codec's settings for this layout, refused now rather than after the release
    GradientCodec(layout=layout.to_dict(), latent_ratio=args.latent_ratio, decoder=args.decoder,
                  temporal_rho=args.temporal_rho if args.decoder == "mmse" else 0.0,
                  lora_rank=args.lora_rank if args.decoder == "mmse" else 0)
    stats = data = None
    if args.statistics:
        stats = GradientStatistics.load(args.statistics)
        stats.layout.check_compatible(layout, what="statistics", against="model")
    else:
        data, collate = _dataset(args, model, task, folder, raw)
        if args.dataset != "synthetic":
            check_train_dataset(data, task=task, what=f"--dataset {args.dataset}",
                                num_labels=model.config.num_labels if task == "sequence_classification" else None)
        if args.stats_batch_size > len(data):
            _fail(f"--stats-batch-size {args.stats_batch_size:g} is larger than the dataset ({len(data)} examples)")
        delta = args.target_delta or 1.0 / len(data)
    os.makedirs(args.output_dir, exist_ok=True)
    if stats is not None:
        print(f"statistics from {args.statistics}: no new privacy cost")
    else:
        accountant = PrivacyAccountant(delta=delta, accountant=args.accountant)
        stats = collect_gradient_statistics(
            model, data, collate, max_grad_norm=args.max_grad_norm, noise_multiplier=args.stats_noise_multiplier,
            expected_batch_size=args.stats_batch_size, num_batches=args.stats_batches, accountant=accountant,
            # the batches are drawn from OS entropy: --seed is public, the sample must not be derivable from it
        )
        stats.save(os.path.join(args.output_dir, "statistics"))
        with open(os.path.join(args.output_dir, "privacy_accountant.json"), "w") as f:
            json.dump({**accountant.state_dict(), "report": accountant.report()}, f, indent=2)
        print(f"released {stats.nbytes} bytes of statistics ({stats.nbytes / (4 * layout.dim):.2f} raw gradients); "
              f"epsilon so far {accountant.epsilon():.3f} at delta {delta:.3g} ({args.accountant})")
    prior = build_prior(stats, args.prior, expected_batch_size=args.expected_batch_size)
    noise = args.train_noise_multiplier * args.max_grad_norm / args.expected_batch_size
    codec = pretrain_codec(
        prior, args.latent_ratio, decoder=args.decoder, noise_std=(noise / 4, noise) if noise > 0 else None,
        temporal_rho=args.temporal_rho if args.decoder == "mmse" else 0.0,
        lora_rank=args.lora_rank if args.decoder == "mmse" else 0, max_steps=args.max_steps, seed=args.seed,
    )
    if data is not None and codec.stage1_privacy is not None and not codec.stage1_privacy.get("public"):
        # what the card states: the release's delta and accountant, and what was released
        codec._record_config("stage1_privacy", {**codec.stage1_privacy, "delta": delta, "accountant": args.accountant,
                                                "max_grad_norm": args.max_grad_norm, "released": _released(stats, args)})
    codec.save_pretrained(args.output_dir)
    print(f"codec for {layout.describe()}: latent {codec.latent_dim} values ({codec.payload_bytes} bytes per message), "
          f"held-out relative MSE (MMSE) {codec.pretrain_report['mmse_heldout']:.4f}; saved to {args.output_dir}")
    if args.push_to_hub:
        codec.push_to_hub(args.push_to_hub)
    return codec


def main(argv=None):
    """Stand-alone entry point (``python -m hf_drencoder.codec.cli pretrain-codec ...``)."""
    parser = argparse.ArgumentParser(prog="hf-drencoder")
    sub = parser.add_subparsers(dest="command", required=True)
    add_pretrain_codec_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    main()


__all__ = ["add_pretrain_codec_parser", "check_args", "load_user_dataset", "main", "run_pretrain_codec"]
