"""Batched local training of many small parties (``parallel_parties``) against one party at a time.

    python benchmarks/federated_batched.py [--parties 40] [--groups 20 40]

The population of ``federated_defaults.py --plan population``: 1,000 parties of 5-6 rows of Reuters-R8 (equal sizes,
Dirichlet(0.5) label mixes), the CLI's model (32 tokens, LoRA r 2 on query and value of the top two layers), 5 local
AdamW steps. Times the local updates of the first ``--parties`` parties one at a time (`FederatedSimulation`'s
path) and in passes of G parties (`batched_local_updates`), in one process, one after the other, and checks that
both give the same updates with dropout off (max relative difference). Prints a table and writes
``benchmarks/results/federated_batched.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parties", type=int, default=40)
    p.add_argument("--groups", type=int, nargs="+", default=[20, 40])
    p.add_argument("--out", default=os.path.join(HERE, "results", "federated_batched.json"))
    a = p.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification

    import federated_defaults as fd
    from hf_drencoder.embedded import minilm_path
    from hf_drencoder.federated import FederatedArguments, FederatedSimulation
    from hf_drencoder.federated.batched import batched_local_updates
    from hf_drencoder.federated.server import derive_seed

    data = fd.load_data(32)
    train, _ = data["tune"]
    args = FederatedArguments(output_dir="/tmp/federated-batched", num_parties=1000, parties_per_round=100,
                              partition="dirichlet_equal_size", num_rounds=1, local_steps=5, local_batch_size=16,
                              local_learning_rate=5e-3, disable_dp=True, disable_tqdm=True, lora_r=2, lora_alpha=4,
                              lora_target_modules=fd.lora_modules(2))
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data["num_labels"],
                                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    sim = FederatedSimulation(model, train, args)
    sim._setup()
    ids = list(range(a.parties))
    t = time.perf_counter()
    one = [sim._local_update(i, 0) for i in ids]
    sequential_s = time.perf_counter() - t
    rows = []
    for g in a.groups:
        t = time.perf_counter()
        out = []
        for s in range(0, len(ids), g):
            chunk = ids[s : s + g]
            out += batched_local_updates(sim.model, sim.params, sim.layout, [sim.parties[i] for i in chunk],
                                         [derive_seed(0, 0, i) for i in chunk], steps=5, batch_size=16,
                                         learning_rate=5e-3, optimizer="adamw", task=sim.task,
                                         data_collator=sim.data_collator)
        batched_s = time.perf_counter() - t
        diff = max(float((x - y).norm() / x.norm()) for x, y in zip(one, out))
        rows.append(dict(parties=len(ids), group=g, sequential_s=round(sequential_s, 2), batched_s=round(batched_s, 2),
                         speedup=round(sequential_s / batched_s, 2), max_relative_difference=diff))
    print(f"{'parties':>7} {'G':>4} {'one at a time s':>15} {'batched s':>9} {'speed-up':>8} {'max rel diff':>12}")
    for r in rows:
        print(f"{r['parties']:>7} {r['group']:>4} {r['sequential_s']:>15.1f} {r['batched_s']:>9.1f} {r['speedup']:>7.2f}x "
              f"{r['max_relative_difference']:>12.2e}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                   "load_average": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
