"""Utility of DR-Encoder against its baselines on the embedded default (MiniLM-L6 + LoRA, Reuters-R8).

    python benchmarks/utility.py [--quick] [--setting central|federated|all] [--resume]

Central setting (sample-level DP, one party): every method is trained on the whole R8 train split at every
epsilon and evaluated on a fixed random subset of the test split. Every run has the same number of optimizer
steps, the same expected batch, the same seeds (seed, data_seed and noise_seed all 0: the same head
initialisation, Poisson batches and noise draws for every method) and the same accounting (PRV,
delta = 1/N, the stage-1 cost of codec='auto' inside the same epsilon). The learning rate is fixed per privacy regime (one for private runs, one for non-private runs) and is
the same for every method, i.e. every method gets the same tuning budget. Given two or more learning rates
(--lr_private / --lr_nonprivate), each method is tuned instead: trained on 85% of the train split with each
learning rate (epsilon 8 for private runs) and scored on the other 15% -- never on the test split -- with the
same grid, hence the same number of trials, for every method.

Methods:
    lora               plain LoRA, non-private (disable_dp) through the same code path; epsilon inf
    dp-lora            DP-SGD on the LoRA gradient, no codec; the uplink is the fp32 LoRA gradient
    dr-paper           DR-Encoder with the paper's prior (one mean and one variance per module), codec='auto'
    dr-default         DR-Encoder with our default codec (low-rank prior), noise added in gradient space
    dr-default-latent  the same codec family, per-example latents clipped and noised (noise_space='latent')
The methods listed in the configuration's codec_nonprivate also get a non-private row (epsilon inf): the codec
alone, without noise.

Federated setting (client-level DP): ``run_federated`` (100 parties, ~10 per round, Dirichlet(0.5), epsilon 8).

Rows are appended to benchmarks/results/utility[_quick].json after every run, so a run that is cut off
keeps what it measured; ``--resume`` skips the rows already there. At the end a table is printed and
docs/utility.png (accuracy against epsilon) is drawn (not in --quick, which draws utility_quick.png in the
temporary folder instead).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

METHODS = {
    "lora": dict(private=False),
    "dp-lora": dict(),
    "dr-paper": dict(codec="auto", codec_prior="paper"),
    "dr-default": dict(codec="auto", codec_prior="lowrank"),
    "dr-default-latent": dict(codec="auto", codec_prior="lowrank", noise_space="latent"),
}

# The configuration of the committed full run and of --quick (see docs/utility.md for why each cut).
# Epsilons are run in this order (8 first) so that a run cut short still has the headline comparison.
# lr_grid: learning rates tried for private runs and for non-private runs; a one-element grid means no tuning
# runs (the learning rate is fixed); with more, each method gets the same trials on the held-out train split.
# The committed run is cut to fit ~1 hour on a shared 2-core machine: see docs/utility.md.
FULL = dict(
    batch=256, steps=48, tune_steps=12, max_length=16, test_samples=1000, tune_eval_samples=300, schedule="constant",
    epsilons=[8.0, 1.0, 3.0], lr_grid={"private": [1e-2], "nonprivate": [1e-2]}, methods=list(METHODS),
    codec_nonprivate=["dr-default"], stats_batches=2, stats_batch=128, seed=0,
    federated=dict(parties=100, per_round=10, alpha=0.5, epsilon=8.0, rounds=10, local_steps=5, local_batch=16,
                   local_lr=0.05),
)
QUICK = dict(
    batch=32, steps=2, tune_steps=2, max_length=16, test_samples=128, tune_eval_samples=64, schedule="constant",
    epsilons=[8.0],
    lr_grid={"private": [2e-2], "nonprivate": [1e-2, 2e-2]}, methods=list(METHODS), codec_nonprivate=["dr-default"],
    stats_batches=2, stats_batch=32, seed=0,
    federated=dict(parties=100, per_round=10, alpha=0.5, epsilon=8.0, rounds=2, local_steps=1, local_batch=8,
                   local_lr=0.05),
)
TUNE_EPSILON = 8.0
TUNE_FRACTION = 0.15


def _args(cfg, output_dir, lr, epsilon, method, n_train):
    from hf_drencoder import DRTrainingArguments

    spec = dict(METHODS[method])
    private = spec.pop("private", True) and epsilon is not None and math.isfinite(epsilon)
    kw = dict(
        output_dir=output_dir,
        per_device_train_batch_size=cfg["batch"],
        per_device_eval_batch_size=256,
        max_steps=cfg["steps"],
        learning_rate=lr,
        warmup_steps=0,
        lr_scheduler_type=cfg["schedule"],
        weight_decay=0.0,
        per_sample_max_grad_norm=1.0,
        logging_steps=max(1, cfg["steps"] // 5),
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        default_lora_r=8,
        default_lora_alpha=16,
        default_lora_target_modules=["query", "value"],
        seed=cfg["seed"],
        data_seed=cfg["seed"],
        noise_seed=cfg["seed"],
        # stage 1 of codec='auto' (trainer defaults: 4 Poisson batches of expected size min(256, N)); its cost is
        # charged to the same epsilon
        codec_stats_batches=cfg["stats_batches"],
        codec_stats_batch_size=min(cfg["stats_batch"], n_train),
        **spec,
    )
    if private:
        kw["target_epsilon"] = epsilon
    else:
        kw["disable_dp"] = True
    return DRTrainingArguments(**kw)


def train_and_eval(cfg, method, epsilon, lr, train, test, tokenizer, num_labels, steps=None) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_drencoder import DRTrainer
    from hf_drencoder.embedded import minilm_path
    from hf_drencoder.metrics import classification_compute_metrics

    if steps is not None:
        cfg = dict(cfg, steps=steps)
    torch.manual_seed(cfg["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = _args(cfg, out, lr, epsilon, method, len(train))
        trainer = DRTrainer(
            model=model, args=args, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
            compute_metrics=classification_compute_metrics(),
        )
        trainer.train()
        train_s = time.perf_counter() - start
        metrics = trainer.evaluate()
        report = trainer.privacy_report()
    row = dict(
        method=method,
        epsilon=report["epsilon"],
        target_epsilon=epsilon,
        accuracy=metrics["eval_accuracy"],
        macro_f1=metrics.get("eval_macro_f1", metrics.get("eval_f1")),
        eval_loss=metrics["eval_loss"],
        uplink_bytes=report["uplink_bytes"],
        uplink_ratio=report["uplink_ratio"],
        noise_multiplier=report.get("noise_multiplier"),
        delta=report.get("delta"),
        accountant=report.get("accountant"),
        codec_prior=report.get("codec_prior"),
        noise_space=report.get("noise_space"),
        steps=trainer.state.global_step,
        expected_batch=cfg["batch"],
        lr=lr,
        seed=cfg["seed"],
        train_examples=len(train),
        eval_examples=len(test),
        train_s=round(train_s, 1),
        wall_s=round(time.perf_counter() - start, 1),
    )
    del trainer, model
    gc.collect()
    return row


def _key(row):
    return (row["setting"], row["method"], row.get("target_epsilon"), row.get("lr"), row.get("split", "test"))


class Results:
    """The rows written so far, saved after every append (a cut-off run keeps its data)."""

    def __init__(self, path, resume):
        self.path = path
        self.rows = []
        if resume and os.path.exists(path):
            with open(path) as f:
                self.rows = json.load(f)

    def find(self, **match):
        return [r for r in self.rows if all(r.get(k) == v for k, v in match.items())]

    def add(self, row):
        self.rows = [r for r in self.rows if _key(r) != _key(row)] + [row]
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.rows, f, indent=1)
        os.replace(tmp, self.path)


def load_data(cfg):
    from transformers import AutoTokenizer

    from hf_drencoder.embedded import load_reuters, minilm_path, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = tokenize_dataset(load_reuters("r8"), tokenizer, max_length=cfg["max_length"])
    num_labels = data["train"].features["labels"].num_classes
    # A fixed random subset of the test split (seeded), and a held-out split of TRAIN for tuning.
    test = data["test"].shuffle(seed=1234).select(range(min(cfg["test_samples"], len(data["test"]))))
    split = data["train"].train_test_split(test_size=TUNE_FRACTION, seed=1234)
    tune_eval = split["test"].select(range(min(cfg["tune_eval_samples"], len(split["test"]))))
    return dict(train=data["train"], test=test, tune_train=split["train"], tune_eval=tune_eval,
                tokenizer=tokenizer, num_labels=num_labels)


def _log(msg):
    print(f"[utility {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tune(cfg, results: Results, data, method, private, grid) -> float:
    """The learning rate of ``grid`` with the best accuracy on the held-out 15% of the train split, trained on the
    other 85% (epsilon 8 for private runs). Every method gets the same grid, so the same number of trials."""
    eps = TUNE_EPSILON if private else math.inf
    scores = {}
    for lr in grid:
        done = results.find(setting="central", method=method, split="tune", lr=lr, target_epsilon=eps)
        if done:
            row = done[0]
        else:
            _log(f"tune {method} lr {lr:g} (epsilon {eps})")
            row = train_and_eval(cfg, method, eps, lr, data["tune_train"], data["tune_eval"], data["tokenizer"],
                                 data["num_labels"], steps=cfg["tune_steps"])
            row.update(setting="central", split="tune")
            results.add(row)
        scores[lr] = row["accuracy"]
        _log(f"  {method} lr {lr:g}: held-out accuracy {row['accuracy']:.4f}")
    return max(grid, key=lambda lr: (scores[lr], -lr))


def run_central(cfg, results: Results, data) -> None:
    common = (data["tokenizer"], data["num_labels"])
    best_lr = {}
    for method in cfg["methods"]:
        has_private = METHODS[method].get("private", True)
        for private in (True, False):
            if (private and not has_private) or (not private and has_private and method not in cfg["codec_nonprivate"]):
                continue
            grid = cfg["lr_grid"]["private" if private else "nonprivate"]
            best_lr[method, private] = grid[0] if len(grid) == 1 else tune(cfg, results, data, method, private, grid)
    # Final runs: the first epsilon (8) and the non-private baseline first, then the other epsilons, then the
    # codecs without noise.
    private = [m for m in cfg["methods"] if METHODS[m].get("private", True)]
    plan = [(m, cfg["epsilons"][0]) for m in private]
    plan += [(m, math.inf) for m in cfg["methods"] if m not in private]
    plan += [(m, eps) for eps in cfg["epsilons"][1:] for m in private]
    plan += [(m, math.inf) for m in private if m in cfg["codec_nonprivate"]]
    for method, eps in plan:
        if results.find(setting="central", method=method, split="test", target_epsilon=eps):
            continue
        lr = best_lr[method, math.isfinite(eps)]
        _log(f"run {method} epsilon {eps} lr {lr:g}")
        row = train_and_eval(cfg, method, eps, lr, data["train"], data["test"], *common)
        row.update(setting="central", split="test",
                   lr_grid=cfg["lr_grid"]["private" if math.isfinite(eps) else "nonprivate"])
        results.add(row)
        _log(f"  {method} epsilon {row['epsilon']:.3g}: accuracy {row['accuracy']:.4f} "
             f"(uplink {row['uplink_bytes']} B, {row['train_s']} s)")


FED_METHODS = {  # noise_space='latent' has no federated counterpart: parties noise their update, then encode it
    "lora": dict(disable_dp=True),
    "dp-lora": dict(),
    "dr-paper": dict(codec="auto", codec_prior="paper"),
    "dr-default": dict(codec="auto", codec_prior="lowrank"),
}


def run_federated(cfg, results: Results, data) -> None:
    """Client-level DP: 100 parties, about 10 per round (Poisson, q = 0.1), Dirichlet(0.5) non-IID split of the
    train split by label, epsilon 8 (delta = 1/100), the same rounds and local settings for every method."""
    try:
        from hf_drencoder.federated import FederatedArguments, FederatedSimulation
    except ImportError:
        _log("federated: hf_drencoder.federated is not available on this branch; skipped")
        return
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_drencoder.embedded import minilm_path
    from hf_drencoder.metrics import classification_compute_metrics

    fed = cfg["federated"]
    for method in [m for m in FED_METHODS if m in cfg["methods"]]:
        eps = math.inf if FED_METHODS[method].get("disable_dp") else fed["epsilon"]
        if results.find(setting="federated", method=method, target_epsilon=eps):
            continue
        _log(f"federated {method} epsilon {eps}")
        torch.manual_seed(cfg["seed"])
        model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data["num_labels"])
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            kw = dict(
                output_dir=out, num_parties=fed["parties"], parties_per_round=fed["per_round"], partition="dirichlet",
                dirichlet_alpha=fed["alpha"], partition_seed=cfg["seed"], num_rounds=fed["rounds"],
                local_steps=fed["local_steps"], local_batch_size=fed["local_batch"], local_learning_rate=fed["local_lr"],
                local_optimizer="sgd",  # what the committed rows were measured with
                max_update_norm=1.0, eval_every=0, seed=cfg["seed"], sampling_seed=cfg["seed"], noise_seed=cfg["seed"],
                disable_tqdm=True, lora_r=8, lora_alpha=16, lora_target_modules=["query", "value"],
                **FED_METHODS[method],
            )
            if math.isfinite(eps):
                kw["target_epsilon"] = eps
            sim = FederatedSimulation(model, data["train"], FederatedArguments(**kw), eval_dataset=data["test"],
                                      compute_metrics=classification_compute_metrics())
            history = sim.run()
            report = sim.privacy_report()
        last = history[-1]
        train = [h for h in history if h.get("stage") == "train"]
        row = dict(
            setting="federated", split="test", method=method, epsilon=report["epsilon"], target_epsilon=eps,
            accuracy=last["eval_accuracy"], macro_f1=last.get("eval_macro_f1", last.get("eval_f1")), eval_loss=last.get("eval_loss"),
            uplink_bytes=last["uplink_bytes_per_party"], uplink_ratio=last["uplink_bytes_per_party"] / (4 * sim.layout.dim),
            noise_multiplier=report.get("noise_multiplier"), delta=report.get("delta"), accountant=report.get("accountant"),
            epsilon_server_view=report.get("epsilon_server_view"), codec_prior=FED_METHODS[method].get("codec_prior"),
            rounds=len(train), statistics_rounds=report.get("statistics_rounds"),
            mean_parties_per_round=sum(h["num_received"] for h in train) / max(1, len(train)),
            steps=len(train), local_steps=fed["local_steps"], local_batch=fed["local_batch"], lr=fed["local_lr"],
            num_parties=fed["parties"], dirichlet_alpha=fed["alpha"], seed=cfg["seed"],
            eval_examples=len(data["test"]), wall_s=round(time.perf_counter() - start, 1),
        )
        results.add(row)
        _log(f"  federated {method} epsilon {row['epsilon']:.3g}: accuracy {row['accuracy']:.4f} "
             f"(uplink {row['uplink_bytes']} B per party, {row['wall_s']} s)")
        del sim, model
        gc.collect()


def print_table(rows) -> str:
    lines = [f"{'setting':<10} {'method':<18} {'epsilon':>8} {'accuracy':>8} {'macro-F1':>8} {'uplink B':>9} "
             f"{'ratio':>7} {'sigma':>7} {'lr':>6} {'steps':>5} {'train s':>7}"]
    for r in rows:
        if r.get("split", "test") != "test":
            continue
        eps = "inf" if not math.isfinite(r["epsilon"]) else f"{r['epsilon']:.2f}"
        lines.append(
            f"{r['setting']:<10} {r['method']:<18} {eps:>8} {r['accuracy']:>8.4f} {r.get('macro_f1', float('nan')):>8.4f} "
            f"{r['uplink_bytes']:>9} {r.get('uplink_ratio', float('nan')):>7.4f} {r.get('noise_multiplier') or 0:>7.3f} "
            f"{r.get('lr', float('nan')):>6.0e} {r.get('steps', 0):>5} {r.get('train_s', float('nan')):>7.0f}"
        )
    text = "\n".join(lines)
    print(text)
    return text


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["setting"] == "central" and r.get("split", "test") == "test"]
    if not rows:
        return
    finite = sorted({r["target_epsilon"] for r in rows if math.isfinite(r["target_epsilon"])})
    inf_x = (max(finite) * 2.5) if finite else 1.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in METHODS:
        mr = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target_epsilon"])
        if not mr:
            continue
        xs = [r["target_epsilon"] if math.isfinite(r["target_epsilon"]) else inf_x for r in mr]
        ax.plot(xs, [r["accuracy"] for r in mr], marker="o", label=method)
    ax.set_xscale("log")
    ticks = finite + [inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ["no DP"])
    ax.minorticks_off()
    ax.set_xlabel("epsilon (PRV, delta = 1/N; sample-level)")
    ax.set_ylabel("accuracy on R8 test subset")
    first = rows[0]
    ax.set_title(f"MiniLM-L6 + LoRA on Reuters-R8: {first['steps']} steps, expected batch {first['expected_batch']}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _log(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--setting", choices=["central", "federated", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="tiny configuration (every code path, ~10 min on 2 cores)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the results file, skip their runs")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), help="subset of methods")
    p.add_argument("--steps", type=int, help="optimizer steps of every run (tuning runs too)")
    p.add_argument("--lr_private", type=float, nargs="+",
                   help="learning rates for private runs; two or more: tune each method on the held-out train split")
    p.add_argument("--lr_nonprivate", type=float, nargs="+", help="the same for non-private runs")
    p.add_argument("--output", help="results file (default benchmarks/results/utility[_quick].json)")
    a = p.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.methods:
        cfg["methods"] = a.methods
    if a.steps:
        cfg["steps"] = cfg["tune_steps"] = a.steps
    cfg["lr_grid"] = {"private": a.lr_private or cfg["lr_grid"]["private"],
                      "nonprivate": a.lr_nonprivate or cfg["lr_grid"]["nonprivate"]}
    logging.basicConfig(level=logging.WARNING)
    import torch

    _log(f"config {cfg}; torch threads {torch.get_num_threads()}")
    path = a.output or os.path.join(HERE, "results", "utility_quick.json" if a.quick else "utility.json")
    results = Results(path, a.resume)
    data = load_data(cfg)
    if a.setting in ("central", "all"):
        run_central(cfg, results, data)
    if a.setting in ("federated", "all"):
        run_federated(cfg, results, data)
    print_table(results.rows)
    plot(results.rows, os.path.join(tempfile.gettempdir(), "utility_quick.png") if a.quick
         else os.path.join(ROOT, "docs", "utility.png"))
    _log(f"wrote {path}")


if __name__ == "__main__":
    main()
