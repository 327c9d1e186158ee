"""The Flower App in examples/flower-app: its pyproject.toml is one Flower validates, its SuperLink connections parse,
the docs show its real files, and `flwr run` trains it (a tiny BERT, a Dirichlet split of Reuters-R8) and writes its
privacy report, on both of Flower's engines:

- `local-deployment`: a SuperLink and 2 SuperNodes on 127.0.0.1, with party 1's ClientApp process exiting during
  round 2; the run finishes, and epsilon and the adapter equal the in-process FederatedSimulation in which party 1
  fails in round 2 (the one loopback federation of the test suite);
- `local-simulation`: the SuperLink that `flwr run` starts itself in simulation mode, with 2 virtual SuperNodes
  (Ray actors), each on its own partition."""

import importlib.util
import json
import math
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flower_loopback import LoopbackFederation, flower_env, flwr_run, free_ports, stop_processes_with_env  # noqa: E402

from hf_drencoder.federated import FederatedSimulation  # noqa: E402
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
    assert sim.address == ":local:"
    assert sim.options is None  # the simulation's size goes in `flwr run --federation-config` (options. is deprecated)
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



# a tiny run of the app: 2 parties (q = 1), 2 rounds, noise multiplier 1, delta 1e-3 (the app's defaults)
TINY = {"model": "tiny", "partitioner": "flwr-dirichlet", "max-train-samples": 64, "max-eval-samples": 16, "num-rounds": 2,
        "local-steps": 1, "local-batch-size": 4, "max-length": 16}
# what the accountant says for it: one (sigma, q) step per round
TINY_HISTORY = [(1.0, 1.0, 2)]

DYING_CLIENT = """
import os

from hf_drencoder.federated.flower import FlowerParty

from .task import data_fn, model_fn


class DyingParty(FlowerParty):
    # party 1's process exits in the middle of round 2 (its machine went away)
    def train(self, msg, context):
        if int(context.node_config["partition-id"]) == 1 and int(msg.content["config"]["round-index"]) == 1:
            os._exit(3)
        return super().train(msg, context)


app = DyingParty(model_fn, data_fn).client_app()
"""


def _run_config_arg(config: dict) -> str:
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())


def _copy_app(tmp_path) -> Path:
    app = tmp_path / "flower-app"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    return app


def _app_task(monkeypatch):
    monkeypatch.syspath_prepend(str(APP))
    from drencoder_flower import task

    return task


def _check_report(report, rounds=2):
    assert report["engine"] == "flower" and report["rounds"] == rounds
    assert report["history"] == [list(h) for h in TINY_HISTORY]
    for name in ("prv", "pld", "rdp"):
        expected = compute_epsilon(TINY_HISTORY, 1e-3, name)
        assert math.isfinite(expected) and expected > 0
        assert report[f"epsilon_{name}"] == pytest.approx(expected, rel=1e-9), name
    assert report["epsilon"] == report["epsilon_prv"] and report["delta"] == 1e-3


def test_the_app_on_a_superlink_and_two_supernodes_with_a_party_that_dies(tmp_path, monkeypatch):
    """Flower's Deployment Engine on 127.0.0.1 without TLS, the app's own files but for a ClientApp whose party 1
    exits during round 2: the run finishes, round 2 is counted once with party 1 left out, the report's epsilon is the
    accountant's, the history says nothing of who took part, and the adapter equals the in-process
    FederatedSimulation in which party 1 fails in round 2 (each SuperNode seeds its own noise). Every process
    started here is stopped."""
    out = tmp_path / "out"
    app = _copy_app(tmp_path)
    (app / "drencoder_flower" / "dying_client_app.py").write_text(DYING_CLIENT)
    pyproject = (app / "pyproject.toml").read_text()
    assert 'clientapp = "drencoder_flower.client_app:app"' in pyproject
    (app / "pyproject.toml").write_text(pyproject.replace("drencoder_flower.client_app:app",
                                                          "drencoder_flower.dying_client_app:app"))
    # the round waits this long for party 1, which never answers in round 2; round 1 must also fit each SuperNode's
    # cold start of its ClientApp process (imports, model, tokenising), which took over 30 s on 2 loaded cores
    overrides = {**TINY, "round-timeout": 75.0, "output-dir": str(out)}
    # the party's noise seed is its own setting: the server never sends one
    federation = LoopbackFederation(tmp_path, [f"partition-id={i} num-partitions=2 noise-seed=0" for i in range(2)])
    with federation:
        # the app's own connection file, with the SuperLink on a free port
        connections = (APP / "superlink-connections.toml").read_text().replace("127.0.0.1:8000", federation.address)
        (federation.home / "config.toml").write_text(connections)
        run = federation.run(app, "local-deployment", run_config=_run_config_arg(overrides), timeout=300)
        said = f"flwr run said:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
        assert (out / "privacy_report.json").exists(), f"no privacy report; {said}"
        report = json.loads((out / "privacy_report.json").read_text())
        history = json.loads((out / "federated_history.json").read_text())
    assert not federation.left, f"processes still running: {federation.left}"

    _check_report(report)
    log = run.stdout + run.stderr  # the server's per-round lines, streamed by flwr
    assert "round 1: 2/2 parties answered, epsilon" in log and "round 2: 1/2 parties answered, epsilon" in log, said
    # the history written next to the model says nothing of who took part (that is in the server's log above)
    assert [h["round"] for h in history] == [1, 2] and not any("num_received" in h or "failed" in h for h in history)
    assert history[0]["uplink_bytes_per_party"] == history[0]["downlink_bytes_per_party"] > 0
    # evaluated on the server after every round (the ServerApp's evaluate_fn reads max-eval-samples from the run config)
    assert all(0 <= h["eval_accuracy"] <= 1 for h in history)

    # the same run in one process: the app's model and partitions, party 1 failing in round 2
    task = _app_task(monkeypatch)
    config = {**_toml(APP / "pyproject.toml")["tool"]["flwr"]["app"]["config"], **overrides}
    context = SimpleNamespace(run_config=config)
    parts = [task.data_fn(i, 2, context) for i in range(2)]
    from datasets import concatenate_datasets

    args = federated_args_from_config(config, output_dir=str(tmp_path / "sim"), noise_seed=0, disable_tqdm=True,
                                      eval_every=0)
    sim = FederatedSimulation(task.model_fn(context), concatenate_datasets(parts), args,
                              partitions=[list(range(len(parts[0]))), list(range(len(parts[0]), sum(map(len, parts))))])
    step = sim.party_step

    def party_step(pid, r):
        if (pid, r) == (1, 1):
            raise RuntimeError("party went away")
        return step(pid, r)

    sim.party_step = party_step
    sim.run()
    assert report["epsilon"] == pytest.approx(sim.history[-1]["epsilon"], rel=1e-9)
    assert report["epsilon_rdp"] == pytest.approx(sim.history[-1]["epsilon_rdp"], rel=1e-9)
    from peft import PeftModel

    from hf_drencoder.codec import LoraLayout
    from hf_drencoder.lora import trainable_adapter_parameters

    assert (out / "adapter_model.safetensors").is_file()
    served = PeftModel.from_pretrained(task.model_fn(context), str(out), is_trainable=True)  # what the ServerApp saved
    got = LoraLayout.from_model(served).flatten([p.detach() for _, p in trainable_adapter_parameters(served)])
    torch.testing.assert_close(got, sim._global_flat(), rtol=1e-4, atol=1e-5)


