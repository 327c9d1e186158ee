"""The audit's power, measured: white box over 10 seeds at reported epsilon 4, and black box on the embedded task.

    python benchmarks/audit.py [--quick] [--part white|black|all] [--runs ok|bad|eps] [--seeds 0-3]

Writes benchmarks/results/audit.json (rows appended as they finish), prints a table and draws docs/audit.png
(lower bound against the accountant's epsilon). All at delta 1e-5, confidence 0.95, one thread.

White box (``--part white``): tiny BERT (hidden 128, 4 layers) with LoRA r=26 on query/value, 53,635 noised
coordinates; 50,000 Dirac gradient canaries on distinct coordinates, each included with probability 1/2, in
every step (q = 1); the auditor sees the release and sums each canary's coordinate over the steps. The noise is
calibrated so that the accountant gives a canary epsilon 4 for the run (1 step: the score of a canary is then
one Gaussian observation, and its privacy loss is exactly what the accountant reports). Seeds 0..9 with the
correct noise, and seeds 0..9 with the noise secretly reduced (the mechanism draws the noise of epsilon 8; the
ledger still records epsilon 4's). Then one seed at epsilon 1, 2 and 8, and the ceiling: the bound of an ideal
audit of a Gaussian mechanism with the same m (pure computation, estimator.expected_gaussian_bound), for both
bounds: the Gaussian-DP one the verdict uses and the (epsilon, delta) one. ``--runs`` and ``--seeds`` run a subset
(about 45 s a run) and merge it into the results file, so the sweep can be run a few minutes at a time.

Black box (``--part black``): the embedded MiniLM-L6 cut to its first 2 layers, 32 tokens, 200 Reuters-R8
training rows, expected batch 32, 40 steps, lr 1e-2, LoRA r=8 on query/value + the head; 200 input canaries (rare tokens, flipped labels), each added
with probability 1/2; score = minus the final model's loss. Target epsilon 1, 4, 8 and without DP.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from hf_drencoder import DRTrainer, DRTrainingArguments  # noqa: E402
from hf_drencoder.audit import run_audit  # noqa: E402
from hf_drencoder.audit.estimator import expected_gaussian_bound  # noqa: E402
from hf_drencoder._jsonio import dump  # noqa: E402
from hf_drencoder.privacy import calibrate_noise_multiplier  # noqa: E402
from hf_drencoder.privacy.accounting import gdp_mu  # noqa: E402
from hf_drencoder.privacy.mechanism import GaussianGradientMechanism  # noqa: E402

DELTA = 1e-5
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "audit.json")
PLOT = os.path.join(os.path.dirname(HERE), "docs", "audit.png")


def _args(out_dir, steps, batch, lr, **kw):
    return DRTrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, learning_rate=lr, report_to="none",
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, target_delta=DELTA, **kw)


def white_box_data(n=256, seq=16, seed=0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels})


def white_box_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=128, num_hidden_layers=4, num_attention_heads=2, intermediate_size=256,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64))


def white_box(tmp, epsilon, seed, m, steps, real_epsilon=None):
    """One white-box audit: noise for ``epsilon`` in the ledger; the mechanism draws ``real_epsilon``'s noise."""
    sigma = calibrate_noise_multiplier(epsilon, DELTA, 1.0, steps, "prv")
    factor = 1.0 if real_epsilon is None else calibrate_noise_multiplier(real_epsilon, DELTA, 1.0, steps, "prv") / sigma

    def build(train):
        args = _args(tmp, steps, 16, 1e-2, noise_multiplier=sigma, noise_seed=1000 + seed, default_lora_r=26,
                     default_lora_target_modules=["query", "value"])
        return DRTrainer(model=white_box_model(), args=args, train_dataset=train)

    original = GaussianGradientMechanism.noise_std
    GaussianGradientMechanism.noise_std = property(lambda self: original.fget(self) * factor)
    start = time.perf_counter()
    try:
        res = run_audit(build, white_box_data(), num_canaries=m, direction="dirac", seed=seed, check=False)
    finally:
        GaussianGradientMechanism.noise_std = original
    row = {k: v for k, v in res.to_dict().items() if k not in ("report",)}
    row.update(part="white", seed=seed, epsilon_target=epsilon, epsilon_real=real_epsilon or epsilon,
               mu_accounted=gdp_mu([(sigma, 1.0, steps)]), wall_s=round(time.perf_counter() - start, 1),
               bound_exceeds_accountant=res.mu_lower_bound > res.mu_accountant)
    return row


