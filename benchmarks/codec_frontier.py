"""Accuracy and macro-F1 against uplink bytes per step, in private training at epsilon 8 (central DP).

    python benchmarks/codec_frontier.py                                   # the full grid (hours on a CPU)
    python benchmarks/codec_frontier.py --methods dp-lora codec --ratios 1/64 1/16 --seeds 0   # a slice
    python benchmarks/codec_frontier.py --quick                           # every code path in minutes; numbers mean nothing
    python benchmarks/codec_frontier.py --report     # no runs: the Markdown table (mean over seeds) and docs/codec_frontier.png
    python benchmarks/codec_frontier.py --split 272x80 ...   # the same budget as the demo's 80 steps of 272

Every run is the ``hf-drencoder demo`` configuration (`hf_drencoder.demo.DEMO_DEFAULTS`: MiniLM-L6, LoRA r 8 on query
and value of the top two layers, 32 tokens, expected batch 1088, 20 steps (the demo's then: ``FRONTIER_BATCH``, ``FRONTIER_STEPS``), FFA-LoRA (A frozen), constant lr 5e-2 (the demo's rate then; ``FRONTIER_LEARNING_RATE``), C 0.1, target epsilon 8
with PRV at delta 1/N), trained on 85% of the R8 TRAIN split and scored on the held-out 15%
(``train_test_split(test_size=0.15, seed=1234)``, as benchmarks/demo_recipe.py); the test split is never read. Methods:

- ``dp-lora``: no compression, the fp32 LoRA gradient and head (the reference);
- ``dp-lora-r1``, ``-r2``, ``-r4``: DP-LoRA at a lower LoRA rank (fewer bytes by construction);
- ``subspace``: the subspace codec with the budget split in proportion to size (``head_share=None``) and
  ``noise_space="latent"`` (clipping and noise in the latent) at each ratio; ``subspace-gradient`` the same codec
  compressing the noised gradient (``noise_space="gradient"``); ``subspace-default``: ``codec="subspace"`` as the
  trainer builds it (``head_share="auto"``: ``subspace-head50`` from 1/64 up, ``subspace`` below);
- ``codec``: ``codec="auto"`` (stage 1 on the training data, its cost inside the same epsilon 8) at each latent ratio;
- ``codec-paper``: the same with ``codec_prior="paper"``;
- ``random-projection``, ``top-k``, ``powersgd``: the baselines of `hf_drencoder.codec.baselines` at the same ratio
  (PowerSGD rank 1, its bytes fixed by the rank), the head sent raw; ``random-projection-all``, ``top-k-all``: the
  same with the head coded in the one vector (``raw_head=False``), for a total byte budget;
- ``subspace-raw-head``: the subspace codec with the head sent raw, at the baselines' bytes; ``subspace-head50``: half
  of the same total budget to the head (``head_share=0.5``); ``subspace-raw-head-r1``, ``-r2``, ``-r4``: the same codec on
  a lower-rank adapter (at ratio 1/8, 1/16 and 1/32 they send as many bytes as ``subspace-raw-head`` at 1/64).

The uplink bytes are every byte that leaves the party per step, the head (sent raw in fp32) included. As a diagnostic
each step records the cosine between the gradient the optimizer receives (decoded) and the clean aggregate (the sum
of the clipped per-example gradients before noise), over the LoRA coordinates. Rows go to
``benchmarks/results/codec_frontier.json`` (``codec_frontier_quick.json`` with ``--quick``) after every run.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import tempfile
import time
from fractions import Fraction

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("dp-lora", "dp-lora-r1", "dp-lora-r2", "dp-lora-r4", "subspace", "subspace-raw-head", "subspace-raw-head-r1",
           "subspace-raw-head-r2", "subspace-raw-head-r4", "subspace-head50", "subspace-default", "subspace-gradient", "codec", "codec-paper",
           "random-projection", "top-k", "random-projection-all", "top-k-all", "powersgd")
# the subspace rows' settings (head_share=None: in proportion to size, the default when those rows were measured)
SUBSPACE_OPTIONS = {"subspace": dict(head_share=None), "subspace-gradient": dict(head_share=None),
                    "subspace-raw-head": dict(head="raw"), "subspace-head50": dict(head_share=0.5)}
BASELINE_METHODS = ("random-projection", "top-k", "powersgd", "random-projection-all", "top-k-all")
RATIO_FREE = ("dp-lora", "dp-lora-r1", "dp-lora-r2", "dp-lora-r4", "powersgd")  # their bytes do not follow --ratios


def _ratio(text: str) -> float:
    return float(Fraction(text))


def _rank(method: str) -> tuple[str, int | None]:
    """``"dp-lora-r2"`` -> ``("dp-lora", 2)``: the method and the LoRA rank it runs at (None: the demo's)."""
    head, _, tail = method.rpartition("-r")
    return (head, int(tail)) if head and tail.isdigit() else (method, None)


# the demo's rate when the frontier was measured: every committed row without an
# "lr" of its own was trained at it, so reruns keep it
FRONTIER_LEARNING_RATE = 5e-2
# the demo's batch and steps when the frontier was measured (the demo has since moved to 80 steps of 272): pinned so
# that new rows stay comparable with the recorded ones
FRONTIER_BATCH, FRONTIER_STEPS = 1088, 20
# --split: the same 21,760 examples as 20 steps of 1088 (the frontier's, the default) or 80 steps of 272 (the demo's
# and the recipe's now); each split's rows are reported apart ("split" in a row; rows without one are 1088x20)
SPLITS = {"1088x20": (FRONTIER_BATCH, FRONTIER_STEPS), "272x80": (272, 80)}
FRONTIER_SPLIT = "1088x20"


def _args(out: str, method: str, ratio: float, seed: int, quick: bool, split: str = FRONTIER_SPLIT):
    from hf_drencoder import DRTrainingArguments
    from hf_drencoder.demo import DEMO_DEFAULTS

    kw = {**DEMO_DEFAULTS, "output_dir": out, "seed": seed, "data_seed": seed, "noise_seed": seed,
          "disable_tqdm": True, "logging_steps": 5, "learning_rate": FRONTIER_LEARNING_RATE,
          "per_device_train_batch_size": SPLITS[split][0], "max_steps": SPLITS[split][1]}
    if quick:
        kw.update(per_device_train_batch_size=64, max_physical_batch_size=64, max_steps=3)
    method, r = _rank(method)
    if r is not None:
        kw.update(default_lora_r=r, default_lora_alpha=2 * r)  # alpha / r = 2, as at r 8
    if method.startswith("subspace"):
        kw.update(codec="subspace", codec_latent_ratio=ratio,  # subspace-raw-head: the object replaces it
                  noise_space="gradient" if method == "subspace-gradient" else "latent")
    if method in ("codec", "codec-paper"):
        kw.update(codec="auto", codec_latent_ratio=ratio, codec_prior="paper" if method == "codec-paper" else "lowrank")
        if quick:
            kw.update(codec_stats_batches=1, codec_stats_batch_size=64)
    return DRTrainingArguments(**kw)


class _CosineSpy:
    """Per step: cosine between the decoded gradient the optimizer gets and the clean clipped sum (LoRA part)."""

    def __init__(self, trainer):
        self.trainer, self.clean, self.cosines = trainer, None, []
        start = trainer._start_mechanism

        def start_and_spy(step):
            start(step)
            mech = trainer._mechanism
            release = mech.release

            def spy(all_reduce=None):
                if mech._sums is not None:
                    self.clean = torch.cat([s.reshape(-1).float() for s in mech._sums]).clone()
                return release(all_reduce)

            mech.release = spy
            if trainer._latent_noise:
                # the mechanism sums latents: keep the clean aggregate in gradient space, each example clipped to C
                step_obj, add = trainer._step, trainer._step._add_per_unit
                c = trainer.args.per_sample_max_grad_norm

                def add_and_spy(grads):
                    flat = trainer.layout.flatten(grads).detach().float()
                    flat = flat * (c / flat.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
                    self.latent_clean = flat.sum(0) + (self.latent_clean if self.latent_clean is not None else 0)
                    add(grads)

                step_obj._add_per_unit = add_and_spy

        trainer._start_mechanism = start_and_spy
        self.latent_clean = None

    def on_step(self) -> None:
        t = self.trainer
        if t._latent_noise:
            self.clean, self.latent_clean = self.latent_clean, None
        if self.clean is None:
            return
        decoded = t.layout.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in t._params]).cpu()
        lora = torch.tensor([b.factor.startswith("lora") for b in t.layout.blocks for _ in range(b.numel)])
        c, d = self.clean.cpu()[lora], decoded[lora]
        self.cosines.append(float(c @ d / (c.norm() * d.norm()).clamp(min=1e-30)))
        self.clean = None


