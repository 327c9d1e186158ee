"""Flower processes for the tests, on 127.0.0.1: a SuperLink with SuperNodes (the Deployment Engine), `flwr run`, and
the stopping of every process a test started (also the SuperLink that `flwr run` starts itself for a `:local:`
connection, and the Ray processes of its simulation)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_port(port, procs, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a Flower process exited while starting")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(pgid, grace=15.0, reap=None):
    """SIGTERM to the process group ``pgid`` (a SuperLink or SuperNode and the SuperExec and apps it started),
    SIGKILL to whatever is left after ``grace`` seconds; returns when the group is empty."""
    reap = reap or (lambda: None)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _group_alive(pgid) and time.monotonic() < deadline:
        reap()
        time.sleep(0.2)
    if _group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
        while _group_alive(pgid) and time.monotonic() < deadline + 5:
            reap()
            time.sleep(0.1)


def bin_path(name):
    return str(Path(sys.executable).parent / name)


def flower_env(home: Path, **extra) -> dict:
    """The environment of every Flower process of a test: its own FLWR_HOME (connections, apps, the managed
    SuperLink's state), this checkout's hf_drencoder, no Hub, one thread per process."""
    return dict(os.environ, FLWR_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=f"{ROOT}{os.pathsep}{TESTS}",
                PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
                FLWR_DISABLE_UPDATE_CHECK="1", **extra)


def flwr_run(app, connection, env, cwd, run_config="", federation_config="", timeout=200):
    cmd = [bin_path("flwr"), "run", str(app), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", run_config]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def processes_with_env(name: str, value: str) -> list[int]:
    """This user's processes whose environment has ``name=value`` (a test's own FLWR_HOME names only its processes:
    every Flower and Ray process it starts inherits it)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def stop_processes_with_env(name: str, value: str, grace=15.0) -> list[int]:
    """Stop every process found by `processes_with_env` (the process groups they lead first); returns the ids of
    those still there after 10 s more (none, normally)."""
    for pid in processes_with_env(name, value):
        try:
            if os.getpgid(pid) == pid:
                stop_group(pid, grace)
        except ProcessLookupError:
            continue
    for pid in processes_with_env(name, value):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while (left := processes_with_env(name, value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


class LoopbackFederation:
    """A SuperLink and one SuperNode per node config on 127.0.0.1 without TLS, each in its own session (they start
    their own children: SuperExec, ServerApp, ClientApps). The SuperLink runs the apps in this environment
    (``--disable-runtime-dependency-installation``: no per-run ``uv sync``). Use as a context manager: on exit every
    process group is stopped, then any process left with this FLWR_HOME; ``left`` lists what still runs after that."""

    def __init__(self, tmp_path: Path, node_configs: list[str]):
        self.tmp_path = tmp_path
        self.node_configs = node_configs
        self.home = tmp_path / "flwr_home"
        self.home.mkdir(exist_ok=True)
        self.env = flower_env(self.home)
        self.link, *self.node_ports = free_ports(1 + len(node_configs))
        self.procs: list[subprocess.Popen] = []
        self.logs = {}
        self.left: list[int] = []

    @property
    def address(self):
        return f"127.0.0.1:{self.link}"

    def _start(self, name, cmd):
        self.logs[name] = open(self.tmp_path / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, cwd=self.tmp_path, stdout=self.logs[name],
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def __enter__(self):
        try:
            self._start("superlink", [bin_path("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                                      str(self.link), "--disable-runtime-dependency-installation"])
            wait_for_port(self.link, self.procs)
            for i, (port, node_config) in enumerate(zip(self.node_ports, self.node_configs)):
                self._start(f"supernode{i}", [bin_path("flower-supernode"), "--insecure", "--superlink", self.address,
                                              "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config])
            for port in self.node_ports:
                wait_for_port(port, self.procs)  # a SuperNode that exits fails here, not after the strategy's wait
        except BaseException:
            self.__exit__()
            raise
        return self

    def run(self, app, connection="test", **kw):
        return flwr_run(app, connection, self.env, self.tmp_path, **kw)

    def __exit__(self, *exc):
        for p in self.procs:
            stop_group(p.pid, reap=p.poll)
            p.wait(timeout=5)
        for f in self.logs.values():
            f.close()
        self.left = [p.pid for p in self.procs if _group_alive(p.pid)]
        self.left += stop_processes_with_env("FLWR_HOME", str(self.home))
        return False