def minilm_task(n_train, layers=2, max_length=32):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_drencoder.embedded import load_reuters, minilm_path, tokenize_dataset

    data = load_reuters("r8")
    num_labels = data["train"].features["label"].num_classes
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    train = tokenize_dataset(data, tok, max_length=max_length)["train"].shuffle(seed=0).select(range(n_train))

    def make_model():
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        model.bert.encoder.layer = model.bert.encoder.layer[:layers]
        model.config.num_hidden_layers = layers
        return model

    return make_model, train, tok.vocab_size


def black_box(tmp, task, epsilon, m, steps, batch=64):
    from hf_drencoder.audit import make_input_canaries

    make_model, train, vocab = task
    privacy = dict(disable_dp=True) if epsilon is None else dict(target_epsilon=epsilon)

    def build(data):
        args = _args(tmp, steps, batch, 1e-2, default_lora_target_modules=["query", "value"], noise_seed=0, **privacy)
        return DRTrainer(model=make_model(), args=args, train_dataset=data)

    start = time.perf_counter()
    canaries = make_input_canaries(train, m, seed=0, vocab_size=vocab)
    res = run_audit(build, train, canary_type="input", canary_dataset=canaries, check=False)
    row = {k: v for k, v in res.to_dict().items() if k not in ("report",)}
    row.update(part="black", seed=0, epsilon_target=epsilon if epsilon is not None else "none",
               wall_s=round(time.perf_counter() - start, 1))
    return row


def ceiling(m, epsilons):
    from scipy.optimize import brentq

    from hf_drencoder.privacy.accounting import gdp_epsilon

    rows = []
    for eps in epsilons:
        mu = brentq(lambda x: gdp_epsilon(x, DELTA) - eps, 1e-3, 50)
        bounds = [expected_gaussian_bound(m, mu, DELTA, seed=s, method="gdp") for s in range(10)]
        old = [expected_gaussian_bound(m, mu, DELTA, seed=s) for s in range(10)]
        rows.append({"part": "ceiling", "epsilon_accountant": eps, "num_canaries": m,
                     "median_bound": statistics.median(bounds), "max_bound": max(bounds), "min_bound": min(bounds),
                     "median_bound_eps_delta": statistics.median(old), "max_bound_eps_delta": max(old)})
    return rows


def _stats(rows, key):
    b = [r[key] for r in rows]
    return dict(median=statistics.median(b), max=max(b), min=min(b))


def summarise(rows) -> dict:
    ok = [r for r in rows if r["part"] == "white" and r["epsilon_target"] == 4 and r["epsilon_real"] == 4]
    bad = [r for r in rows if r["part"] == "white" and r["epsilon_target"] == 4 and r["epsilon_real"] == 8]
    out = {}
    if ok:
        out["correct_noise"] = dict(
            seeds=len(ok), bound="gdp", **_stats(ok, "epsilon_lower_bound"),
            exceeded=sum(r["bound_exceeds_accountant"] for r in ok), failed=sum(not r["passed"] for r in ok),
            eps_delta_bound=_stats(ok, "epsilon_lower_bound_eps_delta"))
    if bad:
        out["noise_reduced_to_epsilon_8"] = dict(
            seeds=len(bad), bound="gdp", **_stats(bad, "epsilon_lower_bound"),
            bound_exceeds_4=sum(r["bound_exceeds_accountant"] for r in bad), failed=sum(not r["passed"] for r in bad),
            failed_by_the_bound=sum(r["mu_lower_bound"] > r["mu_accountant"] for r in bad),
            noise_ratio=statistics.median(r["noise_ratio"] for r in bad),
            eps_delta_bound=dict(**_stats(bad, "epsilon_lower_bound_eps_delta"),
                                 exceeds_4=sum(r["epsilon_lower_bound_eps_delta"] > r["epsilon_accountant"]
                                               for r in bad)))
    return out


