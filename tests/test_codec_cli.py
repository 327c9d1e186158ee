"""hf-drencoder pretrain-codec: from a local model folder (or a config) to a codec folder."""

import argparse
import json

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
