"""The Flower App in examples/flower-app: its pyproject.toml is one Flower validates, its SuperLink connections parse,
the docs show its real files, and `flwr run <app> local-deployment` trains it against a SuperLink and 2 SuperNodes on
127.0.0.1 (a tiny BERT, a flwr_datasets Dirichlet split of Reuters-R8) and writes its privacy report."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from test_flower import _bin, _free_ports, _stop_group, _wait_for_port  # noqa: E402

from hf_drencoder.federated.flower import federated_args_from_config  # noqa: E402
from hf_drencoder.privacy import compute_epsilon  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
APP = ROOT / "examples" / "flower-app"
APP_FILES = ["pyproject.toml", "superlink-connections.toml", "drencoder_flower/client_app.py",
             "drencoder_flower/server_app.py", "drencoder_flower/task.py"]


def _toml(path):
    import tomli

    return tomli.loads(path.read_text())


def test_the_app_is_a_flower_app_with_our_components(monkeypatch):
    from flwr.cli.config_utils import load_and_validate

    monkeypatch.syspath_prepend(str(APP))
    config, _ = load_and_validate(APP / "pyproject.toml", check_module=True)  # imports both components
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "drencoder_flower.server_app:app", "clientapp": "drencoder_flower.client_app:app"}
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from drencoder_flower import client_app, server_app

    assert isinstance(client_app.app, ClientApp) and isinstance(server_app.app, ServerApp)
    # the run config is a valid FederatedArguments; the Flower 1.42 way keeps connections out of pyproject.toml
    args = federated_args_from_config(config["tool"]["flwr"]["app"]["config"])
    assert args.num_parties == 2 and args.accountant in ("prv", "pld", "rdp")
    assert "federations" not in config["tool"]["flwr"]  # `flwr run` would rewrite such a section


def test_the_superlink_connections_parse():
    from flwr.cli.flower_config import parse_superlink_connection

    conns = _toml(APP / "superlink-connections.toml")["superlink"]
    sim = parse_superlink_connection(conns["local-simulation"], "local-simulation")
    assert sim.address == ":local:" and sim.options.num_supernodes == 2
    dep = parse_superlink_connection(conns["local-deployment"], "local-deployment")
    assert dep.address == "127.0.0.1:8000" and dep.insecure


def test_the_docs_show_the_real_files():
    # mkdocs' snippets extension includes each file at build time (check_paths: a missing file fails the build)
    for doc in ("docs/scaling.md", "docs/federated.md"):
        text = (ROOT / doc).read_text()
        included = set(re.findall(r'--8<-- "examples/flower-app/([^"]+)"', text))
        assert included, doc
        assert all((APP / f).is_file() for f in included), doc
    scaling = set(re.findall(r'--8<-- "examples/flower-app/([^"]+)"', (ROOT / "docs/scaling.md").read_text()))
    assert scaling == set(APP_FILES)


def test_flwr_run_of_the_app_against_a_superlink_and_two_supernodes(tmp_path):
    out = tmp_path / "out"
    app = tmp_path / "flower-app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    link, node0, node1 = _free_ports(3)
    home = tmp_path / "flwr_home"
    home.mkdir()
    # the app's own connection file, with the SuperLink on a free port
    connections = (APP / "superlink-connections.toml").read_text().replace("127.0.0.1:8000", f"127.0.0.1:{link}")
    (home / "config.toml").write_text(connections)
    env = dict(os.environ, FLWR_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_DISABLE_UPDATE_CHECK="1")
    logs, procs = {}, []

    def start(name, cmd):
        logs[name] = open(tmp_path / f"{name}.log", "w")
        procs.append(subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=logs[name], stderr=subprocess.STDOUT,
                                      start_new_session=True))

    overrides = (f"model='tiny' partitioner='flwr-dirichlet' max-train-samples=64 max-eval-samples=16 num-rounds=2 "
                 f"local-steps=1 local-batch-size=4 max-length=16 round-timeout=60.0 output-dir='{out}'")
    try:
        # the apps run in this environment (hf-drencoder on PYTHONPATH): no per-run `uv sync` of the app's dependencies
        start("superlink", [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--disable-runtime-dependency-installation"])
        _wait_for_port(link, procs)
        for i, port in enumerate((node0, node1)):
            start(f"supernode{i}", [_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--host", "127.0.0.1", "--port", str(port),  # no runtime installs: the default
                                    "--node-config", f"partition-id={i} num-partitions=2"])
            _wait_for_port(port, procs)  # a SuperNode that exits fails here, not after the strategy's wait
        run = subprocess.run([_bin("flwr"), "run", str(app), "local-deployment", "--run-config", overrides, "--stream"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=200)
        report_path = out / "privacy_report.json"
        assert report_path.exists(), f"no privacy report; flwr run said:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
        report = json.loads(report_path.read_text())
        history = json.loads((out / "federated_history.json").read_text())
    finally:
        for p in procs:
            _stop_group(p)
        for f in logs.values():
            f.close()
    assert (out / "adapter_model.safetensors").is_file()
    assert report["rounds"] == 2 and report["history"] == [[1.0, 1.0, 2]]
    for name in ("prv", "pld", "rdp"):
        assert report[f"epsilon_{name}"] == pytest.approx(compute_epsilon([(1.0, 1.0, 2)], 1e-3, name), rel=1e-9)
    assert report["epsilon"] == report["epsilon_prv"]
    # evaluated on the server after every round (the ServerApp's evaluate_fn reads max-eval-samples from the run config)
    assert [h["round"] for h in history] == [1, 2] and all(0 <= h["eval_accuracy"] <= 1 for h in history)
    assert "round 2: 2/2 parties answered" in run.stdout + run.stderr
