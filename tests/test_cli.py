"""The hf-drencoder command: the embedded demo end to end (a few steps) and the epsilon calculator."""

import json

import pytest

from hf_drencoder.cli import main
from hf_drencoder.privacy import compute_epsilon


def test_epsilon_command_prints_all_accountants(capsys):
    main(["epsilon", "--noise_multiplier", "1.5", "--sample_rate", "0.04", "--steps", "2250", "--delta", "1e-5"])
    out = json.loads(capsys.readouterr().out)
    assert out["epsilon_rdp"] == pytest.approx(7.3291, rel=0.01)
    assert out["epsilon_prv"] == pytest.approx(compute_epsilon([(1.5, 0.04, 2250)], 1e-5, "prv"))
    assert set(out) == {"epsilon_rdp", "epsilon_prv", "epsilon_gdp", "mu_gdp"}


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "demo" in capsys.readouterr().out


def test_demo_runs_end_to_end_on_the_embedded_default(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    out_dir = tmp_path / "demo"
    main([
        "demo", "--output_dir", str(out_dir), "--max_steps", "3", "--per_device_train_batch_size", "16",
        "--max_length", "32", "--max_eval_samples", "64", "--disable_tqdm", "true", "--target_epsilon", "2.0",
    ])
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "epsilon" in printed
    saved = json.loads((out_dir / "demo_result.json").read_text())
    assert saved["train_examples"] == 5485 and saved["test_examples"] == 64 and saved["steps"] == 3
    assert 0.0 <= saved["accuracy"] <= 1.0
    assert 0 < saved["epsilon"] <= 2.0
    report = json.loads((out_dir / "privacy_report.json").read_text())
    assert report["delta"] == pytest.approx(1 / 5485) and report["privacy_unit"] == "example"
    assert (out_dir / "adapter_model.safetensors").is_file()
