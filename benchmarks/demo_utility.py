"""The embedded demo at its defaults over several seeds: accuracy, macro-F1, epsilon and wall time on the test split.

    python benchmarks/demo_utility.py [--seeds 0 1 2] [--nonprivate] [--out FILE] [-- extra hf-drencoder demo arguments]

Each run is a whole ``hf-drencoder demo`` job in its own process (loading the model and data, tokenising,
training, evaluating on the 2189 test documents); wall time is of that job. ``--seed`` sets the head's
initialisation and the Poisson batches; the noise is drawn from OS entropy, as in the demo. ``--nonprivate`` adds a
run through the same code without DP (``--disable_dp``) with the settings that suit it (64 tokens, every layer, 90
steps of 64, linear decay from lr 1e-2: the figures recorded as the demo's non-private reference). Prints a table
and writes benchmarks/results/demo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

NONPRIVATE = ["--disable_dp", "true", "--lora_freeze_a", "false", "--max_length", "64", "--default_lora_target_modules", "query", "value",
              "--per_device_train_batch_size", "64", "--max_physical_batch_size", "64", "--max_steps", "90",
              "--learning_rate", "1e-2", "--lr_scheduler_type", "linear",
              "--per_sample_max_grad_norm", "1.0"]


def run(extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "hf_drencoder.cli", "demo", "--output_dir", out, "--disable_tqdm", "true", *extra]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "demo_result.json")) as f:
            result = json.load(f)
    result["wall_s"] = wall
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--nonprivate", action="store_true", help="also run the non-private reference (not re-run by default)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "demo.json"),
                   help="results file (default benchmarks/results/demo.json)")
    p.add_argument("extra", nargs="*", help="extra hf-drencoder demo arguments (after --)")
    a = p.parse_args()
    from hf_drencoder.demo import DEMO_DEFAULTS, DEMO_MAX_LENGTH, NONPRIVATE_REFERENCE

    rows = []
    for seed in a.seeds:
        r = run(["--seed", str(seed), *a.extra])
        r.update(setting="DP (demo defaults, target_epsilon 8)", seed=seed)
        rows.append(r)
        print(f"seed {seed}: accuracy {r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} epsilon {r['epsilon']:.3f} "
              f"wall {r['wall_s']:.1f} s", flush=True)
    if a.nonprivate:
        r = run(NONPRIVATE + a.extra)
        r.update(setting="non-private (disable_dp, 64 tokens, 90 x 64, lr 1e-2)", seed=0)
        rows.append(r)
    print(f"\n{'setting':<40} {'seed':>4} {'steps':>5} {'accuracy':>8} {'macro-F1':>8} {'epsilon':>8} {'wall s':>7}")
    for r in rows:
        eps = r["epsilon"] if r["epsilon"] is not None else float("inf")
        print(f"{r['setting']:<40} {r['seed']:>4} {r['steps']:>5} {r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} "
              f"{eps:>8.3f} {r['wall_s']:>7.1f}")
    dp = [r for r in rows if r["setting"].startswith("DP")]
    summary = {key: {"mean": statistics.mean(r[key] for r in dp), "min": min(r[key] for r in dp),
                     "max": max(r[key] for r in dp)} for key in ("accuracy", "macro_f1", "epsilon", "wall_s")}
    print(f"DP over {len(dp)} seeds: accuracy {summary['accuracy']['mean']:.4f} "
          f"({summary['accuracy']['min']:.4f}-{summary['accuracy']['max']:.4f}), macro-F1 "
          f"{summary['macro_f1']['mean']:.4f} ({summary['macro_f1']['min']:.4f}-{summary['macro_f1']['max']:.4f}), "
          f"wall {summary['wall_s']['min']:.0f}-{summary['wall_s']['max']:.0f} s; non-private reference "
          f"{NONPRIVATE_REFERENCE['accuracy']:.4f} / {NONPRIVATE_REFERENCE['macro_f1']:.4f}")
    path = a.out
    with open(path, "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                   "demo_defaults": {**DEMO_DEFAULTS, "max_length": DEMO_MAX_LENGTH}, "extra_args": a.extra,
                   "nonprivate_reference": NONPRIVATE_REFERENCE, "summary_dp": summary, "rows": rows,
                   "load_average_after": os.getloadavg()}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
