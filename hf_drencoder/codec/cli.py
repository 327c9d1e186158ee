"""``hf-drencoder pretrain-codec``: stage 1 from the command line.

Loads a model (a local folder with weights, or a ``config.json`` for a randomly initialised one), applies
LoRA, obtains private gradient statistics (from a saved release, or by releasing them now on a dataset and
recording the release in a privacy ledger), builds the prior and pre-trains a codec, then writes::

    OUTPUT_DIR/config.json, model.safetensors, README.md   the codec (GradientCodec.from_pretrained(OUTPUT_DIR))
    OUTPUT_DIR/statistics/                                  the released statistics (reusable)
    OUTPUT_DIR/privacy_accountant.json                      the ledger of the release, to continue in training
"""

from __future__ import annotations

import argparse
import json
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


def add_pretrain_codec_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``pretrain-codec`` on an ``argparse`` subparsers object; returns the sub-parser."""
    p = subparsers.add_parser("pretrain-codec", help=PRETRAIN_CODEC_HELP, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model and LoRA")
    m.add_argument("--model", required=True, help="local model folder (weights) or a config.json / folder with only a config")
    m.add_argument("--task", choices=("causal_lm", "sequence_classification"), default=None,
                   help="head to load (default: from the config's architectures)")
    m.add_argument("--num-labels", type=int, default=None, help="labels of a sequence-classification head")
    m.add_argument("--lora-r", type=int, default=8)
    m.add_argument("--lora-alpha", type=int, default=16)
    m.add_argument("--lora-target-modules", default="q_proj,v_proj", help="comma-separated module names")
    m.add_argument("--modules-to-save", default=None, help="comma-separated extra trainable modules (heads)")
    s = p.add_argument_group("private statistics (stage 1)")
    s.add_argument("--statistics", default=None, help="folder of already released statistics (no new privacy cost)")
    s.add_argument("--dataset", default=None, help="'embedded-r8' (Reuters-R8, needs a tokenizer), or 'synthetic' (random tokens, for trials)")
    s.add_argument("--max-length", type=int, default=64)
    s.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping norm C")
    s.add_argument("--stats-noise-multiplier", type=float, default=1.0, help="noise multiplier z of the release (recorded in the ledger)")
    s.add_argument("--stats-batch-size", type=float, default=256, help="expected (Poisson) batch size of each release")
    s.add_argument("--stats-batches", type=int, default=4, help="number of batch releases")
    s.add_argument("--target-delta", type=float, default=None, help="delta of the ledger (default 1/len(dataset))")
    s.add_argument("--accountant", choices=("rdp", "prv", "gdp"), default="prv")
    c = p.add_argument_group("codec")
    c.add_argument("--prior", choices=("paper", "element", "lowrank"), default="lowrank")
    c.add_argument("--latent-ratio", type=_ratio, default=1 / 64, help="payload over gradient size, e.g. 1/64")
    c.add_argument("--expected-batch-size", type=float, default=32, help="expected batch size of the training steps the codec will encode")
    c.add_argument("--train-noise-multiplier", type=float, default=1.0, help="sigma of training, to validate decoding at noise sigma C / B")
    c.add_argument("--temporal-rho", type=float, default=0.8, help="AR(1) persistence of the temporal prior (0: static prior)")
    c.add_argument("--lora-rank", type=int, default=1, help="rank of the low-rank part for the LoRA factors (0: off)")
    c.add_argument("--decoder", choices=("mmse", "mlp"), default="mmse")
    c.add_argument("--max-steps", type=int, default=300, help="training steps of the learned residual (decoder mlp)")
    c.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the codec to this Hub repository")
    p.set_defaults(func=run_pretrain_codec)
    return p


def _load_model(args):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = args.model
    folder = os.path.dirname(path) if path.endswith(".json") else path
    config = AutoConfig.from_pretrained(path if path.endswith(".json") else folder)
    task = args.task
    if task is None:
        arch = " ".join(getattr(config, "architectures", None) or [])
        task = "sequence_classification" if "SequenceClassification" in arch or args.num_labels else "causal_lm"
    if task == "sequence_classification" and args.num_labels:
        config.num_labels = args.num_labels
    cls = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    has_weights = os.path.isdir(folder) and any(
        f.endswith((".safetensors", ".bin")) for f in os.listdir(folder)
    ) and not path.endswith(".json")
    # dropout off: the statistics are of the gradients the private steps will compute
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout"):
        if hasattr(config, key):
            setattr(config, key, 0.0)
    model = cls.from_pretrained(folder, config=config) if has_weights else cls.from_config(config)
    return model, task, folder


def _dataset(args, model, task, folder):
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

        from ..embedded import load_reuters, tokenize_dataset

        tok = AutoTokenizer.from_pretrained(folder)
        data = tokenize_dataset(load_reuters("r8")["train"], tok, args.max_length)
        data.set_format("torch")
    else:
        raise SystemExit(f"unknown --dataset {args.dataset!r}: use 'embedded-r8' or 'synthetic', or pass --statistics")

    def collate(rows):
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0] if k not in ("label", "labels")}
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


def run_pretrain_codec(args: argparse.Namespace):
    """Run ``pretrain-codec`` with parsed ``args``; returns the codec."""
    from peft import LoraConfig, get_peft_model

    from ..privacy.accounting import PrivacyAccountant
    from .layout import LoraLayout
    from .pretrain import pretrain_codec
    from .priors import build_prior
    from .statistics import GradientStatistics, collect_gradient_statistics

    if (args.statistics is None) == (args.dataset is None):
        raise SystemExit("give exactly one statistics source: --statistics DIR (already released) or --dataset NAME (release now)")
    model, task, folder = _load_model(args)
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
        target_modules=[t for t in args.lora_target_modules.split(",") if t],
        modules_to_save=[t for t in args.modules_to_save.split(",") if t] if args.modules_to_save else None,
        task_type="SEQ_CLS" if task == "sequence_classification" else "CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    layout = LoraLayout.from_model(model)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.statistics:
        stats = GradientStatistics.load(args.statistics)
        stats.layout.check_compatible(layout, what="statistics", against="model")
        print(f"statistics from {args.statistics}: no new privacy cost")
    else:
        data, collate = _dataset(args, model, task, folder)
        delta = args.target_delta or 1.0 / len(data)
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


__all__ = ["add_pretrain_codec_parser", "main", "run_pretrain_codec"]