def table(rows) -> str:
    lines = [f"{'setting':<40} {'eps acc.':>8} {'bound':>7} {'(e,d)':>7} {'verdict':>7} {'canaries':>9}  observed"]
    for r in rows:
        if r["part"] == "ceiling":
            lines.append(f"{'ideal Gaussian audit, median of 10':<40} {r['epsilon_accountant']:>8.3f} "
                         f"{r['median_bound']:>7.3f} {r['median_bound_eps_delta']:>7.3f} {'':>7} "
                         f"{r['num_canaries']:>9}  (computed)")
            continue
        if r["part"] == "white":
            name = f"white box eps {r['epsilon_target']:g} seed {r['seed']}"
            if r["epsilon_real"] != r["epsilon_target"]:
                name += f" (real eps {r['epsilon_real']:g})"
            seen = (f"{r['correct']}/{r['guesses']} guesses right, noise {r['noise_ratio']:.3f}x accounted")
        else:
            name = f"black box MiniLM-2L/R8 eps {r['epsilon_target']}"
            seen = f"{r['correct']}/{r['guesses']} guesses right (final-model loss)"
        acc = r["epsilon_accountant"]
        acc = f"{acc:>8.3f}" if isinstance(acc, float) and acc != float("inf") else f"{'inf':>8}"
        ed = r.get("epsilon_lower_bound_eps_delta", r["epsilon_lower_bound"])
        lines.append(f"{name:<40} {acc} {r['epsilon_lower_bound']:>7.3f} {ed:>7.3f} "
                     f"{'PASS' if r['passed'] else 'FAIL':>7} {r['num_canaries']:>9}  {seen}")
    return "\n".join(lines)


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    ax.plot([0, 9], [0, 9], color="grey", lw=1, ls="--", label="bound = accountant's epsilon")
    ceil = [r for r in rows if r["part"] == "ceiling"]
    if ceil:
        ax.plot([r["epsilon_accountant"] for r in ceil], [r["median_bound"] for r in ceil], color="tab:blue", lw=1,
                label=f"ideal audit of a Gaussian, m={ceil[0]['num_canaries']:,} (Gaussian-DP bound)")
        ax.plot([r["epsilon_accountant"] for r in ceil], [r["median_bound_eps_delta"] for r in ceil],
                color="tab:grey", lw=1, ls=":", label="the same, (epsilon, delta) bound")
    white = [r for r in rows if r["part"] == "white" and r["epsilon_real"] == r["epsilon_target"]]
    ax.scatter([r["epsilon_accountant"] for r in white], [r["epsilon_lower_bound"] for r in white], color="tab:blue",
               marker="o", s=18, label="white box, correct noise")
    bad = [r for r in rows if r["part"] == "white" and r["epsilon_real"] != r["epsilon_target"]]
    ax.scatter([r["epsilon_accountant"] for r in bad], [r["epsilon_lower_bound"] for r in bad], color="tab:red",
               marker="x", s=24, label="white box, noise secretly of eps 8")
    ax.scatter([r["epsilon_accountant"] for r in bad], [r["epsilon_lower_bound_eps_delta"] for r in bad],
               color="tab:red", marker="x", s=14, alpha=0.35, label="the same, (epsilon, delta) bound")
    black = [r for r in rows if r["part"] == "black" and r["epsilon_target"] != "none"]
    ax.scatter([r["epsilon_accountant"] for r in black], [r["epsilon_lower_bound"] for r in black],
               color="tab:green", marker="s", s=24, label="black box (MiniLM-2L, R8)")
    ax.set_xlabel("accountant's epsilon for the canaries (delta 1e-5)")
    ax.set_ylabel("audit lower bound (95% confidence)")
    ax.set_xlim(0, 9)
    ax.set_ylim(0, 9)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.set_title("One-run audit: lower bound against the reported epsilon")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _key(r):
    if r["part"] == "ceiling":
        return ("ceiling", r["epsilon_accountant"])
    return (r["part"], str(r["epsilon_target"]), str(r.get("epsilon_real")), r.get("seed"))


