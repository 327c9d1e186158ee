"""Accuracy and macro-F1 against uplink bytes per step, in private training at epsilon 8 (central DP).

    python benchmarks/codec_frontier.py                                   # the full grid (hours on a CPU)
    python benchmarks/codec_frontier.py --methods dp-lora codec --ratios 1/64 1/16 --seeds 0   # a slice
    python benchmarks/codec_frontier.py --quick                           # every code path in minutes; numbers mean nothing

Every run is the ``hf-drencoder demo`` configuration (`hf_drencoder.demo.DEMO_DEFAULTS`: MiniLM-L6, LoRA r 8 on query
and value of the top two layers, 32 tokens, expected batch 1088, 20 steps, constant lr 2e-2, C 0.1, target epsilon 8
with PRV at delta 1/N), trained on 85% of the R8 TRAIN split and scored on the held-out 15%
(``train_test_split(test_size=0.15, seed=1234)``, as benchmarks/demo_recipe.py); the test split is never read. Methods:

- ``dp-lora``: no compression, the fp32 LoRA gradient and head (the reference);
- ``dp-lora-r1``, ``-r2``, ``-r4``: DP-LoRA at a lower LoRA rank (fewer bytes by construction);
- ``codec``: ``codec="auto"`` (stage 1 on the training data, its cost inside the same epsilon 8) at each latent ratio;
- ``codec-paper``: the same with ``codec_prior="paper"``;
- ``random-projection``, ``top-k``, ``powersgd``: the baselines of `hf_drencoder.codec.baselines` at the same ratio
  (PowerSGD rank 1, its bytes fixed by the rank).

The uplink bytes are every byte that leaves the party per step, the head (sent raw in fp32) included. As a diagnostic
each step records the cosine between the gradient the optimizer receives (decoded) and the clean aggregate (the sum
of the clipped per-example gradients before noise), over the LoRA coordinates. Rows go to
``benchmarks/results/codec_frontier.json`` (``codec_frontier_quick.json`` with ``--quick``) after every run.
"""

from __future__ import annotations

import argparse
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
METHODS = ("dp-lora", "dp-lora-r1", "dp-lora-r2", "dp-lora-r4", "codec", "codec-paper", "random-projection", "top-k",
           "powersgd")
RATIO_FREE = ("dp-lora", "dp-lora-r1", "dp-lora-r2", "dp-lora-r4", "powersgd")  # their bytes do not follow --ratios


def _ratio(text: str) -> float:
    return float(Fraction(text))


def _args(out: str, method: str, ratio: float, seed: int, quick: bool):
    from hf_drencoder import DRTrainingArguments
    from hf_drencoder.demo import DEMO_DEFAULTS

    kw = {**DEMO_DEFAULTS, "output_dir": out, "seed": seed, "data_seed": seed, "noise_seed": seed,
          "disable_tqdm": True, "logging_steps": 5}
    if quick:
        kw.update(per_device_train_batch_size=64, max_physical_batch_size=64, max_steps=3)
    if method.startswith("dp-lora-r"):
        r = int(method.rsplit("r", 1)[1])
        kw.update(default_lora_r=r, default_lora_alpha=2 * r)  # alpha / r = 2, as at r 8
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

        trainer._start_mechanism = start_and_spy

    def on_step(self) -> None:
        t = self.trainer
        if self.clean is None or t.codec is not None and getattr(t.args, "noise_space", "gradient") == "latent":
            return
        decoded = t.layout.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in t._params]).cpu()
        lora = torch.tensor([b.factor.startswith("lora") for b in t.layout.blocks for _ in range(b.numel)])
        c, d = self.clean.cpu()[lora], decoded[lora]
        self.cosines.append(float(c @ d / (c.norm() * d.norm()).clamp(min=1e-30)))
        self.clean = None


def run_one(data, method: str, ratio: float, seed: int, quick: bool) -> dict:
    from transformers import AutoModelForSequenceClassification, TrainerCallback

    from hf_drencoder import DRTrainer
    from hf_drencoder.codec.baselines import make_baseline
    from hf_drencoder.embedded import minilm_path
    from hf_drencoder.metrics import classification_compute_metrics

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data["num_labels"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        trainer = DRTrainer(model=model, args=_args(out, method, ratio, seed, quick), train_dataset=data["train"],
                            eval_dataset=data["heldout"], processing_class=data["tokenizer"],
                            compute_metrics=classification_compute_metrics())
        if method in ("random-projection", "top-k", "powersgd"):
            # the trainer has wrapped the model in LoRA: the baseline is made for that layout (no prior, no data)
            trainer._codec_spec = make_baseline(method, trainer.model, ratio, seed=seed)
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
        method=method, ratio=None if method in RATIO_FREE else ratio, seed=seed, quick=quick,
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


def _key(r):
    return (r["method"], r["ratio"], r["seed"], r["quick"])


def save(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "configuration": "hf-drencoder demo defaults, target epsilon 8",
                   "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)


def table(rows: list[dict]) -> str:
    lines = [f"{'method':<18} {'ratio':>6} {'seed':>4} {'bytes/step':>10} {'of full':>7} {'accuracy':>8} "
             f"{'macro-F1':>8} {'epsilon':>7} {'cos(dec,clean)':>14} {'wall s':>6}"]
    for r in sorted(rows, key=lambda r: (-r["uplink_bytes"], r["method"], r["seed"])):
        ratio = "-" if r["ratio"] is None else f"1/{round(1 / r['ratio'])}"
        cos = "-" if r["cosine_lora_mean"] is None else f"{r['cosine_lora_mean']:.3f}"
        lines.append(f"{r['method']:<18} {ratio:>6} {r['seed']:>4} {r['uplink_bytes']:>10} {r['uplink_ratio']:>7.3f} "
                     f"{r['accuracy']:>8.4f} {r['macro_f1']:>8.4f} {r['epsilon']:>7.3f} {cos:>14} {r['wall_s']:>6.0f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ratios", nargs="+", type=_ratio, default=[_ratio(x) for x in ("1/256", "1/64", "1/16", "1/4")],
                   help="latent ratios of the LoRA part (e.g. 1/64)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--heldout_samples", type=int, default=None, help="score on the first N held-out documents only")
    p.add_argument("--quick", action="store_true", help="3 steps of 64, 128 held-out documents: numbers mean nothing")
    p.add_argument("--out", default=None, help="results file")
    a = p.parse_args(argv)
    path = a.out or os.path.join(HERE, "results", "codec_frontier_quick.json" if a.quick else "codec_frontier.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)["rows"]
    data = load_data(128 if a.quick else a.heldout_samples)
    for seed in a.seeds:
        for method in a.methods:
            for ratio in [None] if method in RATIO_FREE else a.ratios:
                r = run_one(data, method, ratio if ratio is not None else 1.0, seed, a.quick)
                rows = [x for x in rows if _key(x) != _key(r)] + [r]
                save(path, rows)
                print(f"[codec_frontier {time.strftime('%H:%M:%S')}] {method} ratio {ratio} seed {seed}: accuracy "
                      f"{r['accuracy']:.4f} macro-F1 {r['macro_f1']:.4f} bytes {r['uplink_bytes']} "
                      f"cosine {r['cosine_lora_mean']}", flush=True)
    print(table(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
