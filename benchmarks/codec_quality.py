"""Quality of gradient codecs on REAL LoRA gradients, clean and differentially private.

For each model (MiniLM-L6 + LoRA(q, v) + head on Reuters-R8, the embedded default; a tiny causal Llama on a
synthetic Markov-chain language), the script:

1. releases stage-1 statistics with the Gaussian mechanism (recorded in a PrivacyAccountant),
2. runs a DP fine-tuning trajectory (GaussianGradientMechanism, expected batch 32, sigma 1, C 1) and at every
   step records the clean mean clipped gradient of a Poisson batch of expected size 256 and of a Poisson
   sub-batch of expected size 32 (the one the step trains on),
3. builds DP inputs ``clean + N(0, (sigma C / B)^2)`` at expected batch B = 32 (the mechanism's own release),
   256 and 2048, and
4. compares, at payloads 1/16, 1/64, 1/256: codecs built from every prior (paper, element, lowrank,
   temporal; MMSE decoding), raw (uncompressed), zero, a Gaussian random projection, top-k and PowerSGD.
   Every metric is measured against the CLEAN gradient of the same batch.

B = 2048 is emulated: per-sample gradients of 2048 examples per step do not fit the benchmark budget on two
CPU cores, so its signal is the B = 256 clean gradient and only the noise is that of B = 2048 (codecs get
the prior for the batch the signal came from). Run ``--quick`` for a smoke run (< 5 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_drencoder.codec import LoraLayout, build_prior, collect_gradient_statistics, latent_size, pretrain_codec  # noqa: E402
from hf_drencoder.codec.statistics import per_sample_gradients  # noqa: E402
from hf_drencoder.losses import infer_task  # noqa: E402
from hf_drencoder.privacy import (  # noqa: E402
    GaussianGradientMechanism,
    PoissonBatchSampler,
    PrivacyAccountant,
    clip_and_sum,
    gaussian_noise_like,
    make_generator,
)

RATIOS = (1 / 16, 1 / 64, 1 / 256)
BATCHES = (32, 256, 2048)
PRIOR_METHODS = ("codec_paper", "codec_element", "codec_lowrank", "codec_window", "codec_temporal", "codec_balanced", "codec_hybrid")
BASELINES = ("raw", "zero", "stats_mean", "randproj", "topk", "powersgd")


# ---------------------------------------------------------------------------------------------- models
def build_minilm(max_length: int):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_drencoder.embedded import load_reuters, minilm_path, tokenize_dataset

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS", lora_dropout=0.0))
    tok = AutoTokenizer.from_pretrained(path)
    train = tokenize_dataset(load_reuters("r8")["train"], tok, max_length)
    train.set_format("torch")

    def collate(rows):
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    return model, train, collate


def build_llama(n: int = 4000, length: int = 32, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64,
    )
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    # a sparse random Markov chain: a language with something to learn
    g = torch.Generator().manual_seed(seed)
    trans = torch.zeros(128, 128)
    for i in range(128):
        trans[i, torch.randperm(128, generator=g)[:4]] = torch.rand(4, generator=g) + 0.1
    trans /= trans.sum(1, keepdim=True)
    seqs = torch.zeros(n, length, dtype=torch.long)
    seqs[:, 0] = torch.randint(128, (n,), generator=g)
    for t in range(1, length):
        seqs[:, t] = torch.multinomial(trans[seqs[:, t - 1]], 1, generator=g).squeeze(1)
    data = [{"input_ids": s} for s in seqs]

    def collate(rows):
        ids = torch.stack([r["input_ids"] for r in rows])
        return {"input_ids": ids, "labels": ids.clone()}

    return model, data, collate


# ------------------------------------------------------------------------------------------ trajectory
def flat_per_sample(model, hooks, layout, dataset, collate, indices, task, micro=64):
    out = []
    for start in range(0, len(indices), micro):
        batch = collate([dataset[i] for i in indices[start : start + micro]])
        out.append(layout.flatten(per_sample_gradients(model, hooks, batch, task)))
    return torch.cat(out) if out else torch.zeros(0, layout.dim)


def collect_trajectory(model, dataset, collate, steps, pool_batch, train_batch, C, sigma, lr, seed, progress=True, every=1):
    """DP fine-tuning at expected batch ``train_batch``; every ``every`` steps (``steps`` records in all) the
    clean gradients at both batch sizes are recorded."""
    from opacus.grad_sample import GradSampleHooks
    from tqdm.auto import tqdm

    layout = LoraLayout.from_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    task = infer_task(model)
    n = len(dataset)
    total = (steps - 1) * every + 1
    sampler = PoissonBatchSampler(n, pool_batch / n, steps_per_epoch=total, seed=seed + 1)
    sub_gen = torch.Generator().manual_seed(seed + 2)
    mech = GaussianGradientMechanism(params, C, sigma, train_batch, noise_seed=seed + 3)
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    clean_pool, clean_sub, dp_sub, step_times = [], [], [], []
    try:
        for step, indices in enumerate(tqdm(sampler, total=total, desc="trajectory", disable=not progress)):
            record = step % every == 0
            # a Bernoulli(train/pool) subset of a Poisson(pool/n) batch is a Poisson(train/n) batch
            keep = torch.rand(len(indices), generator=sub_gen) < train_batch / pool_batch
            sub_idx = [i for i, k in zip(indices, keep.tolist()) if k]
            rest_idx = [i for i, k in zip(indices, keep.tolist()) if not k]
            t0 = time.perf_counter()
            g_sub = flat_per_sample(model, hooks, layout, dataset, collate, sub_idx, task)
            sub_list = layout.unflatten(g_sub) if len(sub_idx) else None
            if sub_list is not None:
                mech.add_per_sample(sub_list)
            dp = mech.release()
            step_times.append(time.perf_counter() - t0)
            if not record:
                for p, g in zip(params, dp):
                    p.grad = g.to(p.dtype)
                opt.step()
                opt.zero_grad(set_to_none=True)
                continue
            # the other examples of the B=256 batch; computed before .grad is set (backward accumulates into it)
            g_rest = flat_per_sample(model, hooks, layout, dataset, collate, rest_idx, task)
            s_sub = layout.flatten(clip_and_sum(sub_list, C)[0]) if sub_list is not None else torch.zeros(layout.dim)
            s_rest = layout.flatten(clip_and_sum(layout.unflatten(g_rest), C)[0]) if len(rest_idx) else torch.zeros(layout.dim)
            clean_sub.append(s_sub / train_batch)
            clean_pool.append((s_sub + s_rest) / pool_batch)
            dp_sub.append(layout.flatten([g.detach().clone() for g in dp]))
            for p, g in zip(params, dp):
                p.grad = g.to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        hooks.cleanup()
    return {
        "clean_pool": torch.stack(clean_pool),
        "clean_sub": torch.stack(clean_sub),
        "dp_sub": torch.stack(dp_sub),
        "step_time": sorted(step_times)[len(step_times) // 2],
    }


# ------------------------------------------------------------------------------------------- baselines
class RandomProjection:
    """Gaussian random projection, block-diagonal (blocks of 4096 values) so that it fits in memory, rows
    orthonormalised; decoding is the orthogonal projection ``P^T z``."""

    def __init__(self, dim, k, seed=0, block=4096):
        g = torch.Generator().manual_seed(seed)
        self.blocks = []
        nb = math.ceil(dim / block)
        ks = [k // nb + (1 if i < k % nb else 0) for i in range(nb)]
        for i in range(nb):
            lo, hi = i * block, min(dim, (i + 1) * block)
            kb = min(ks[i], hi - lo)
            m = torch.randn(hi - lo, max(kb, 1), generator=g)
            q, _ = torch.linalg.qr(m)
            self.blocks.append((lo, hi, q[:, :kb]))
        self.k = sum(q.shape[1] for _, _, q in self.blocks)

    def roundtrip(self, y):
        out = torch.zeros_like(y)
        for lo, hi, q in self.blocks:
            out[lo:hi] = q @ (q.t() @ y[lo:hi])
        return out


def topk_roundtrip(y, k):
    kk = max(1, k // 2)  # each kept value also costs a 4-byte index
    idx = y.abs().topk(kk).indices
    out = torch.zeros_like(y)
    out[idx] = y[idx]
    return out


class PowerSGD:
    """PowerSGD-style rank-r compression with warm start. Tensors of equal shape are stacked along their
    short side (LoRA factors of all layers into one matrix), ranks split the budget by size."""

    def __init__(self, layout, k, seed=0):
        groups = {}
        for b, sl in layout.block_slices():
            if len(b.shape) == 2:
                groups.setdefault(b.shape, []).append(sl)
        self.groups = []
        total = sum(len(v) * math.prod(s) for s, v in groups.items())
        used = 0
        g = torch.Generator().manual_seed(seed)
        for shape, slices in sorted(groups.items(), key=lambda kv: -len(kv[1]) * math.prod(kv[0])):
            m, n = shape
            rows, cols = (m * len(slices), n) if m <= n else (m, n * len(slices))
            budget = k * len(slices) * m * n / total
            r = int(budget // (rows + cols))
            if r == 0 and k - used >= rows + cols:
                r = 1
            r = min(r, min(rows, cols))
            if r == 0:
                continue
            used += r * (rows + cols)
            self.groups.append({"shape": shape, "slices": slices, "stack_rows": m <= n, "rank": r, "q": torch.randn(cols, r, generator=g)})
        self.payload = used

    def roundtrip(self, y):
        out = torch.zeros_like(y)
        for grp in self.groups:
            mats = [y[sl].reshape(grp["shape"]) for sl in grp["slices"]]
            mat = torch.cat(mats, 0 if grp["stack_rows"] else 1)
            p, _ = torch.linalg.qr(mat @ grp["q"])
            q = mat.t() @ p
            grp["q"] = q.clone()  # warm start for the next step, as PowerSGD does
            approx = p @ q.t()
            parts = approx.split(grp["shape"][0] if grp["stack_rows"] else grp["shape"][1], 0 if grp["stack_rows"] else 1)
            for sl, part in zip(grp["slices"], parts):
                out[sl] = part.reshape(-1)
        return out


# ------------------------------------------------------------------------------------------- evaluation
def cosine(a, b):
    na, nb = a.norm(), b.norm()
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def metrics(est, clean, lora_mask=None):
    cos = cosine(est, clean)
    err = float((est - clean).norm() / clean.norm())
    if lora_mask is None:
        return cos, err
    return cos, err, cosine(est[lora_mask], clean[lora_mask])


def gather(name, model, dataset, collate, args, log):
    """Stage-1 statistics and the gradient trajectory of one model (the expensive part)."""
    layout = LoraLayout.from_model(model)
    accountant = PrivacyAccountant(delta=1e-5, accountant="prv")
    t0 = time.perf_counter()
    stats = collect_gradient_statistics(
        model, dataset, collate, max_grad_norm=args.max_grad_norm, noise_multiplier=args.stats_noise_multiplier,
        expected_batch_size=args.stats_batch, num_batches=args.stats_batches, accountant=accountant,
        seed=args.seed, noise_seed=args.seed + 10, progress=not args.no_progress,
    )
    log(f"[{name}] layout: {layout.describe()}; stage-1 statistics {stats.nbytes} bytes "
        f"({stats.nbytes / (4 * layout.dim):.2f} raw gradients), epsilon(stage 1) = {accountant.epsilon():.3f} "
        f"at delta 1e-5, {time.perf_counter() - t0:.0f}s")
    traj = collect_trajectory(model, dataset, collate, args.steps, 256, 32, args.max_grad_norm, args.noise_multiplier,
                              args.lr, args.seed, not args.no_progress, every=args.record_every)
    return {"stats": stats, "traj": traj, "history": accountant.history, "epsilon": accountant.epsilon()}


def evaluate_model(name, gathered, args, log):
    stats, traj = gathered["stats"], gathered["traj"]
    layout = stats.layout
    D = layout.dim
    C, sigma = args.max_grad_norm, args.noise_multiplier
    T = traj["clean_pool"].shape[0]
    consec = [metrics(traj["clean_pool"][t], traj["clean_pool"][t - 1])[0] for t in range(1, T)]
    log(f"[{name}] {T} steps, DP step (B=32) {traj['step_time']:.2f}s; consecutive clean cosine (B=256) "
        f"{sum(consec) / max(len(consec), 1):.3f}; clean grad norm (B=256) {traj['clean_pool'].norm(dim=1).mean():.3f}")

    lora_mask = torch.zeros(D, dtype=torch.bool)
    for b, sl in layout.block_slices():
        lora_mask[sl] = b.factor.startswith("lora")
    head_share = float(traj["clean_pool"][:, ~lora_mask].pow(2).sum() / traj["clean_pool"].pow(2).sum())
    log(f"[{name}] share of clean gradient energy in modules_to_save heads: {head_share:.3f}")
    noise_gen = make_generator("cpu", args.seed + 20)
    inputs = {}
    for B in BATCHES:
        signal = traj["clean_sub"] if B == 32 else traj["clean_pool"]
        if B == 32:
            noisy = traj["dp_sub"]  # the mechanism's own release
        else:
            noisy = signal + torch.stack([gaussian_noise_like(signal[0], sigma * C / B, noise_gen) for _ in range(T)])
        inputs[B] = (signal, noisy, 32 if B == 32 else 256)

    rows = []
    priors = {}
    for kind in ("paper", "element", "lowrank"):
        for sb in (32, 256):
            priors[(kind, sb)] = build_prior(stats, kind, expected_batch_size=sb, drift=args.drift)
    # the stage-1 mean alone, sending nothing: what the codec adds beyond it is what its latent carries
    stats_mean = {sb: priors[(args.temporal_base, sb)].mean for sb in (32, 256)}
    for ratio in RATIOS:
        k = latent_size(D, ratio)
        window = min(args.temporal_window, k // 2)
        rp = RandomProjection(D, k, seed=args.seed)
        for B in BATCHES:
            signal, noisy, signal_batch = inputs[B]
            s = sigma * C / B
            for inp_name, data, s_in in (("clean", signal, 0.0), ("dp", noisy, s)):
                res = {}
                codecs = {
                    "codec_paper": pretrain_codec(priors[("paper", signal_batch)], ratio, progress=False, val_size=8, seed=args.seed, temporal_rho=0.0, lora_rank=0),
                    "codec_element": pretrain_codec(priors[("element", signal_batch)], ratio, progress=False, val_size=8, seed=args.seed, temporal_rho=0.0, lora_rank=0),
                    "codec_lowrank": pretrain_codec(priors[("lowrank", signal_batch)], ratio, progress=False, val_size=8, seed=args.seed, temporal_rho=0.0, lora_rank=0),
                    "codec_window": pretrain_codec(
                        priors[(args.temporal_base, signal_batch)], ratio, progress=False, val_size=8, seed=args.seed,
                        temporal_window=window, temporal_gain=args.temporal_gain, temporal_mean=args.temporal_mean,
                        lora_rank=0,
                    ),
                    "codec_temporal": pretrain_codec(
                        priors[(args.temporal_base, signal_batch)], ratio, progress=False, val_size=8, seed=args.seed,
                        temporal_rho=args.temporal_rho, lora_rank=0,
                    ),
                    "codec_balanced": pretrain_codec(
                        priors[(args.temporal_base, signal_batch)], ratio, progress=False, val_size=8, seed=args.seed,
                        temporal_rho=args.temporal_rho, balance=1.0, lora_rank=0,
                    ),
                    "codec_hybrid": pretrain_codec(  # the default: temporal prior + rank-1 part for LoRA factors
                        priors[(args.temporal_base, signal_batch)], ratio, progress=False, val_size=8, seed=args.seed,
                        temporal_rho=args.temporal_rho, lora_rank=args.lora_rank,
                    ),
                }
                psgd = PowerSGD(layout, k, seed=args.seed)
                for t in range(T):
                    y, clean = data[t], signal[t]
                    outs = {
                        "raw": y,
                        "zero": torch.zeros_like(y),
                        "stats_mean": stats_mean[signal_batch],
                        "randproj": rp.roundtrip(y),
                        "topk": topk_roundtrip(y, k),
                        "powersgd": psgd.roundtrip(y),
                    }
                    for m, codec in codecs.items():
                        z = codec.encode(y, s_in)
                        outs[m] = codec.decode(z, s_in)
                        codec.observe(outs[m])
                    for m, est in outs.items():
                        res.setdefault(m, []).append(metrics(est, clean, lora_mask))
                payload = {"raw": 4 * D, "zero": 0, "stats_mean": 0, "randproj": 4 * rp.k, "topk": 8 * max(1, k // 2), "powersgd": 4 * psgd.payload}
                for m, vals in res.items():
                    if m == "raw" and ratio != RATIOS[0]:
                        continue  # uncompressed: one row per batch and input, not one per ratio
                    cos = sum(v[0] for v in vals) / len(vals)
                    err = sum(v[1] for v in vals) / len(vals)
                    cos_lora = sum(v[2] for v in vals) / len(vals)
                    rows.append({
                        "model": name, "method": m, "ratio": 1.0 if m == "raw" else ratio, "batch": B, "input": inp_name,
                        "cosine": round(cos, 4), "rel_error": round(err, 4), "cosine_lora": round(cos_lora, 4),
                        "payload_bytes": payload.get(m, 4 * codecs[m].latent_dim if m in codecs else 0),
                    })
    return {
        "rows": rows,
        "stats_bytes": stats.nbytes,
        "raw_gradient_bytes": 4 * D,
        "stats_epsilon": gathered["epsilon"],
        "stats_history": gathered["history"],
        "trajectory_dp_step_seconds": traj["step_time"],

        "consecutive_cosine": sum(consec) / max(len(consec), 1),
        "dim": D,
        "steps": T,
        "record_every": args.record_every,
        "head_energy_share": head_share,
    }


def measure_time(name, stats, args, log, reps=5):
    """Median seconds of one DP step at expected batch 32 and of one roundtrip of the default codec (1/64),
    measured interleaved in the same process so that both see the same machine load."""
    from opacus.grad_sample import GradSampleHooks

    if name == "minilm":
        model, data, collate = build_minilm(args.max_length)
    else:
        model, data, collate = build_llama(seed=args.seed)
    layout = LoraLayout.from_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    task = infer_task(model)
    prior = build_prior(stats, args.temporal_base, expected_batch_size=32, drift=args.drift)
    codec = pretrain_codec(prior, 1 / 64, progress=False, val_size=8, temporal_rho=args.temporal_rho, lora_rank=args.lora_rank)
    mech = GaussianGradientMechanism(params, args.max_grad_norm, args.noise_multiplier, 32, noise_seed=0)
    opt = torch.optim.SGD(params, lr=0.0)
    sampler = iter(PoissonBatchSampler(len(data), 32 / len(data), steps_per_epoch=reps + 1, seed=args.seed + 5))
    s = args.noise_multiplier * args.max_grad_norm / 32
    model.train()
    hooks = GradSampleHooks(model, batch_first=True, loss_reduction="sum", strict=False)
    step_t, codec_t = [], []
    try:
        for i in range(reps + 1):
            idx = next(sampler)
            t0 = time.perf_counter()
            g = flat_per_sample(model, hooks, layout, data, collate, idx, task)
            if len(idx):
                mech.add_per_sample(layout.unflatten(g))
            dp = mech.release()
            for p, d in zip(params, dp):
                p.grad = d
            opt.step()
            t1 = time.perf_counter()
            codec.roundtrip(dp, s)
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            if i:  # the first is a warm-up
                step_t.append(t1 - t0)
                codec_t.append(t2 - t1)
    finally:
        hooks.cleanup()
    step, cod = sorted(step_t)[len(step_t) // 2], sorted(codec_t)[len(codec_t) // 2]
    log(f"[{name}] DP step (B=32) {step:.3f}s, codec roundtrip (1/64) {cod * 1000:.1f} ms: {100 * cod / step:.2f}% of a step")
    return {"dp_step_seconds": step, "codec_seconds": cod, "codec_time_fraction": cod / step}


def mlp_check(stats, args, log):
    """Does a learned nonlinear residual beat MMSE on held-out synthetic data? (the rule for keeping it)"""
    prior = build_prior(stats, args.temporal_base, expected_batch_size=256, drift=args.drift)
    s = args.noise_multiplier * args.max_grad_norm
    codec = pretrain_codec(prior, 1 / 64, decoder="mlp", noise_std=(s / 2048, s / 32), max_steps=args.mlp_steps,
                           val_size=64, batch_size=32, progress=False, seed=args.seed)
    rep = codec.pretrain_report
    log(f"mlp residual: MMSE held-out {rep['mmse_heldout']:.4f}, learned {rep['mlp_best_heldout']:.4f} -> kept={rep['mlp_kept']}")
    return rep


def print_table(result, ratio, log):
    rows = [r for r in result["rows"] if r["ratio"] in (ratio, 1.0)]
    methods = sorted({r["method"] for r in rows}, key=lambda m: (BASELINES + PRIOR_METHODS).index(m))
    header = f"{'method':16s} " + " ".join(f"{'clean' if i == 'clean' else 'DP'} B{b:<5d}" for b in BATCHES for i in ("clean", "dp"))
    log(header)
    for m in methods:
        cells = []
        for b in BATCHES:
            for i in ("clean", "dp"):
                r = [x for x in rows if x["method"] == m and x["batch"] == b and x["input"] == i]
                cells.append(f"{r[0]['cosine']:>11.3f}" if r else f"{'':>11s}")
        log(f"{m:16s} " + " ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few steps, short sequences (< 5 min)")
    ap.add_argument("--models", default="minilm,llama")
    ap.add_argument("--steps", type=int, default=None, help="recorded steps")
    ap.add_argument("--record-every", type=int, default=None, help="training steps per recorded step")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--noise-multiplier", type=float, default=1.0)
    ap.add_argument("--stats-noise-multiplier", type=float, default=1.0)
    ap.add_argument("--stats-batch", type=int, default=256)
    ap.add_argument("--stats-batches", type=int, default=None)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--drift", type=float, default=0.25)
    ap.add_argument("--temporal-base", default="lowrank")
    ap.add_argument("--temporal-window", type=int, default=8)
    ap.add_argument("--temporal-gain", type=float, default=1.0)
    ap.add_argument("--temporal-mean", type=float, default=0.0)
    ap.add_argument("--temporal-rho", type=float, default=0.8)
    ap.add_argument("--lora-rank", type=int, default=1)
    ap.add_argument("--mlp-steps", type=int, default=None, help="steps of the learned-residual check (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "codec_quality.json"))
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "..", "docs", "codec_quality.png"))
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--cache", default=None, help="folder to keep/reuse the collected gradients (re-run the analysis only)")
    args = ap.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 12)
    args.record_every = args.record_every or (1 if args.quick else 4)
    args.max_length = args.max_length or 32
    args.stats_batches = args.stats_batches or (1 if args.quick else 3)
    args.mlp_steps = args.mlp_steps if args.mlp_steps is not None else (0 if args.quick else 200)
    torch.manual_seed(args.seed)
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t_start = time.perf_counter()
    results = {}
    for name in args.models.split(","):
        cache = os.path.join(args.cache, f"{name}.pt") if args.cache else None
        if cache and os.path.exists(cache):
            gathered = torch.load(cache, weights_only=False)
            log(f"[{name}] gradients from cache {cache}")
        else:
            if name == "minilm":
                model, data, collate = build_minilm(args.max_length)
            elif name == "llama":
                model, data, collate = build_llama(seed=args.seed)
            else:
                raise SystemExit(f"unknown model {name}")
            gathered = gather(name, model, data, collate, args, log)
            if cache:
                os.makedirs(args.cache, exist_ok=True)
                torch.save(gathered, cache)
        results[name] = evaluate_model(name, gathered, args, log)
        results[name].update(measure_time(name, gathered["stats"], args, log))
        if args.mlp_steps:
            results[name]["mlp_residual"] = mlp_check(gathered["stats"], args, log)
        log(f"\n[{name}] cosine to the clean gradient at payload 1/64 (raw = uncompressed):")
        print_table(results[name], 1 / 64, log)
        log("")
    main_name = "minilm" if "minilm" in results else next(iter(results))
    out = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "main_model": main_name,
        "stats_bytes": results[main_name]["stats_bytes"],
        "raw_gradient_bytes": results[main_name]["raw_gradient_bytes"],
        "codec_time_fraction": results[main_name]["codec_time_fraction"],
        "rows": [r for res in results.values() for r in res["rows"]],
        "models": {k: {kk: vv for kk, vv in v.items() if kk != "rows"} for k, v in results.items()},
        "wall_seconds": time.perf_counter() - t_start,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    log(f"wrote {args.out} ({out['wall_seconds']:.0f}s)")
    try:
        plot(out, args.plot)
        log(f"wrote {args.plot}")
    except ImportError:
        log("matplotlib not installed: no plot (pip install matplotlib)")
    return out


def plot(out, path):
    """DP input, cosine to the clean gradient against compression: whole gradient (top), LoRA factors only
    (bottom, the classifier head excluded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = out["main_model"]
    rows = [r for r in out["rows"] if r["model"] == name and r["input"] == "dp"]
    methods = ["randproj", "topk", "powersgd"] + list(PRIOR_METHODS)
    fig, axes = plt.subplots(2, len(BATCHES), figsize=(4.2 * len(BATCHES), 6.8), sharey="row")
    for row, key in enumerate(("cosine", "cosine_lora")):
        for ax, B in zip(axes[row], BATCHES):
            for ref, style, label in (("raw", "--", "raw DP (uncompressed)"), ("stats_mean", ":", "stage-1 mean (nothing sent)")):
                val = [r[key] for r in rows if r["method"] == ref and r["batch"] == B]
                ax.axhline(val[0], color="k" if ref == "raw" else "gray", ls=style, lw=1, label=label)
            for m in methods:
                pts = sorted((r["ratio"], r[key]) for r in rows if r["method"] == m and r["batch"] == B)
                ax.plot([1 / p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                        ls="-" if m.startswith("codec") else ":")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.set_title(f"{name}, DP input, batch {B}" + ("" if key == "cosine" else ", LoRA factors only"), fontsize=9)
            if row == 1:
                ax.set_xlabel("compression (gradient size / payload)")
        axes[row][0].set_ylabel("cosine to the clean " + ("gradient" if key == "cosine" else "LoRA gradient"))
    axes[0][-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
