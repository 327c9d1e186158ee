"""``hf-drencoder federated`` and examples/federated_dr.py on the embedded MiniLM + Reuters-R8 (a few tiny rounds)."""

import json
import runpy
from pathlib import Path

import pytest

from hf_drencoder.cli import main
from hf_drencoder.privacy import compute_epsilon

TINY = ["--num_parties", "4", "--parties_per_round", "2", "--num_rounds", "2", "--local_steps", "1", "--local_batch_size", "4",
        "--max_length", "16", "--max_train_samples", "200", "--max_eval_samples", "32", "--disable_tqdm", "true",
        "--accountant", "rdp", "--sampling_seed", "0", "--noise_seed", "0"]


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))


def test_federated_command_on_the_embedded_default(tmp_path, hf_offline, capsys):
    out = tmp_path / "fed"
    main(["federated", "--output_dir", str(out), "--target_epsilon", "3.0", "--report_to", "tensorboard", *TINY])
    printed = capsys.readouterr().out
    assert "client-level epsilon" in printed and "accuracy" in printed
    result = json.loads((out / "federated_result.json").read_text())
    assert result["train_examples"] == 200 and result["test_examples"] == 32 and result["rounds"] == 2
    assert 0 < result["epsilon"] <= 3.0
    assert result["epsilon_rdp"] == pytest.approx(compute_epsilon([(result["noise_multiplier"], 0.5, 2)], 0.25, "rdp"))
    assert 0.0 <= result["accuracy"] <= 1.0
    history = json.loads((out / "federated_history.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["privacy_unit"] == "party" and report["delta"] == pytest.approx(1 / 4)
    assert (out / "adapter_model.safetensors").is_file() and (out / "last-state" / "federation_state.json").is_file()
    # report_to tensorboard: one scalar per round and public key, nothing the server alone may know
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in (out / "runs").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/epsilon", "eval/accuracy", "eval/macro_f1"} <= tags
    assert not {t for t in tags if t.split("/")[-1] in ("num_received", "uplink_bytes", "parties")}
    assert [e.step for e in acc.Scalars("train/epsilon")] == [1, 2]
    assert acc.Scalars("train/epsilon")[-1].value == pytest.approx(result["epsilon"], rel=1e-5)


def test_federated_example_script_runs(tmp_path, hf_offline, capsys):
    script = Path(__file__).resolve().parents[1] / "examples" / "federated_dr.py"
    namespace = runpy.run_path(str(script))
    sim = namespace["main"](["--output_dir", str(tmp_path / "ex"), "--target_epsilon", "2.0", *TINY])
    assert sim.round == 2
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{"):])
    assert summary["round"] == 2 and summary["uplink_bytes_per_party"] == 4 * sim.layout.dim
    report = json.loads((tmp_path / "ex" / "privacy_report.json").read_text())
    assert report["rounds"] == 2 and 0 < report["epsilon"] <= 2.0


def test_noise_calibration_is_a_command_line_option():
    from hf_drencoder.federated.cli import parse_federated_args

    _, args = parse_federated_args(["--noise_calibration", "local"])
    assert args.noise_calibration == "local"
    _, default = parse_federated_args([])
    assert default.noise_calibration == "distributed"
    with pytest.raises(SystemExit):  # anything else is refused by the parser
        parse_federated_args(["--noise_calibration", "none"])