def _order(r):
    part = {"ceiling": 0, "white": 1, "black": 2}[r["part"]]
    if r["part"] == "white":
        group = 0 if r["epsilon_target"] == 4 and r["epsilon_real"] == 4 else 1 if r["epsilon_target"] == 4 else 2
        return (part, group, r["seed"], r["epsilon_target"])
    return (part, 0, 0, r["epsilon_accountant"] if r["part"] == "ceiling" else 0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="m=20000, 2 seeds, no black box: a smoke run")
    p.add_argument("--part", default="all", choices=["white", "black", "all", "report"],
                   help="report: print the table and draw the plot from the results file only")
    p.add_argument("--runs", default="ceiling,ok,bad,eps",
                   help="white box runs to make (comma-separated): ceiling, ok (correct noise), bad (noise of "
                        "epsilon 8), eps (seed 0 at epsilon 1, 2, 8)")
    p.add_argument("--seeds", default="0-9", help="seeds of the ok and bad runs, e.g. 0-3")
    p.add_argument("--out", default=OUT, help="results file (rows not recomputed are kept)")
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    lo, hi = (int(x) for x in a.seeds.split("-")) if "-" in a.seeds else (int(a.seeds),) * 2
    m, seeds, steps = (20_000, range(2), 1) if a.quick else (50_000, range(lo, hi + 1), 1)
    runs = set(a.runs.split(","))
    out = a.out if not a.quick else os.path.join(tempfile.gettempdir(), "audit_quick.json")
    rows = []
    if os.path.exists(out) and not a.quick:
        with open(out) as f:
            rows = json.load(f).get("rows", [])
        # white-box rows and ceilings measured before the Gaussian-DP bound are not comparable: they are redone
        rows = [r for r in rows if r["part"] == "black" or "median_bound_eps_delta" in r or "bound" in r]
    if a.part == "report":
        print(table(rows))
        print(json.dumps(summarise(rows), indent=2))
        plot(rows, PLOT)
        return

    def add(row):
        rows[:] = [r for r in rows if _key(r) != _key(row)] + [row]
        rows.sort(key=_order)
        if row["part"] != "ceiling":
            print(table([row]).splitlines()[-1], f"{row['wall_s']}s", flush=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        dump({"delta": DELTA, "confidence": 0.95, "threads": 1, "torch": torch.__version__,
              "summary": summarise(rows), "rows": rows}, out)

    with tempfile.TemporaryDirectory() as tmp:
        if a.part in ("white", "all"):
            if "ceiling" in runs:
                for row in ceiling(m, [1.0, 2.0, 4.0, 8.0]):
                    add(row)
            for real, name in ((None, "ok"), (8.0, "bad")):
                if name in runs:
                    for seed in seeds:
                        add(white_box(tmp, 4.0, seed, m, steps, real))
            if "eps" in runs and not a.quick:
                for eps in (1.0, 2.0, 8.0):
                    add(white_box(tmp, eps, 0, m, steps))
        if a.part in ("black", "all") and not a.quick:
            task = minilm_task(200)
            for eps in (None, 1.0, 4.0, 8.0):
                add(black_box(tmp, task, eps, 200, 40, batch=32))
    print(table(rows))
    print(json.dumps(summarise(rows), indent=2))
    if not a.quick:
        plot(rows, PLOT)
        print(f"wrote {out} and {PLOT}")


if __name__ == "__main__":
    main()