def test_the_app_in_flowers_simulation_engine(tmp_path, monkeypatch):
    """`flwr run <app> local-simulation` with the app's own connection: Flower starts a SuperLink in simulation mode,
    which runs the ServerApp and 2 virtual SuperNodes as Ray actors. Both rounds hear from both parties, each party
    trains on its own partition (its node config's partition-id, the rows load_partition gives it), and the report's
    epsilon is the accountant's for 2 rounds at (sigma 1, q 1). Every process it started is stopped."""
    if importlib.util.find_spec("ray") is None:
        pytest.fail("Flower's simulation engine needs Ray: pip install 'hf-drencoder[tests]' (it has flwr[simulation])")
    out = tmp_path / "out"
    app = _copy_app(tmp_path)
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text((APP / "superlink-connections.toml").read_text())
    http_port, control_port = free_ports(2)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    # the managed SuperLink on free ports, running the app in this environment (no per-run `uv sync`); its own Ray
    # instance; every actor's log line as it is (Ray would fold lines that differ only in numbers)
    env = flower_env(home, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(http_port), FLWR_LOCAL_CONTROL_API_PORT=str(control_port),
                     FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", RAY_TMPDIR=ray_tmp, RAY_DEDUP_LOGS="0")
    try:
        run = flwr_run(app, "local-simulation", env, tmp_path, run_config=_run_config_arg({**TINY, "output-dir": str(out)}),
                       federation_config="num-supernodes=2 client-resources-num-cpus=1", timeout=300)
    finally:
        left = stop_processes_with_env("FLWR_HOME", str(home))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes still running: {left}"
    log = run.stdout + run.stderr
    said = f"flwr run said:\n{run.stdout[-3000:]}\n{run.stderr[-2000:]}"
    assert "Starting Flower Simulation" in log and "(2 simulated SuperNodes)" in log, said
    assert (out / "privacy_report.json").exists(), f"no privacy report; {said}"
    report = json.loads((out / "privacy_report.json").read_text())
    history = json.loads((out / "federated_history.json").read_text())
    _check_report(report)
    assert "round 1: 2/2 parties answered" in log and "round 2: 2/2 parties answered" in log, said
    printed = float(re.search(r"round 2: 2/2 parties answered, epsilon ([0-9.e+-]+)", log).group(1))
    assert printed == pytest.approx(report["epsilon"], rel=1e-3)  # the printed epsilon is the report's
    assert [h["round"] for h in history] == [1, 2] and all(0 <= h["eval_accuracy"] <= 1 for h in history)
    assert (out / "adapter_model.safetensors").is_file()
    # each virtual SuperNode trained on its own partition: the rows the app's load_partition gives partition i of 2
    task = _app_task(monkeypatch)
    context = SimpleNamespace(run_config={**_toml(APP / "pyproject.toml")["tool"]["flwr"]["app"]["config"], **TINY})
    expected = {(i, len(task.data_fn(i, 2, context))) for i in range(2)}
    seen = {(int(p), int(n)) for p, n in re.findall(r"party (\d+) of 2: (\d+) training rows", log)}
    assert seen == expected, said
    assert len({n for _, n in expected}) == 2  # the Dirichlet split gives the two parties different sizes