def run_one(data, method: str, ratio: float, seed: int, quick: bool, lr: float | None = None,
            split: str = FRONTIER_SPLIT) -> dict:
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    from hf_drencoder import DRTrainer
    from hf_drencoder.codec import SubspaceCodec
    from hf_drencoder.codec.baselines import make_baseline
    from hf_drencoder.embedded import minilm_path
    from hf_drencoder.metrics import classification_compute_metrics

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data["num_labels"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        args = _args(out, method, ratio, seed, quick, split)
        if lr is not None:
            args.learning_rate = lr
        trainer = DRTrainer(model=model, args=args, train_dataset=data["train"],
                            eval_dataset=data["heldout"], processing_class=data["tokenizer"],
                            compute_metrics=classification_compute_metrics())
        if method in BASELINE_METHODS:
            # the trainer has wrapped the model in LoRA: the baseline is made for that layout (no prior, no data)
            trainer._codec_spec = make_baseline(method.removesuffix("-all"), trainer.model, ratio, seed=seed,
                                                raw_head=not method.endswith("-all"))
        base = _rank(method)[0]
        if base in SUBSPACE_OPTIONS:  # the object replaces codec="subspace" ("subspace-default": the trainer builds it)
            trainer._codec_spec = SubspaceCodec.for_model(trainer.model, ratio, seed=seed, **SUBSPACE_OPTIONS[base])
        spy = _CosineSpy(trainer)

        class _OnStep(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                spy.on_step()

        trainer.add_callback(_OnStep())
        trainer.train()
        train_s = time.perf_counter() - start
        metrics = trainer.evaluate()
        report = trainer.privacy_report()
    lora_dim = sum(b.numel for b in trainer.layout.blocks if b.factor.startswith("lora"))
    return dict(
        method=method, ratio=None if method in RATIO_FREE else ratio, seed=seed, quick=quick, lr=lr, split=split,
        accuracy=metrics["eval_accuracy"], macro_f1=metrics["eval_macro_f1"], eval_loss=metrics["eval_loss"],
        uplink_bytes=report["uplink_bytes"], uplink_ratio=report["uplink_ratio"],
        uncompressed_bytes=4 * trainer.layout.dim, lora_values=lora_dim, head_values=trainer.layout.dim - lora_dim,
        epsilon=report["epsilon"], noise_multiplier=report["noise_multiplier"], steps=trainer.state.global_step,
        cosine_lora_per_step=spy.cosines,
        cosine_lora_mean=sum(spy.cosines) / len(spy.cosines) if spy.cosines else None,
        train_examples=len(data["train"]), heldout_examples=len(data["heldout"]), train_s=round(train_s, 1),
        wall_s=round(time.perf_counter() - start, 1), threads=torch.get_num_threads(),
    )


def load_data(heldout_samples: int | None):
    from transformers import AutoTokenizer

    from hf_drencoder.demo import DEMO_MAX_LENGTH
    from hf_drencoder.embedded import load_reuters, minilm_path, tokenize_dataset

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    splits = load_reuters("r8")["train"].train_test_split(test_size=0.15, seed=1234)  # "test": 15% of TRAIN
    data = tokenize_dataset(splits, tokenizer, max_length=DEMO_MAX_LENGTH)
    held = data["test"]
    if heldout_samples:
        held = held.select(range(min(heldout_samples, len(held))))
    return dict(train=data["train"], heldout=held, tokenizer=tokenizer,
                num_labels=data["train"].features["labels"].num_classes)


def _split(r: dict) -> str:
    return r.get("split", FRONTIER_SPLIT)  # rows recorded before --split existed ran 20 steps of 1088


def _key(r):
    return (r["method"], r["ratio"], r["seed"], r["quick"], r.get("lr"), _split(r))


def _load(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)["rows"]


def save(path: str, row: dict) -> list[dict]:
    """Add one run to the results file under a lock (parallel processes write to the same file); all rows back."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = [x for x in _load(path) if _key(x) != _key(row)] + [row]
        with open(path + ".tmp", "w") as f:
            json.dump({"cpu_count": os.cpu_count(), "configuration": "hf-drencoder demo defaults, target epsilon 8",
                       "rows": rows}, f, indent=1)
        os.replace(path + ".tmp", path)
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<18} {'ratio':>6} {'seed':>4} {'bytes/step':>10} {'of full':>7} {'accuracy':>8} "
             f"{'macro-F1':>8} {'epsilon':>7} {'cos(dec,clean)':>14} {'wall s':>6}"]
    for r in sorted(rows, key=lambda r: (-r["uplink_bytes"], r["method"], r["seed"])):
        ratio = "-" if r["ratio"] is None else f"1/{round(1 / r['ratio'])}"
        cos = "-" if r["cosine_lora_mean"] is None else f"{r['cosine_lora_mean']:.3f}"
        lines.append(f"{r['method']:<18} {ratio:>6} {r['seed']:>4} {r['uplink_bytes']:>10} {r['uplink_ratio']:>7.3f} "
                     f"{r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['epsilon']:>7.3f} {cos:>14} {r['wall_s']:>6.0f}")
    return "\n".join(lines)


def _lr(r: dict) -> float:
    return r.get("lr") or FRONTIER_LEARNING_RATE  # rows without an "lr" of their own ran at the frontier's rate


def grouped(rows: list[dict]) -> list[dict]:
    """One entry per (method, ratio, lr) over the seeds: mean, min and max accuracy and macro-F1."""
    groups: dict = {}
    for r in rows:
        if not r["quick"]:
            groups.setdefault((r["method"], r["ratio"], _lr(r)), []).append(r)
    out = []
    for (method, ratio, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[1][0]["uplink_bytes"])):
        acc, f1 = [r["accuracy"] for r in rs], [r["macro_f1"] for r in rs]
        cos = [r["cosine_lora_mean"] for r in rs if r["cosine_lora_mean"] is not None]
        seed0 = [r for r in rs if r["seed"] == 0]
        out.append(dict(method=method, ratio=ratio, lr=lr, seeds=sorted(r["seed"] for r in rs),
                        uplink_bytes=rs[0]["uplink_bytes"], uplink_ratio=rs[0]["uplink_ratio"],
                        accuracy=sum(acc) / len(acc), accuracy_min=min(acc), accuracy_max=max(acc),
                        macro_f1=sum(f1) / len(f1), cosine_lora_mean=sum(cos) / len(cos) if cos else None,
                        seed0=(seed0[0]["accuracy"], seed0[0]["macro_f1"]) if seed0 else None,
                        cosine_per_step=[sum(c) / len(c) for c in zip(*[r["cosine_lora_per_step"] for r in rs])]))
    return out


def tuned(rows: list[dict]) -> list[dict]:
    """One entry per (method, ratio): the rate whose seed-0 run scored best (accuracy, then macro-F1) among the rates
    tried, with every seed run at that rate. A method run at one rate only keeps it (``rates_tried`` says which)."""
    by: dict = {}
    for g in grouped(rows):
        by.setdefault((g["method"], g["ratio"]), []).append(g)
    out = []
    for gs in by.values():
        with_seed0 = [g for g in gs if g["seed0"] is not None] or gs
        best = max(with_seed0, key=lambda g: g["seed0"] or (g["accuracy"], g["macro_f1"]))
        out.append({**best, "rates_tried": sorted(g["lr"] for g in gs)})
    return out


def tuning_markdown(rows: list[dict]) -> str:
    """Seed 0 at every rate tried, per (method, ratio): where the rates were compared."""
    grid = sorted({g["lr"] for g in grouped(rows)})
    lines = ["| method | ratio | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
             "|---|---:|" + "---:|" * len(grid) + "---:|"]
    best = {(t["method"], t["ratio"]): t["lr"] for t in tuned(rows)}
    cells: dict = {}
    for g in grouped(rows):
        if g["seed0"] is not None:
            cells.setdefault((g["method"], g["ratio"], g["uplink_bytes"]), {})[g["lr"]] = g["seed0"][0]
    for (method, ratio, _), by_lr in sorted(cells.items(), key=lambda kv: (-kv[0][2], kv[0][0])):
        if len(by_lr) < 2:
            continue
        name = "-" if ratio is None else f"1/{round(1 / ratio)}"
        row = [f"**{by_lr[lr]:.3f}**" if lr == best[(method, ratio)] else f"{by_lr[lr]:.3f}" if lr in by_lr else "-"
               for lr in grid]
        lines.append(f"| {method} | {name} | " + " | ".join(row) + f" | {best[(method, ratio)]:g} |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The frontier at each method's chosen rate (``tuned``): mean over the seeds run at it."""
    lines = ["| method | ratio | bytes/step | of uncompressed | lr | accuracy (mean, min-max) | macro-F1 | seeds | "
             "cos(decoded, clean) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    groups = tuned(rows)
    # against the uncompressed DP-LoRA message of the demo's rank (a lower-rank row's own ratio is against itself)
    ref = max((g["uplink_bytes"] for g in groups if g["method"] == "dp-lora"), default=None)
    for g in sorted(groups, key=lambda g: (-g["uplink_bytes"], g["method"])):
        g["uplink_ratio"] = g["uplink_bytes"] / ref if ref else g["uplink_ratio"]
        ratio = "-" if g["ratio"] is None else f"1/{round(1 / g['ratio'])}"
        spread = f" ({g['accuracy_min']:.3f}-{g['accuracy_max']:.3f})" if len(g["seeds"]) > 1 else ""
        cos = "-" if g["cosine_lora_mean"] is None else f"{g['cosine_lora_mean']:.3f}"
        lr = f"{g['lr']:g}" + ("" if len(g["rates_tried"]) > 1 else " (only)")
        lines.append(f"| {g['method']} | {ratio} | {g['uplink_bytes']:,} | {g['uplink_ratio']:.4f} | {lr} "
                     f"| {g['accuracy']:.3f}{spread} | {g['macro_f1']:.3f} | {len(g['seeds'])} | {cos} |")
    return "\n".join(lines)


def default_curve(groups: list[dict]) -> list[dict]:
    """The default codec's points among the tuned groups: ``head_share="auto"`` is ``subspace-head50`` from 1/64 up
    and ``subspace`` (in proportion to size) below, so its frontier is theirs (sorted by bytes)."""
    from hf_drencoder.codec.subspace import resolve_head_share

    # the frontier's method that builds each coded-head share explicitly (None: in proportion to size)
    by_share = {SUBSPACE_OPTIONS[m]["head_share"]: m for m in ("subspace", "subspace-head50")}

    def is_default(g):
        if g["ratio"] is None:
            return False
        return g["method"] in ("subspace-default", by_share[resolve_head_share("auto", g["ratio"])])

    by_ratio: dict = {}
    for g in groups:
        if is_default(g):  # the same codec measured two ways: the one with more seeds
            if g["ratio"] not in by_ratio or len(g["seeds"]) > len(by_ratio[g["ratio"]]["seeds"]):
                by_ratio[g["ratio"]] = g
    return sorted(by_ratio.values(), key=lambda g: g["uplink_bytes"])


def plot(rows: list[dict], path: str) -> None:
    """Accuracy against bytes per step (one line per method, the seeds' range as error bars), and the per-step
    cosine between the decoded gradient and the clean aggregate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _plotting import label_axes

    groups = tuned(rows)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 6))
    by_method: dict = {}
    for g in groups:
        by_method.setdefault(g["method"], []).append(g)
    colors = plt.get_cmap("tab20").colors
    markers = "os^vDP*Xhp<>"
    for i, (method, gs) in enumerate(sorted(by_method.items())):
        gs.sort(key=lambda g: g["uplink_bytes"])
        x = [g["uplink_bytes"] for g in gs]
        y = [g["accuracy"] for g in gs]
        err = [[g["accuracy"] - g["accuracy_min"] for g in gs], [g["accuracy_max"] - g["accuracy"] for g in gs]]
        ax.errorbar(x, y, yerr=err, marker=markers[i % len(markers)], color=colors[(2 * i) % 20 + (i // 10)],
                    capsize=3, label=method)
    default = default_curve(groups)
    if default:
        ax.plot([g["uplink_bytes"] for g in default], [g["accuracy"] for g in default], color="black", lw=3,
                alpha=0.25, zorder=0, label='default codec="subspace" (head_share="auto")')
    ax.set_xscale("log")
    label_axes(ax, "uplink bytes per step (every byte, head included)", "held-out accuracy",
               "Accuracy against bytes, epsilon 8 (each method at its chosen lr)", ncol=3,
               loc="upper center", bbox_to_anchor=(0.5, -0.15))
    for g in groups:
        if g["method"] in ("dp-lora", "subspace", "top-k", "random-projection", "powersgd", "codec") and g["cosine_per_step"]:
            ratio = "" if g["ratio"] is None else f" 1/{round(1 / g['ratio'])}"
            bx.plot(range(1, len(g["cosine_per_step"]) + 1), g["cosine_per_step"], label=g["method"] + ratio)
    label_axes(bx, "step", "cosine(decoded, clean aggregate), LoRA part", "Per-step diagnostic (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=_ratio, default=[_ratio(x) for x in ("1/256", "1/64", "1/16", "1/4")],
                   help="latent ratios of the LoRA part (e.g. 1/64)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--heldout_samples", type=int, default=None, help="score on the first N held-out documents only")
    p.add_argument("--quick", action="store_true", help="3 steps of 64, 128 held-out documents: numbers mean nothing")
    p.add_argument("--out", default=None, help="results file")
    p.add_argument("--lr", type=float, default=None, help="learning rate instead of FRONTIER_LEARNING_RATE (recorded in the row)")
    p.add_argument("--report", action="store_true", help="no runs: print the Markdown table and write the plot")
    p.add_argument("--split", choices=list(SPLITS), default=FRONTIER_SPLIT,
                   help="how the 21,760 examples are spent (expected batch x steps); --report shows this split's rows")
    p.add_argument("--plot", default=None, help="default: docs/codec_frontier.png (docs/codec_frontier_272x80.png "
                                                 "for --split 272x80)")
    a = p.parse_args(argv)
    path = a.out or os.path.join(HERE, "results", "codec_frontier_quick.json" if a.quick else "codec_frontier.json")
    a.plot = a.plot or os.path.join(os.path.dirname(HERE), "docs", "codec_frontier.png" if a.split == FRONTIER_SPLIT
                                    else f"codec_frontier_{a.split}.png")
    rows = _load(path)
    if a.report:
        rows = [r for r in rows if _split(r) == a.split]
        print(markdown(rows))
        print()
        print(tuning_markdown(rows))
        print()
        print('The default codec (codec="subspace", head_share="auto"): ' + "; ".join(
            f"1/{round(1 / g['ratio'])} ({g['uplink_bytes']:,} bytes) {g['method']} {g['accuracy']:.3f} over "
            f"{len(g['seeds'])} seed(s)" for g in default_curve(tuned(rows))))
        plot(rows, a.plot)
        print(f"wrote {a.plot}")
        return
    data = load_data(128 if a.quick else a.heldout_samples)
    for seed in a.seeds:
        for method in a.methods:
            for ratio in [None] if method in RATIO_FREE else a.ratios:
                r = run_one(data, method, ratio if ratio is not None else 1.0, seed, a.quick, a.lr, a.split)
                rows = save(path, r)
                print(f"[codec_frontier {time.strftime('%H:%M:%S')}] {method} ratio {ratio} seed {seed}: accuracy "
                      f"{r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} bytes {r['uplink_bytes']} "
                      f"cosine {r['cosine_lora_mean']}", flush=True)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
