"""Slower, tighter one-run audits than the tests: more canaries and steps, a sweep over epsilon.

    python benchmarks/audit.py [--quick] [--minilm]

Writes benchmarks/results/audit.json and prints a table. Settings (all at delta 1e-5, confidence 0.95):

- white box, every-step gradient canaries (q = 1 for a canary), tiny BERT: noise calibrated so that the
  accountant gives epsilon 1, 2, 4, 8 at q = 1 for the run's steps; DP off; noise disabled inside the mechanism
  (monkeypatched) at epsilon 2, which the audit must flag.
- white box, Poisson gradient canaries (the data's rate q): compared with the run's reported epsilon.
- black box, input canaries (random token sequences) in a tiny Llama: DP off and DP on.
- with --minilm: every-step gradient canaries in the embedded MiniLM-L6 + LoRA on Reuters-R8 (a real model).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_drencoder import DRTrainer, DRTrainingArguments  # noqa: E402
from hf_drencoder.audit import _finite_or_str, _model_and_data, run_audit  # noqa: E402
from hf_drencoder.privacy import calibrate_noise_multiplier  # noqa: E402
from hf_drencoder.privacy.mechanism import GaussianGradientMechanism  # noqa: E402

DELTA = 1e-5
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "audit.json")


def builder(model_name, n, out_dir, steps, batch, lr, **privacy):
    make_model, data = _model_and_data(model_name, n, seed=0)

    def build(train):
        args = DRTrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr,
            report_to="none", save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, noise_seed=0,
            target_delta=DELTA, **privacy,
        )
        return DRTrainer(model=make_model(), args=args, train_dataset=train)

    return build, data


def run(name, build, data, noiseless=False, **audit):
    original = GaussianGradientMechanism.noise_std
    if noiseless:
        GaussianGradientMechanism.noise_std = property(lambda self: 0.0)
    start = time.perf_counter()
    try:
        res = run_audit(build, data, check=False, **audit)
    finally:
        GaussianGradientMechanism.noise_std = original
    row = {k: v for k, v in res.to_dict().items() if k not in ("report", "message")}
    row.update(setting=name, wall_s=round(time.perf_counter() - start, 1), noise_disabled=noiseless)
    print(f"{name:<44} m={row['num_canaries']:<5} lb={row['epsilon_lower_bound']:.3f}  "
          f"acc={row['epsilon_accountant']:.3f}  {row['correct']}/{row['guesses']}  "
          f"{'PASS' if row['passed'] else 'FAIL'}  {row['wall_s']}s", flush=True)
    return row


def main() -> None:
    quick = "--quick" in sys.argv
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    m = 256 if quick else 1000
    steps = 8 if quick else 20
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n, batch = 256, 16
        for eps in (1.0, 2.0, 4.0, 8.0):
            sigma = calibrate_noise_multiplier(eps, DELTA, 1.0, steps, "prv")
            b, d = builder("tiny-bert", n, tmp, steps, batch, 1e-2, noise_multiplier=sigma)
            rows.append(run(f"tiny-bert gradient every_step eps(q=1)={eps:g}", b, d, num_canaries=m))
        b, d = builder("tiny-bert", n, tmp, steps, batch, 1e-2, disable_dp=True)
        rows.append(run("tiny-bert gradient every_step DP off", b, d, num_canaries=m))
        sigma2 = calibrate_noise_multiplier(2.0, DELTA, 1.0, steps, "prv")
        b, d = builder("tiny-bert", n, tmp, steps, batch, 1e-2, noise_multiplier=sigma2)
        rows.append(run("tiny-bert gradient every_step NOISE DISABLED", b, d, noiseless=True, num_canaries=m))
        b, d = builder("tiny-bert", n, tmp, steps, batch, 1e-2, noise_multiplier=1.0)
        rows.append(run("tiny-bert gradient poisson sigma=1", b, d, num_canaries=m, canary_sampling="poisson"))
        b, d = builder("tiny-bert", n, tmp, steps, batch, 1e-2, noise_multiplier=1.0)
        rows.append(run("tiny-bert gradient poisson sigma=1 NOISE DISABLED", b, d, noiseless=True, num_canaries=m,
                        canary_sampling="poisson"))
        lm_steps = 30 if quick else 100
        b, d = builder("tiny-llama", 64, tmp, lm_steps, 16, 3e-2, disable_dp=True)
        rows.append(run("tiny-llama input DP off", b, d, canary_type="input", num_canaries=m // 4))
        b, d = builder("tiny-llama", 64, tmp, lm_steps, 16, 3e-2, noise_multiplier=1.0)
        rows.append(run("tiny-llama input sigma=1", b, d, canary_type="input", num_canaries=m // 4))
        if "--minilm" in sys.argv:
            sigma = calibrate_noise_multiplier(4.0, DELTA, 1.0, 20, "prv")
            b, d = builder("minilm-r8", 0, tmp, 20, 64, 2e-2, noise_multiplier=sigma)
            rows.append(run("minilm-r8 gradient every_step eps(q=1)=4", b, d, num_canaries=1000))
    result = {
        "delta": DELTA, "confidence": 0.95, "canaries": m, "steps": steps, "quick": quick,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
    }
    if not quick:
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        with open(OUT, "w") as f:
            json.dump(_finite_or_str(result), f, indent=2, allow_nan=False)
            f.write("\n")
        print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
