"""The one-run audit on the federated path (canary parties), the settings of tests/test_audit_federated.py.

    python benchmarks/audit_federated.py

Tiny BERT, 8 parties, about 2 per round (Poisson q = 1/4), 3 rounds, delta 1e-5, 95% confidence. Prints a
table and writes benchmarks/results/audit_federated.json. "NOISE OFF" rows switch the parties' noise off
while the ledger still counts every round: the audit must FAIL there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from unittest import mock

import torch

from hf_drencoder.audit import run_federated_audit
from hf_drencoder.audit.command import _model_and_data
from hf_drencoder.audit.result import finite_or_str
from hf_drencoder.federated import FederatedArguments, FederatedSimulation
from hf_drencoder.federated import party as party_module

DELTA, ROUNDS = 1e-5, 3
SIGMA = math.sqrt(ROUNDS) / 0.5  # every-round canaries: mu = 0.5, epsilon about 2 at delta 1e-5
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "audit_federated.json")


def simulation(tmp: str, **kw) -> FederatedSimulation:
    make_model, data = _model_and_data("tiny-bert", 32, 0)
    base = dict(output_dir=os.path.join(tmp, "fed"), num_parties=8, parties_per_round=2, num_rounds=ROUNDS, local_steps=1,
                local_batch_size=4, local_learning_rate=0.1, local_optimizer="sgd", noise_multiplier=SIGMA, target_delta=DELTA, noise_seed=0,
                disable_tqdm=True, eval_every=0, lora_target_modules=["query", "value"])
    base.update(kw)
    return FederatedSimulation(make_model(), data, FederatedArguments(**base))


def run(name: str, tmp: str, noise_off: bool = False, sim_kw=None, **audit) -> dict:
    start = time.perf_counter()
    zeros = (lambda t, std, g: torch.zeros_like(t, dtype=torch.float32)) if noise_off else party_module.gaussian_noise_like
    with mock.patch.object(party_module, "gaussian_noise_like", zeros):
        res = run_federated_audit(simulation(tmp, **(sim_kw or {})), check=False, **audit)
    row = {k: v for k, v in res.to_dict().items() if k not in ("report", "message")}
    row.update(setting=name, noise_disabled=noise_off, wall_s=round(time.perf_counter() - start, 1))
    print(f"{name:<36} m={row['num_canaries']:<5} lb={row['epsilon_lower_bound']:.3f}  "
          f"acc={row['epsilon_accountant']:.3f}  {row['correct']}/{row['guesses']}  "
          f"{'PASS' if row['passed'] else 'FAIL'}  {row['wall_s']}s", flush=True)
    return row


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run("DP off", tmp, sim_kw=dict(disable_dp=True, noise_multiplier=None), num_canaries=256))
        rows.append(run("every round, sigma 3.46", tmp, num_canaries=256))
        rows.append(run("every round, NOISE OFF", tmp, noise_off=True, num_canaries=256))
        rows.append(run("poisson, sigma 3.46", tmp, num_canaries=256, canary_sampling="poisson"))
        rows.append(run("poisson, NOISE OFF", tmp, noise_off=True, num_canaries=256, canary_sampling="poisson"))
        rows.append(run("every round, sigma 3.46", tmp, num_canaries=1000))
        rows.append(run("every round, NOISE OFF", tmp, noise_off=True, num_canaries=1000))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(finite_or_str({"delta": DELTA, "rounds": ROUNDS, "sigma": SIGMA, "rows": rows}), f, indent=2, allow_nan=False)
        f.write("\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
