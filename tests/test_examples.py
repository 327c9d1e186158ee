"""The example scripts run end to end on their embedded defaults (and on user files), a few steps each."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import make_tiny_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


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


def test_run_clm_dr_from_config_and_text_files_with_grouping(tmp_path, offline, caplog):
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
    assert "the privacy unit is a block of 16 tokens" in caplog.text  # said, not left to the docs
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


def run_example(name, args, env, cwd):
    """Run ``examples/<name>.py`` as a script in a fresh process, with ``env`` as its only HF_DRENCODER_* settings."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_DRENCODER_")}
    full_env.update(env, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _words(rng, k):
    return " ".join(f"w{rng.randrange(100)}" for _ in range(k))


# ---- run_sft_dr.py: TRL's sft.py with the class swap (run end to end in test_trl.py) ----

def test_run_sft_dr_parses_trls_arguments_and_refuses_privacy_flags(tmp_path):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    from hf_drencoder.arguments import private_arguments_class

    module = load_example("run_sft_dr")
    common = ["--output_dir", str(tmp_path / "o"), "--use_cpu", "--bf16", "false", "--report_to", "none",
              "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
    _, training_args, model_args, _ = module.make_parser().parse_args_and_config(common)
    assert type(training_args) is SFTConfig  # a plain SFTConfig: the trainer adds the privacy settings
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == (4, 8, ["q_proj", "v_proj"])
    # a privacy flag is an error, not silently ignored: the settings come from the environment
    with pytest.raises(ValueError, match="target_epsilon"):
        module.make_parser().parse_args_and_config(common + ["--target_epsilon", "3"])
    # a script that wants them as flags parses the private SFTConfig: no clash with ModelConfig's lora_* flags
    parser = TrlParser((ScriptArguments, private_arguments_class(SFTConfig), ModelConfig, DatasetMixtureConfig))
    _, private, model_args, _ = parser.parse_args_and_config(
        common + ["--target_epsilon", "3", "--default_lora_r", "2"])
    assert (private.target_epsilon, private.default_lora_r, model_args.lora_r) == (3.0, 2, 4)


# ---- run_clm_dr.py on GPT-2, privacy from the environment ----

# ("variable" also covers HfArgumentParser rewriting the fields' types before the environment is read)
@pytest.mark.parametrize("setting", ["variable", "config_file"])
def test_run_clm_dr_on_gpt2_with_epsilon_from_the_environment(tmp_path, offline, setting):
    import random

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_head=2, n_layer=1, n_positions=64, vocab_size=128, bos_token_id=1,
                               eos_token_id=1, pad_token_id=0)).save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    rng = random.Random(0)
    (tmp_path / "train.txt").write_text("".join(_words(rng, 10) + "\n" for _ in range(40)))
    (tmp_path / "dev.txt").write_text("".join(_words(rng, 10) + "\n" for _ in range(8)))
    if setting == "variable":
        env = {"HF_DRENCODER_TARGET_EPSILON": "2"}
    else:
        (tmp_path / "privacy.json").write_text(json.dumps({"target_epsilon": 2}))
        env = {"HF_DRENCODER_CONFIG": str(tmp_path / "privacy.json")}
    out = tmp_path / "clm-gpt2"
    log = run_example("run_clm_dr", [
        "--model_name_or_path", folder, "--train_file", tmp_path / "train.txt",
        "--validation_file", tmp_path / "dev.txt",
        "--block_size", "16", "--per_device_train_batch_size", "8", "--max_steps", "2", "--output_dir", out,
    ], env=env, cwd=tmp_path)
    result = json.loads((out / "run_clm_dr_result.json").read_text())
    assert result["train_examples"] == 40 and 0 < result["privacy"]["epsilon"] <= 2.0 + 1e-6
    report = check_saved(out, steps=2)
    assert report["target_epsilon"] == 2 and report["sample_rate"] == pytest.approx(8 / 40)
    # GPT-2 got peft's default LoRA modules for its architecture (GPT2LMHeadModel is a causal LM)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["c_attn"]
    assert "not a PeftModel: training a LoRA adapter" in log
    assert math.isfinite(result["eval"]["eval_perplexity"])
