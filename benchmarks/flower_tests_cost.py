"""Cost of the Flower tests that start real processes (SuperLink, SuperNodes, ClientApps, Ray): wall time and the
CPU time of every process they start, so that runs on a busy machine can still be compared.

Each selection runs in its own pytest process; this script is a child subreaper (Linux), so the processes that
Flower detaches (the managed SuperLink, SuperExec, Ray) are reaped here and their CPU time counts too.

    python benchmarks/flower_tests_cost.py [--repeat 1] [--label after] [NODE_ID ...]

Prints a table and writes benchmarks/results/flower_tests_cost.json (one entry per label)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "flower_tests_cost.json"
DEFAULT = [
    "tests/test_flower_app.py::test_the_app_on_a_superlink_and_two_supernodes_with_a_party_that_dies",
    "tests/test_flower_app.py::test_the_app_in_flowers_simulation_engine",
]
PR_SET_CHILD_SUBREAPER = 36


def _reap_orphans(keep: int, stop: threading.Event):
    """Reap every exited descendant but ``keep`` (pytest, reaped by its Popen) while the test runs: a zombie left in
    a process group would look alive to the tests' checks."""
    while not stop.is_set():
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = None
        if info is not None and info.si_pid != keep:
            try:
                os.waitpid(info.si_pid, 0)
            except ChildProcessError:
                pass
            continue
        time.sleep(0.05)


def _reap_all():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def measure(node_id: str, cwd: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(cwd), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node_id], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    reaper = threading.Thread(target=_reap_orphans, args=(proc.pid, stop), daemon=True)
    reaper.start()
    out, _ = proc.communicate()
    stop.set()
    reaper.join()
    wall = time.perf_counter() - t0
    _reap_all()  # the orphans Flower and Ray left to this subreaper
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    passed = proc.returncode == 0
    if not passed:
        print(out[-3000:], file=sys.stderr)
    return {"test": node_id, "passed": passed, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_average_1min_at_start": round(load, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tests", nargs="*", default=DEFAULT, help="pytest node ids (default: the two Flower process tests)")
    parser.add_argument("--label", default="after", help="the name of this set of runs in the JSON file")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--cwd", default=str(ROOT), help="the checkout whose tests run")
    args = parser.parse_args()
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("warning: not a child subreaper; the CPU time of detached processes is not counted", file=sys.stderr)
    rows = [measure(t, Path(args.cwd)) for _ in range(args.repeat) for t in args.tests]
    print(f"{'test':<95} {'passed':>6} {'wall s':>7} {'CPU s':>7} {'load':>5}")
    for r in rows:
        print(f"{r['test']:<95} {str(r['passed']):>6} {r['wall_s']:>7} {r['cpu_s']:>7} {r['load_average_1min_at_start']:>5}")
    print(f"{'total':<95} {'':>6} {sum(r['wall_s'] for r in rows):>7.1f} {sum(r['cpu_s'] for r in rows):>7.1f}")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results[args.label] = {"cpu_cores": os.cpu_count(), "runs": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
