"""hf-drencoder pretrain-codec: from a local model folder (or a config) to a codec folder."""

import argparse
import json

import pytest

from conftest import make_tiny_llama
from peft import LoraConfig, get_peft_model

from hf_drencoder.codec import GradientCodec, LoraLayout
from hf_drencoder.codec.cli import add_pretrain_codec_parser, run_pretrain_codec


def parse(argv):
    parser = argparse.ArgumentParser(prog="hf-drencoder")
    add_pretrain_codec_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_pretrain_codec_cli_on_local_model(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_llama().save_pretrained(model_dir)
    out = tmp_path / "codec"
    args = parse(["pretrain-codec", "--model", str(model_dir), "--lora-r", "4", "--lora-target-modules", "q_proj,v_proj",
                  "--dataset", "synthetic", "--max-length", "8", "--stats-batch-size", "32", "--stats-batches", "2",
                  "--latent-ratio", "1/16", "--output-dir", str(out)])
    codec = run_pretrain_codec(args)
    assert codec.latent_dim == 2048 // 16
    ledger = json.loads((out / "privacy_accountant.json").read_text())
    assert ledger["history"] == [[1.0, 32 / 512, 2]] and ledger["report"]["epsilon"] > 0
    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    loaded = GradientCodec.from_pretrained(out, model=peft_model)
    assert loaded.layout == LoraLayout.from_model(peft_model)
    # reusing the released statistics costs nothing and gives a codec for the same layout
    args2 = parse(["pretrain-codec", "--model", str(model_dir / "config.json"), "--lora-r", "4", "--statistics",
                   str(out / "statistics"), "--prior", "paper", "--output-dir", str(tmp_path / "codec2")])
    assert run_pretrain_codec(args2).layout == loaded.layout
    assert not (tmp_path / "codec2" / "privacy_accountant.json").exists()


def _tiny_bert_folder(tmp_path, num_labels=3):
    """A tiny BERT classifier with a word-level tokenizer of its own, saved like a Hub model folder."""
    from transformers import BertTokenizerFast

    from conftest import make_tiny_bert

    folder = tmp_path / "bert"
    make_tiny_bert(num_labels=num_labels).save_pretrained(folder)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(folder)
    return folder


def _csv(path, labels):
    rows = ["text,category"] + [f"w{i % 90} w{(3 * i) % 90} w{(7 * i) % 90},{label}" for i, label in enumerate(labels)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_pretrain_codec_on_a_user_csv_with_peft_default_targets(tmp_path, offline):
    from huggingface_hub import ModelCard

    from hf_drencoder.cli import main

    model = _tiny_bert_folder(tmp_path)
    data = _csv(tmp_path / "train.csv", [i % 3 for i in range(60)])
    out = tmp_path / "codec"
    main(["pretrain-codec", "--model", str(model), "--dataset", str(data), "--text_column", "text",
          "--label-column", "category", "--max_length", "8", "--stats-batch-size", "16", "--stats_batches", "2",
          "--latent-ratio", "1/8", "--lora_r", "2", "--output-dir", str(out)])
    codec = GradientCodec.from_pretrained(out)
    # peft's defaults for BERT: query and value
    adapted = {b.module.rsplit(".", 1)[-1] for b in codec.layout.blocks if b.factor in ("lora_A", "lora_B")}
    assert adapted == {"query", "value"}
    ledger = json.loads((out / "privacy_accountant.json").read_text())
    assert ledger["history"] == [[1.0, 16 / 60, 2]]
    card = ModelCard.load(out / "README.md")
    dp = card.data.differential_privacy
    assert dp["delta"] == pytest.approx(1 / 60) and dp["epsilon"] == pytest.approx(ledger["report"]["epsilon"])
    assert "Poisson batches" in dp["released"]


def _refused(argv, capsys):
    from hf_drencoder.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain-codec", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and "error:" in err
    return err


def test_pretrain_codec_checks_everything_before_the_release(tmp_path, offline, capsys):
    model = _tiny_bert_folder(tmp_path)
    out = tmp_path / "codec"
    common = ["--model", str(model), "--max-length", "8", "--stats-batch-size", "8", "--output-dir", str(out)]
    bad_labels = _csv(tmp_path / "bad.csv", [0, 1, 2, 7, 7] * 4)
    err = _refused(["--dataset", str(bad_labels), "--label-column", "category", *common], capsys)
    assert "outside [0, 3)" in err and "7 (8 times)" in err
    err = _refused(["--dataset", str(bad_labels), *common], capsys)  # default label column 'label'
    assert "no label column 'label'" in err and "text, category" in err
    err = _refused(["--dataset", str(bad_labels), "--label-column", "category", "--push-to-hub", "a/b/c", *common], capsys)
    assert "--push-to-hub 'a/b/c' is not a Hub repo id" in err
    err = _refused(["--dataset", "synthetic", "--latent-ratio", "2", *common], capsys)
    assert "--latent-ratio" in err
    err = _refused(["--dataset", "synthetic", "--stats_noise_multiplier", "0", *common], capsys)
    assert "--stats-noise-multiplier must be positive" in err
    err = _refused(["--dataset", str(tmp_path / "missing.csv"), *common], capsys)
    assert "missing.csv" in err
    err = _refused(["--dataset", "synthetic", "--lora-target-modules", "nonexistent_module", *common], capsys)
    assert "nonexistent_module" in err
    # nothing was released, nothing was written
    assert not out.exists()
