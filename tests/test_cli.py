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
    assert set(out) == {"epsilon_rdp", "epsilon_prv", "epsilon_pld", "epsilon_gdp", "mu_gdp"}


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


# ---- one coherent command line ---------------------------------------------------------------------------------

COMMANDS = ("audit", "demo", "epsilon", "federated", "pretrain-codec")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_prints_its_own_usage(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: hf-drencoder {command} [-h]")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"  {c}" in out for c in COMMANDS)


def test_unknown_command_says_so_on_stderr(capsys):
    with pytest.raises(SystemExit) as e:
        main(["frobnicate", "--x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error: unknown command 'frobnicate'" in err and "pretrain-codec" in err


def test_epsilon_takes_dash_and_underscore_flags(capsys):
    main(["epsilon", "--noise-multiplier", "1.5", "--sample_rate", "0.04", "--steps", "2250", "--delta", "1e-5"])
    dashed = json.loads(capsys.readouterr().out)
    main(["epsilon", "--noise_multiplier", "1.5", "--sample-rate", "0.04", "--steps", "2250", "--delta", "1e-5"])
    assert json.loads(capsys.readouterr().out) == dashed


def _strict_json(text):
    def refuse(name):
        raise AssertionError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_configuration_errors_are_one_line_with_exit_code_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["epsilon", "--noise_multiplier", "1", "--sample_rate", "0.1", "--steps", "10", "--delta", "2"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [lines[0]] and lines[0].startswith("hf-drencoder epsilon: error: --delta must be in (0, 1)")
    assert "Traceback" not in err
    # --debug shows where it came from (before or after the command)
    for argv in (["--debug", "epsilon"], ["epsilon", "--debug"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--noise_multiplier", "1", "--sample_rate", "0.1", "--steps", "10", "--delta", "2"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" in err and "ConfigError" in err


def test_demo_refuses_contradictory_settings_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--noise_multiplier", "1", "--target_epsilon", "3", "--output_dir", "unused"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "hf-drencoder demo: error: set exactly one of target_epsilon and noise_multiplier" in err


def test_demo_noise_multiplier_replaces_the_default_budget():
    from hf_drencoder.demo import DEMO_DEFAULTS, parse_demo_args

    assert parse_demo_args([])[1].target_epsilon == DEMO_DEFAULTS["target_epsilon"]
    for flag in ("--noise_multiplier", "--noise-multiplier"):
        _, args = parse_demo_args([flag, "1"])
        assert args.noise_multiplier == 1.0 and args.target_epsilon is None
    _, args = parse_demo_args(["--noise_multiplier=0.8", "--target-epsilon", "4", "--disable_dp", "true"])
    assert args.target_epsilon == 4.0  # an explicit budget is kept (and with DP off, nothing is refused)
    _, args = parse_demo_args(["--max-steps", "7", "--per_device_train_batch_size", "4"])
    assert args.max_steps == 7 and args.per_device_train_batch_size == 4


def test_json_output_has_no_infinity():
    from hf_drencoder._jsonio import dumps

    text = dumps({"epsilon": float("inf"), "accuracy": 0.5, "nested": {"mu": float("nan")}, "list": [float("-inf")]})
    data = _strict_json(text)
    assert data["epsilon"] is None and data["accuracy"] == 0.5 and data["nested"]["mu"] is None
    assert data["non_finite"] == {"epsilon": "inf", "nested.mu": "nan", "list[0]": "-inf"}
    assert "non_finite" not in _strict_json(dumps({"epsilon": 1.0}))


def test_pop_debug_leaves_trainer_debug_values_alone():
    from hf_drencoder.cli import _pop_debug

    assert _pop_debug(["--debug", "demo", "--x", "1"]) == (["demo", "--x", "1"], True)
    assert _pop_debug(["demo", "--debug", "underflow_overflow"]) == (["demo", "--debug", "underflow_overflow"], False)
    assert _pop_debug(["demo", "--max_steps", "1", "--debug"]) == (["demo", "--max_steps", "1"], True)


def test_audit_dispatch_shows_progress_bars_by_default(monkeypatch):
    import hf_drencoder.audit as audit

    seen = []
    monkeypatch.setattr(audit, "main", lambda argv: seen.append(argv))
    main(["audit", "--max_steps", "1"])
    main(["audit", "--disable-tqdm", "true"])
    assert seen[0][:2] == ["--disable_tqdm", "false"] and seen[1] == ["--disable-tqdm", "true"]


def test_federated_defaults_progress_bar_and_report_to():
    from hf_drencoder.federated.cli import parse_federated_args

    data_args, fed_args = parse_federated_args([])
    assert fed_args.disable_tqdm is False and data_args.report_to == ["none"]
    data_args, fed_args = parse_federated_args(["--report-to", "tensorboard", "--noise-multiplier", "1.2"])
    assert data_args.report_to == ["tensorboard"] and fed_args.noise_multiplier == 1.2 and fed_args.target_epsilon is None
