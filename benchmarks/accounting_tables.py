"""The accounting figures quoted in docs/federated.md and docs/privacy.md, recomputed.

    python benchmarks/accounting_tables.py

1. Client-level epsilon of fixed-size party sampling (exactly k of N parties per round, without replacement),
   three ways: the bound used before dp-accounting's analysis was adopted (each round as a Gaussian mechanism
   at sigma/2 and q = 1, i.e. no amplification, replace-one sensitivity 2C), under PRV and RDP; the bound in use
   (dp-accounting's RDP analysis of sampling without replacement under replace-one adjacency); and, for scale
   only, Poisson sampling at q = k/N under add/remove adjacency (PRV).
2. PRV's memory guard: a history whose PRV grid would not fit in memory falls back to RDP (also an upper
   bound, looser); the grid size PRV would need and the time the fallback takes.

Prints a table and writes benchmarks/results/accounting_tables.json. Pure computation: about a minute on
one core.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_drencoder.federated.accounting import client_level_ledger  # noqa: E402
from hf_drencoder.federated.arguments import FederatedArguments  # noqa: E402
from hf_drencoder.privacy import accounting  # noqa: E402
from hf_drencoder.privacy.accounting import compute_epsilon  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# (N parties, k per round, sigma, rounds, delta)
FIXED_SIZE_CASES = [
    (100, 10, 1.0, 30, 1e-2),
    (100, 10, 2.0, 30, 1e-2),
    (1000, 10, 1.0, 100, 1e-5),
    (1000, 100, 2.0, 100, 1e-5),
    (10000, 100, 1.0, 1000, 1e-5),
]

# (sigma, q, steps, delta): histories whose PRV grid is too large for memory
PRV_FALLBACK_CASES = [(0.5, 1.0, 10_000, 1e-5), (0.3, 0.1, 1000, 1e-5)]


def fixed_size_epsilon(n: int, k: int, sigma: float, rounds: int, delta: float) -> float:
    """epsilon as a federated run reports it: the library's own client-level ledger for fixed-size sampling."""
    args = FederatedArguments(num_parties=n, parties_per_round=k, party_sampling="fixed", accountant="rdp",
                              noise_multiplier=sigma, target_epsilon=None, target_delta=delta)
    ledger = client_level_ledger(args)
    for _ in range(rounds):
        ledger.record_step()
    return ledger.metrics()["epsilon"]


def fixed_size_rows() -> list[dict]:
    rows = []
    for n, k, sigma, rounds, delta in FIXED_SIZE_CASES:
        before = [(sigma / 2, 1.0, rounds)]
        row = dict(num_parties=n, parties_per_round=k, noise_multiplier=sigma, rounds=rounds, delta=delta,
                   before_prv=compute_epsilon(before, delta, "prv"), before_rdp=compute_epsilon(before, delta, "rdp"),
                   now_rdp=fixed_size_epsilon(n, k, sigma, rounds, delta),
                   poisson_prv=compute_epsilon([(sigma, k / n, rounds)], delta, "prv"))
        row["gain"] = min(row["before_prv"], row["before_rdp"]) / row["now_rdp"]
        rows.append(row)
    return rows


def prv_fallback_rows() -> list[dict]:
    rows = []
    for sigma, q, steps, delta in PRV_FALLBACK_CASES:
        history = [(sigma, q, steps)]
        start = time.perf_counter()
        eps = compute_epsilon(history, delta, "prv")
        seconds = time.perf_counter() - start
        rows.append(dict(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta,
                         prv_grid_points=accounting._prv_grid_points(history, delta),
                         max_grid_points=accounting._PRV_MAX_GRID_POINTS, epsilon=eps,
                         epsilon_rdp=compute_epsilon(history, delta, "rdp"), seconds=round(seconds, 2)))
    return rows


def main() -> dict:
    result = dict(fixed_size=fixed_size_rows(), prv_fallback=prv_fallback_rows())
    print("Fixed-size party sampling, client-level epsilon (replace-one; Poisson add/remove for scale)")
    print(f"{'N':>6} {'k':>4} {'sigma':>5} {'rounds':>6} {'delta':>6} | {'before PRV':>10} {'before RDP':>10} | "
          f"{'now RDP':>8} {'gain':>6} | {'Poisson':>7}")
    for r in result["fixed_size"]:
        print(f"{r['num_parties']:>6} {r['parties_per_round']:>4} {r['noise_multiplier']:>5} {r['rounds']:>6} "
              f"{r['delta']:>6g} | {r['before_prv']:>10.3g} {r['before_rdp']:>10.3g} | {r['now_rdp']:>8.3g} "
              f"{r['gain']:>5.1f}x | {r['poisson_prv']:>7.3g}")
    print("\nPRV memory guard (grid points PRV would need; above the limit RDP is reported)")
    for r in result["prv_fallback"]:
        print(f"sigma {r['noise_multiplier']}, q {r['sample_rate']}, {r['steps']} steps: "
              f"{r['prv_grid_points']:.3g} points (limit {r['max_grid_points']:.3g}) -> epsilon {r['epsilon']:.5g} "
              f"(RDP {r['epsilon_rdp']:.5g}) in {r['seconds']} s")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "accounting_tables.json"), "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    return result


if __name__ == "__main__":
    main()
