"""Step time and memory of DRTrainer (DP on) against a plain Trainer, both training the same LoRA adapter.

Both trainers see the same Poisson batches (the plain Trainer is given DRTrainer's sampler with the same
seed), so the ratios are those of the private mechanism at equal batches. Each configuration runs in its own subprocess (so that peak memory is its own), alternating plain / DR for
``--rounds`` rounds; the ratio is of the medians of all measured steps (warm-up steps dropped). Memory is the
peak during training above the memory held before the first step: peak RSS on CPU, ``max_memory_allocated``
on CUDA.

    python benchmarks/step_overhead.py                   # CPU, the issue's configuration
    python benchmarks/step_overhead.py --device cuda --preset small medium

Writes benchmarks/results/step_overhead.json (``time_ratio`` and ``memory_ratio`` of the first preset at the
top level, every row under ``rows``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

PRESETS = {
    # the configuration named in the issue: hidden 256, 4 layers, seq 128, batch 16
    "small": dict(hidden=256, layers=4, heads=4, inter=688, vocab=32000, seq=128, batch=16),
    # a larger one for accelerators
    "medium": dict(hidden=1024, layers=8, heads=16, inter=2816, vocab=32000, seq=256, batch=32),
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _same_batches_trainer():
    """A plain Trainer fed the very Poisson batches DRTrainer draws (same sampler, same seed), so that the
    ratio measures the private mechanism, not the spread of Poisson batch sizes."""
    from torch.utils.data import DataLoader
    from transformers import Trainer

    from hf_drencoder.privacy import PoissonBatchSampler

    class SameBatchesTrainer(Trainer):
        def get_train_dataloader(self):
            n, b = len(self.train_dataset), self.args.per_device_train_batch_size
            sampler = PoissonBatchSampler(n, b / n, max(n // b, 1), 1, seed=self.args.seed)
            return self.accelerator.prepare(DataLoader(self.train_dataset, batch_sampler=sampler,
                                                       collate_fn=self.data_collator,
                                                       pin_memory=self.args.dataloader_pin_memory))

    return SameBatchesTrainer


def worker(kind: str, preset: str, device: str, steps: int, warmup: int, threads: int | None) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

    from hf_drencoder import DRTrainer, DRTrainingArguments

    if threads:
        torch.set_num_threads(threads)
    _SameBatchesTrainer = _same_batches_trainer()
    p = PRESETS[preset]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                      max_position_embeddings=p["seq"])
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    n = p["batch"] * 64
    ids = torch.randint(0, p["vocab"], (n, p["seq"]))
    # a plain list of examples: the benchmark needs no `datasets` (not installed on every accelerator image)
    ones = torch.ones(p["seq"], dtype=torch.long)
    ds = [{"input_ids": x, "attention_mask": ones, "labels": x} for x in ids]
    common = dict(output_dir=f"/tmp/step_overhead_{kind}", per_device_train_batch_size=p["batch"], max_steps=steps,
                  report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True, learning_rate=1e-4,
                  use_cpu=device == "cpu", dataloader_num_workers=0, seed=0)

    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    if kind == "plain":
        trainer = _SameBatchesTrainer(model=model, args=TrainingArguments(**common), train_dataset=ds, callbacks=[Timer()])
    else:
        args = DRTrainingArguments(**common, noise_multiplier=1.0, per_sample_max_grad_norm=1.0, noise_seed=0)
        trainer = DRTrainer(model=model, args=args, train_dataset=ds, callbacks=[Timer()])
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    trainer.train()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kind": kind, "step_times": times[warmup:], "memory_mb": peak - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", nargs="+", default=["small"], choices=list(PRESETS))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step_overhead.json"))
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "PRESET"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker[0], a.worker[1], a.device, a.steps, a.warmup, a.threads)))
        return

    rows = []
    for preset in a.preset:
        acc = {"plain": {"t": [], "m": []}, "dr": {"t": [], "m": []}}
        for _ in range(a.rounds):
            for kind in ("plain", "dr"):
                cmd = [sys.executable, __file__, "--worker", kind, preset, "--device", a.device,
                       "--steps", str(a.steps), "--warmup", str(a.warmup)]
                if a.threads:
                    cmd += ["--threads", str(a.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                if out.returncode or not line:
                    sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
                    raise SystemExit(f"worker {kind}/{preset} failed")
                r = json.loads(line[-1][7:])
                acc[kind]["t"] += r["step_times"]
                acc[kind]["m"].append(r["memory_mb"])
        t_plain, t_dr = statistics.median(acc["plain"]["t"]), statistics.median(acc["dr"]["t"])
        m_plain, m_dr = statistics.median(acc["plain"]["m"]), statistics.median(acc["dr"]["m"])
        rows.append({
            "preset": preset, **PRESETS[preset], "device": a.device, "steps_measured": len(acc["dr"]["t"]),
            "plain_step_s": t_plain, "dr_step_s": t_dr, "time_ratio": t_dr / t_plain,
            "plain_memory_mb": m_plain, "dr_memory_mb": m_dr, "memory_ratio": m_dr / m_plain,
        })

    import torch

    machine = (torch.cuda.get_device_name(0) if a.device == "cuda" else f"{platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} cores")
    print(f"\nDRTrainer (DP on, hooks) vs plain Trainer, LoRA r=8 on q,v of a Llama; device: {machine}")
    print(f"{'preset':<8} {'hidden':>6} {'layers':>6} {'seq':>4} {'batch':>5} {'plain s/step':>12} {'DR s/step':>10} "
          f"{'time x':>7} {'plain MB':>9} {'DR MB':>8} {'mem x':>6}")
    for r in rows:
        print(f"{r['preset']:<8} {r['hidden']:>6} {r['layers']:>6} {r['seq']:>4} {r['batch']:>5} {r['plain_step_s']:>12.4f} "
              f"{r['dr_step_s']:>10.4f} {r['time_ratio']:>7.3f} {r['plain_memory_mb']:>9.1f} {r['dr_memory_mb']:>8.1f} "
              f"{r['memory_ratio']:>6.3f}")
    result = {"time_ratio": rows[0]["time_ratio"], "memory_ratio": rows[0]["memory_ratio"], "device": machine,
              "torch": torch.__version__, "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
