"""The example scripts run end to end on their embedded defaults (and on user files), a few steps each."""

import importlib.util
import json
import math
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def check_saved(out, steps):
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == steps and report["dp_enabled"] and math.isfinite(report["epsilon"])
    assert (out / "adapter_model.safetensors").is_file()
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "differential_privacy:" in card
    return report


def test_run_clm_dr_embedded_default(tmp_path, offline):
    out = tmp_path / "clm"
    result = load_example("run_clm_dr").main([
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "8", "--block_size", "32",
        "--max_train_samples", "32", "--max_eval_samples", "8", "--embedded_train_documents", "60",
        "--target_epsilon", "8", "--noise_seed", "0",
    ])
    report = check_saved(out, steps=2)
    assert report["epsilon"] <= 8.0 + 1e-6 and report["sample_rate"] == pytest.approx(8 / 32)
    ev = result["eval"]
    assert ev["eval_perplexity"] == pytest.approx(math.exp(ev["eval_nll"]), rel=1e-6)
    assert 0 < ev["eval_num_tokens"] <= 8 * 31
    assert "Evaluation" in (out / "README.md").read_text()


def test_run_clm_dr_from_config_and_text_files_with_grouping(tmp_path, offline):
    from transformers import LlamaConfig

    from hf_drencoder.embedded import minilm_path

    config_dir = tmp_path / "config"
    LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64).save_pretrained(config_dir)
    words = "private training keeps every example hidden behind clipped and noised gradients".split()
    lines = [" ".join(words[i % 5:] + words[: i % 5]) for i in range(40)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "dev.txt").write_text("\n".join(lines[:6]) + "\n")
    out = tmp_path / "clm-files"
    result = load_example("run_clm_dr").main([
        "--config_name", str(config_dir), "--tokenizer_name", minilm_path(), "--train_file", str(tmp_path / "train.txt"),
        "--validation_file", str(tmp_path / "dev.txt"), "--group_texts", "--block_size", "16",
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "4",
        "--noise_multiplier", "1.0",
    ])
    # 40 lines of 13-14 tokens ([CLS] ... [SEP]) grouped in blocks of 16: the privacy unit is a block.
    assert result["group_texts"] and 30 <= result["train_examples"] <= 40
    report = check_saved(out, steps=2)
    assert report["noise_multiplier"] == 1.0 and report["target_epsilon"] is None and report["sample_rate"] == pytest.approx(4 / result["train_examples"])
    assert result["eval"]["eval_num_tokens"] > 0


def test_run_classification_dr_embedded_default(tmp_path, offline):
    out = tmp_path / "cls"
    result = load_example("run_classification_dr").main([
        "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "16",
        "--max_train_samples", "64", "--max_eval_samples", "32", "--max_seq_length", "32", "--noise_seed", "0",
        "--noise_multiplier", "1.0",  # a fixed sigma skips calibration (tested with run_clm_dr above): faster
    ])
    report = check_saved(out, steps=2)
    assert report["noise_multiplier"] == 1.0 and report["target_epsilon"] is None
    assert len(result["labels"]) == 8 and 0.0 <= result["eval"]["eval_accuracy"] <= 1.0
    assert "eval_macro_f1" in result["eval"]
    card = (out / "README.md").read_text()
    # the evaluation reaches the card as Hub model-index results, without throughput entries
    assert "model-index:" in card and "type: accuracy" in card and "| accuracy |" in card
    assert "samples_per_second" not in card
