"""Federated defaults on the embedded MiniLM-L6 + Reuters-R8: local optimizer, server optimizer, DP at epsilon 8.

    python benchmarks/federated_defaults.py --plan tune        # local settings, on 85/15 of the TRAIN split
    python benchmarks/federated_defaults.py --plan final       # the headline rows on the test split
    python benchmarks/federated_defaults.py --plan population  # 1,000 parties, ~100 per round, epsilon 8 (see below)
    python benchmarks/federated_defaults.py --plan codec       # the population setting with the subspace codec
    python benchmarks/federated_defaults.py --only NAME ...    # some rows of a plan (names: the table's first column)
    python benchmarks/federated_defaults.py --table            # print the table of what was measured
    python benchmarks/federated_defaults.py --markdown         # the test rows grouped over seeds (docs/federated.md)
    python benchmarks/federated_defaults.py --markdown --split tune   # the held-out rows so (docs/codec.md, federated)

Every row is 100 parties (``--plan population``: 1,000), a Dirichlet(0.5) split of the train rows by label
(``partition_seed`` = the row's seed), Poisson party sampling at ~10 per round, and the model of the
``hf-drencoder federated`` defaults (`hf_drencoder.federated.cli.FEDERATED_DEFAULTS`: 32 tokens, LoRA on query
and value of the top two encoder layers) unless the row says otherwise. ``tune`` rows train on 85% of the train
split and are scored on the other 15% (``train_test_split(test_size=0.15, seed=1234)``); ``final`` rows train on
the whole train split and are scored on the whole test split (2,189 documents). Seeds: ``seed`` = ``sampling_seed``
= ``noise_seed`` = ``partition_seed``, so rows with the same seed see the same parties, batches and noise.

``--plan population``: 1,000 parties of 5-6 rows each (``partition="dirichlet_equal_size"``: equal sizes, a
Dirichlet(0.5) label mix per party), ~100 per round, 5 local AdamW steps, server lr 5, epsilon 8 with
``noise_shares=100`` (each party adds 1/100 of the aggregate's noise variance; docs/federated.md). The tune rows
pick the LoRA rank (8, 2, 1) and the rounds (20, 40) on the held-out split (server lr 5; server lr 1 stayed at the majority class after 10 rounds); ``population-eps8-shares1-s0`` is the same run with every message carrying the full noise,
and ``population-nodp-s0`` the same run without DP. Further tune rows try more progress per round at the same
epsilon: server momentum, a linearly decayed server lr, and FedSGD + FedAdam (one SGD step per party, Adam at the
server), with its clipping norm, rank, FFA-LoRA, beta1 and moving averages of the iterates (``IterateAverages``,
the decays in a row's ``ema``, their scores in ``ema_results``); and the same rows over 2,000 or 4,000 smaller parties (``-p2000``, ``-p4000``: a lower sampling
rate at ~100 per round, so less noise for the same epsilon).

``--plan codec``: the population setting on the held-out split, 20 rounds, LoRA r 2 (``population-tune-slr5-r2``
is the same without a codec), with ``codec="subspace"``: its unbiased decoder and the latent clipped at
``C sqrt(k/d)`` (0.5 at 1/4, 0.25 at 1/16), and ``history=0`` (a fresh random projection every round, the linear
baseline at equal bytes; top-k and PowerSGD are not linear and cannot be aggregated). The two 40-round rows are the
first attempt (projection decoder, C 1); they were stopped at the majority class and have no result. Bytes per
party per round are in ``uplink_bytes_per_party``.

A run of R rounds is evaluated every 10 rounds, so a 20-round non-private row also gives its 10-round figure;
a DP row is calibrated for its own number of rounds (a 20-round DP row spends epsilon 8 over 20 rounds).
Rows are appended to ``benchmarks/results/federated_defaults.json`` as they finish (``--out`` to change it);
rows already there are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "federated_defaults.json")

# what every row starts from; a row overrides some of these
BASE = dict(parties=100, per_round=10, partition="dirichlet", alpha=0.5, rounds=10, epsilon=None, max_length=32, top_layers=2,
            local_optimizer="adamw", local_lr=5e-3, local_steps=10, local_batch=16, server_optimizer="fedavg",
            server_lr=1.0, clip=1.0, seed=0, split="test")


POPULATION = dict(parties=1000, per_round=100, partition="dirichlet_equal_size", epsilon=8.0, rounds=20, local_steps=5,
                  noise_shares=100, server_lr=5.0)
POPULATION_FINAL = dict(POPULATION, lora_r=2, rounds=40)
# central DP training as a federation: one SGD step per party on all its rows (lr 1: its gradient), Adam at the server
FEDSGD = dict(POPULATION, lora_r=2, local_optimizer="sgd", local_lr=1.0, local_steps=1, server_optimizer="fedadam",
              server_lr=5e-2)


def _row(name, **kw):
    return dict(BASE, name=name, **kw)


def _codec_row(d: int, tag: str = "", seed: int = 0, **options):
    """The population tune row (LoRA r 2, 20 rounds) with the subspace codec at 1/d: unbiased decoder, latent clip
    C sqrt(1/d) with C = 1."""
    clip = (1 / d) ** 0.5
    return _row(f"population-tune-r2-r20-subspace-1/{d}-unbiased-c{clip:g}{tag}", split="tune", seed=seed, codec="subspace",
                codec_ratio=1 / d, codec_options=dict(scale="unbiased", **{"head_share": None, **options}), parallel_parties=30,
                **dict(POPULATION, lora_r=2, clip=clip))


PLANS = {
    # local settings, non-private, scored on the held-out 15% of the train split
    "tune": [
        _row("sgd-0.05x5", split="tune", local_optimizer="sgd", local_lr=0.05, local_steps=5),
        _row("adamw-2e-3x10", split="tune", local_lr=2e-3),
        _row("adamw-5e-3x10", split="tune"),
        _row("adamw-1e-2x10", split="tune", local_lr=1e-2),
        _row("adamw-5e-3x20", split="tune", local_steps=20),
        _row("adamw-5e-3x10-b32", split="tune", local_batch=32),
        _row("fedadam-1e-2", split="tune", server_optimizer="fedadam", server_lr=1e-2),
        _row("fedadam-3e-2", split="tune", server_optimizer="fedadam", server_lr=3e-2),
    ],
    # headline rows on the test split (seeds 0, 1, 2)
    "final": [
        *[_row(f"default-nodp-s{s}", seed=s) for s in (0, 1, 2)],
        *[_row(f"default-eps8-s{s}", epsilon=8.0, seed=s) for s in (0, 1, 2)],
        *[_row(f"fedadam-nodp-s{s}", server_optimizer="fedadam", server_lr=1e-2, seed=s) for s in (0, 1, 2)],
        *[_row(f"fedadam-3e-2-nodp-s{s}", server_optimizer="fedadam", server_lr=3e-2, seed=s) for s in (0, 1)],
        *[_row(f"fedadam-3e-2-eps8-s{s}", epsilon=8.0, server_optimizer="fedadam", server_lr=3e-2, seed=s) for s in (0, 1)],
        *[_row(f"default-nodp-r20-s{s}", rounds=20, seed=s) for s in (0, 1)],
        *[_row(f"fedadam-eps8-s{s}", epsilon=8.0, server_optimizer="fedadam", server_lr=1e-2, seed=s) for s in (0, 1, 2)],
        *[_row(f"default-eps8-r20-s{s}", epsilon=8.0, rounds=20, seed=s) for s in (0, 1)],
        _row("old-sgd-nodp-s0", local_optimizer="sgd", local_lr=0.05, local_steps=5),
    ],
    # 1,000 parties of 5-6 rows (equal sizes, Dirichlet(0.5) label mix each), ~100 per round, epsilon 8; the tune rows
    # pick the number of rounds on the held-out 15% of train, the test rows use it
    "population": [
        _row("population-tune-slr5", split="tune", **POPULATION),
        _row("population-tune-slr5-r2", split="tune", **dict(POPULATION, lora_r=2)),
        _row("population-tune-slr5-r2-r40", split="tune", **dict(POPULATION, lora_r=2, rounds=40)),
        _row("population-tune-slr5-r1-r40", split="tune", **dict(POPULATION, lora_r=1, rounds=40)),
        # the chosen row over 2,000 parties of 2-3 rows or 4,000 of 1-2, still ~100 per round: q 0.05 or 0.025
        # instead of 0.1, so sigma 0.52 or 0.46 instead of 0.63 for the same epsilon over 40 rounds, at fewer rows
        # per round
        *[_row(f"population-tune-slr5-r2-r40-p{n}", split="tune", parallel_parties=30,
               **dict(POPULATION, lora_r=2, rounds=40, parties=n)) for n in (2000, 4000)],
        # 2,000 parties train 4x faster than 1,000 (fewer rows each): room for 80 rounds in the same time
        _row("population-tune-slr5-r2-r80-p2000", split="tune", parallel_parties=30,
             **dict(POPULATION, lora_r=2, rounds=80, parties=2000)),
        # FFA-LoRA (lora_freeze_a: A frozen, only B and the head sent) against population-tune-slr5-r2: at r 2 it sends
        # 6,152 values instead of 9,224, at r 4 the same 9,224 with twice the rank of B
        *[_row(f"population-tune-slr5-ffa-r{r}", split="tune", parallel_parties=30, ffa=True, **dict(POPULATION, lora_r=r))
          for r in (2, 4)],
        # the ceiling of this population's training: population-tune-slr5-r2 without DP
        _row("population-tune-slr5-r2-nodp", split="tune", parallel_parties=30, **dict(POPULATION, lora_r=2, epsilon=None)),
        # without DP this population reaches 0.838 in 20 rounds, under the 0.85 target: more progress per round,
        # at the same epsilon (the server lr is post-processing; more local steps change only the party's update)
        _row("population-tune-slr10-r2", split="tune", parallel_parties=30, **dict(POPULATION, lora_r=2, server_lr=10.0)),
        _row("population-tune-slr5-r2-ls10", split="tune", parallel_parties=30, **dict(POPULATION, lora_r=2, local_steps=10)),
        # FFA wants a larger rate in central training (docs/utility.md): the same at local lr 1e-2
        _row("population-tune-slr5-ffa-r2-llr1e-2", split="tune", parallel_parties=30, ffa=True,
             **dict(POPULATION, lora_r=2, local_lr=1e-2)),
        # server momentum (FedAvgM: b <- mu b + update, x <- x + lr b) averages the noise of about 1/(1 - mu) rounds;
        # lr 0.5 at mu 0.9 has the effective rate of the plain run at 5, lr 1 that of 10
        *[_row(f"population-tune-slr{lr:g}-m0.9-r2", split="tune", parallel_parties=30,
               **dict(POPULATION, lora_r=2, server_lr=lr, server_momentum=0.9)) for lr in (0.5, 1.0)],
        # the server lr decayed linearly over the rounds (lr in the first, lr / R in the last): the noise of the
        # last rounds, which the final adapter keeps, is scaled down; from 5 (mean rate 2.6) and from 10 (5.3)
        *[_row(f"population-tune-slr{lr:g}-linear-r2", split="tune", parallel_parties=30,
               **dict(POPULATION, lora_r=2, server_lr=lr, server_lr_schedule="linear")) for lr in (5.0, 10.0)],
        # FEDSGD: each party sends one SGD step on all its rows (its clipped gradient), and the server runs Adam on
        # the noised mean (FedAdam), as central DP-Adam does on a noised batch gradient; local AdamW instead moves every coordinate by about its lr whatever the gradient, so the mean of
        # 100 parties' updates is closer to a vote than to the population's gradient
        *[_row(f"population-tune-fedsgd-fedadam{lr:g}-r2", split="tune", parallel_parties=30,
               **dict(FEDSGD, server_lr=lr)) for lr in (2e-2, 5e-2)],
        # the same over 80 rounds (the central recipe's 80 steps; epsilon 8 over all of them)
        *[_row(f"population-tune-fedsgd-fedadam{lr:g}-r2-r80", split="tune", parallel_parties=30,
               **dict(FEDSGD, server_lr=lr, rounds=80)) for lr in (5e-2, 1e-1)],
        # a party's gradient shrinks as the loss falls while the noise stays at sigma C: a smaller C keeps more
        # of the gradients clipped, so their mean keeps its size against the noise (Adam does not see the scale)
        *[_row(f"population-tune-fedsgd-fedadam0.05-r2-c{c:g}", split="tune", parallel_parties=30,
               **dict(FEDSGD, clip=c)) for c in (0.3, 0.1)],
        # ... but FedAdam's tau (1e-3) is then close to the noise per coordinate (0.0082 C), which shrinks its steps:
        # the same with tau scaled with C, so that only the clipping differs
        *[_row(f"population-tune-fedsgd-fedadam0.05-r2-c{c:g}-tau{c * 1e-3:g}", split="tune", parallel_parties=30,
               **dict(FEDSGD, clip=c, server_tau=c * 1e-3)) for c in (0.3, 0.1)],
        # the ceiling of that training: the same without DP
        _row("population-tune-fedsgd-fedadam0.05-r2-nodp", split="tune", parallel_parties=30,
             **dict(FEDSGD, epsilon=None)),
        # FFA-LoRA (A frozen), as in central training, where it beats A trained: r 2 (6,152 coordinates with the head)
        # and r 8 (15,368: the central configuration)
        *[_row(f"population-tune-fedsgd-fedadam0.05-ffa-r{r}", split="tune", parallel_parties=30, ffa=True,
               **dict(FEDSGD, lora_r=r)) for r in (2, 8)],
        _row("population-tune-fedsgd-fedadam0.05-r8", split="tune", parallel_parties=30,
             **dict(FEDSGD, lora_r=8)),
        # FedAdam's first moment averages the noise of about 1/(1 - beta1) rounds: 0.9 (its default) against 0.97;
        # and, as a diagnostic, moving averages of the global adapter scored at the end (IterateAverages), 80 rounds
        *[_row(f"population-tune-fedsgd-fedadam0.05-b{b1:g}-r2-r80-ema", split="tune", parallel_parties=30,
               ema=(0.8, 0.9, 0.95), **dict(FEDSGD, server_beta1=b1, rounds=80))
          for b1 in (0.9, 0.97)],
        # the test rows: the tune row with the best held-out accuracy (LoRA r 2, 40 rounds)
        *[_row(f"population-eps8-s{s}", seed=s, **POPULATION_FINAL) for s in (0, 1, 2)],
        _row("population-eps8-shares1-s0", **dict(POPULATION_FINAL, noise_shares=1)),
        *[_row(f"population-nodp-s{s}", seed=s, **dict(POPULATION_FINAL, epsilon=None)) for s in (0, 1, 2)],
        # the chosen setting at epsilon 1 and 3 (calibrated for its 40 rounds each time)
        *[_row(f"population-eps{e:g}-s{s}", seed=s, **dict(POPULATION_FINAL, epsilon=e)) for e in (1.0, 3.0) for s in (0, 1, 2)],
    ],
    # the codec frontier in the population setting, on the held-out split: the subspace codec (each party clips and
    # noises the latent of its update on the round's public subspace) against population-tune-slr5-r2-r40 (no codec)
    "codec": [
        *[_row(f"population-tune-r2-r40-subspace-1/{d}", split="tune", codec="subspace", codec_ratio=1 / d,
               parallel_parties=30, **dict(POPULATION, lora_r=2, rounds=40)) for d in (16, 64)],
        # the decoder made unbiased outside the history (scale="unbiased": FedAvg applies the decoded update at the
        # server lr, a projection on 1/16 of the directions keeps 1/16 of it) and the latent clipped at C sqrt(k/d)
        # (the latent of an update has about sqrt(k/d) of its norm), so that the noise of the decoded update is that
        # of the uncompressed run; history=0 is a fresh random projection every round (the baseline at equal bytes)
        *[_codec_row(d, tag, **opts) for d in (16, 4) for tag, opts in (("", {}), ("-history0", dict(history=0)))],
        # seeds 1 and 2 of the 1/4 comparison: no codec, and the subspace codec
        *[r for s in (1, 2) for r in (_row(f"population-tune-slr5-r2-s{s}", split="tune", seed=s, **dict(POPULATION, lora_r=2)),
                                      _codec_row(4, f"-s{s}", seed=s))],
        # seeds 1 and 2 of the 1/16 comparison: the subspace codec and the random projection (history 0)
        *[r for s in (1, 2) for r in (_codec_row(16, f"-s{s}", seed=s), _codec_row(16, f"-history0-s{s}", seed=s, history=0))],
        # seeds 1 and 2 of the random projection at 1/4 (the federated default since the 1/16 seeds)
        *[_codec_row(4, f"-history0-s{s}", seed=s, history=0) for s in (1, 2)],
        # the random projection with half its budget on the head (head_share=0.5, which measures best in central
        # training from 1/4 to 1/64) against the split in proportion to size, 3 seeds at 1/16
        *[_codec_row(16, f"-history0-head50{f'-s{s}' if s else ''}", seed=s, history=0, head_share=0.5) for s in (0, 1, 2)],
        # the federated default (a fresh random projection every round) at the smaller budgets, 3 seeds
        *[_codec_row(d, f"-history0{f'-s{s}' if s else ''}", seed=s, history=0) for d in (64, 256) for s in (0, 1, 2)],
    ],
}


def lora_modules(top_layers: int, num_layers: int = 6) -> list[str]:
    return [f"layer.{i}.attention.self.{m}" for i in range(num_layers - top_layers, num_layers) for m in ("query", "value")]


_DATA = {}


def load_data(max_length: int):
    if max_length not in _DATA:
        from transformers import AutoTokenizer

        from hf_drencoder.embedded import load_reuters, minilm_path, tokenize_dataset

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        data = tokenize_dataset(load_reuters("r8"), tokenizer, max_length=max_length)
        split = data["train"].train_test_split(test_size=0.15, seed=1234)
        _DATA[max_length] = dict(test=(data["train"], data["test"]), tune=(split["train"], split["test"]),
                                 num_labels=data["train"].features["labels"].num_classes)
    return _DATA[max_length]


class AggregateCosine:
    """A diagnostic, for this benchmark only: per round, the cosine between the update the server applies (decoded,
    noised) and the clean mean of the answering parties' local updates (before clipping, noise and coding). It reads
    the parties' clean updates, which a real server never sees; it needs ``parallel_parties`` > 1 (the simulation
    then hands each party's update over explicitly) and no party failing; a party trained alone (the last chunk of
    a round, when it has one party) is left out of the clean mean."""

    def __init__(self, sim):
        self.cosines: list[float] = []
        self._clean: list = []
        batched, step = sim._batched_updates, sim.server_optimizer.step

        def batched_updates(chunk, round_index):
            updates = batched(chunk, round_index)
            if updates is not None:
                self._clean.extend(u.detach().clone() for u in updates)
            return updates

        def server_step(flat, update, *round_index):
            if self._clean:
                import torch

                clean = torch.stack(self._clean).mean(0)
                self.cosines.append(float(clean @ update / (clean.norm() * update.norm()).clamp(min=1e-30)))
            self._clean = []
            return step(flat, update, *round_index)

        sim._batched_updates, sim.server_optimizer.step = batched_updates, server_step


class IterateAverages:
    """A diagnostic, for this benchmark only: exponential moving averages of the global adapter over the rounds
    (``x_ema <- d x_ema + (1 - d) x`` after every round, one per decay d), scored at the end. An average of released
    iterates is post-processing: it costs no privacy. It answers whether averaging the noisy iterates is worth
    building into the server."""

    def __init__(self, sim, decays):
        self.decays, self.averages = tuple(decays), {}
        if not self.decays:
            return
        step = sim.server_optimizer.step

        def server_step(flat, update, *round_index):
            new = step(flat, update, *round_index)
            for d in self.decays:
                self.averages[d] = new.clone() if d not in self.averages else d * self.averages[d] + (1 - d) * new
            return new

        sim.server_optimizer.step = server_step

    def evaluate(self, sim, evaluation) -> dict:
        out, last = {}, sim._global_flat().clone()
        for d, flat in self.averages.items():
            sim._set_global(flat)
            m = sim.evaluate(evaluation)
            out[f"{d:g}"] = dict(accuracy=m["eval_accuracy"], macro_f1=m["eval_macro_f1"], eval_loss=m["eval_loss"])
        if self.averages:
            sim._set_global(last)
        return out


def run_row(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from hf_drencoder.embedded import minilm_path
    from hf_drencoder.federated import FederatedArguments, FederatedSimulation
    from hf_drencoder.metrics import classification_compute_metrics

    data = load_data(spec["max_length"])
    train, evaluation = data[spec["split"]]
    torch.manual_seed(spec["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=data["num_labels"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        kw = dict(
            output_dir=out, num_parties=spec["parties"], parties_per_round=spec["per_round"], partition=spec.get("partition", "dirichlet"),
            dirichlet_alpha=spec["alpha"], partition_seed=spec["seed"], num_rounds=spec["rounds"],
            local_steps=spec["local_steps"], local_batch_size=spec["local_batch"], local_learning_rate=spec["local_lr"],
            local_optimizer=spec["local_optimizer"], server_learning_rate=spec["server_lr"],
            max_update_norm=spec["clip"], eval_every=10, seed=spec["seed"], sampling_seed=spec["seed"],
            noise_seed=spec["seed"], disable_tqdm=True, lora_r=spec.get("lora_r", 8), lora_alpha=2 * spec.get("lora_r", 8),
            lora_target_modules=lora_modules(spec["top_layers"]), per_device_eval_batch_size=256,
        )
        codec = None
        if spec.get("codec"):
            kw.update(codec=spec["codec"], codec_latent_ratio=spec["codec_ratio"])
        if spec.get("ffa"):
            kw["lora_freeze_a"] = True
        if spec.get("parallel_parties", 1) > 1:  # the same updates as one party at a time, faster
            kw["parallel_parties"] = spec["parallel_parties"]
        if spec.get("noise_shares", 1) != 1 and spec["epsilon"] is not None:
            kw["noise_shares"] = spec["noise_shares"]
        if spec["server_optimizer"] != "fedavg":
            kw["server_optimizer"] = spec["server_optimizer"]
        kw.update({k: spec[k] for k in ("server_momentum", "server_tau", "server_beta1", "server_lr_schedule") if k in spec})
        if spec["epsilon"] is None:
            kw["disable_dp"] = True
        else:
            kw["target_epsilon"] = spec["epsilon"]
        args = FederatedArguments(**kw)
        if spec.get("codec_options"):  # a SubspaceCodec with settings: built for the LoRA-wrapped model
            from hf_drencoder.codec import SubspaceCodec
            from hf_drencoder.lora import wrap_with_lora

            model = wrap_with_lora(model, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                   target_modules=args.lora_target_modules)
            codec = SubspaceCodec.for_model(model, spec["codec_ratio"], seed=spec["seed"], **spec["codec_options"])
        sim = FederatedSimulation(model, train, args, eval_dataset=evaluation, codec=codec,
                                  compute_metrics=classification_compute_metrics())
        spy = AggregateCosine(sim) if args.parallel_parties > 1 else None
        averages = IterateAverages(sim, spec.get("ema", ()))
        history = sim.run()
        report = sim.privacy_report()
        ema = averages.evaluate(sim, evaluation)
    train_rounds = [h for h in history if h.get("stage") == "train"]
    # rows visited by local training: each answering party runs local_steps batches of min(local_batch, its rows)
    visits = sum(spec["local_steps"] * min(spec["local_batch"], sim.partition_sizes[p]) for h in train_rounds for p in h["received"])
    evals = {h["round"]: dict(accuracy=h["eval_accuracy"], macro_f1=h["eval_macro_f1"], eval_loss=h["eval_loss"])
             for h in train_rounds if "eval_accuracy" in h}
    last = evals[max(evals)]
    return dict(spec, target_epsilon=spec["epsilon"], accuracy=last["accuracy"], macro_f1=last["macro_f1"], by_round=evals,
                epsilon=report["epsilon"] if spec["epsilon"] is not None else None,
                noise_multiplier=report.get("noise_multiplier"), accountant=report.get("accountant"),
                party_noise_multiplier=report.get("party_noise_multiplier"),
                epsilon_server_view=report.get("epsilon_server_view"),
                uplink_bytes_per_party=train_rounds[-1].get("uplink_bytes_per_party", 4 * sim.layout.dim),
                uncompressed_bytes_per_party=4 * sim.layout.dim,
                delta=report.get("delta"), rounds_run=len(train_rounds),
                mean_parties_per_round=sum(h["num_received"] for h in train_rounds) / max(1, len(train_rounds)),
                mean_update_norm=sum(h["update_norm"] for h in train_rounds) / max(1, len(train_rounds)),
                train_examples=len(train), eval_examples=len(evaluation), example_visits=visits,
                cosine_per_round=spy.cosines if spy else None,
                **({"ema_results": ema} if ema else {}),
                wall_s=round(time.perf_counter() - start, 1), threads=torch.get_num_threads())


def load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)["rows"]
    return []


def save(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"cpu_count": os.cpu_count(), "rows": rows}, f, indent=1)
    os.replace(tmp, path)


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def table(rows) -> str:
    head = (f"{'row':24s} {'split':5s} {'local':15s} {'server':14s} {'eps':>5s} {'rounds':>6s} {'acc@10':>7s} "
            f"{'F1@10':>7s} {'acc@20':>7s} {'F1@20':>7s} {'bytes/party':>11s} {'wall s':>7s}")
    lines = [head, "-" * len(head)]
    for r in rows:
        e10, e20 = r["by_round"].get("10") or r["by_round"].get(10), r["by_round"].get("20") or r["by_round"].get(20)
        local = f"{r['local_optimizer']} {r['local_lr']:g}x{r['local_steps']}/{r['local_batch']}"
        server = f"{r['server_optimizer']} {r['server_lr']:g}" + (f" m{r['server_momentum']:g}" if r.get("server_momentum") else "") + (
            " lin" if r.get("server_lr_schedule", "constant") == "linear" else "")
        lines.append(
            f"{r['name']:24s} {r['split']:5s} {local:15s} {server:14s} {_fmt(r['epsilon'], '.2f'):>5s} {r['rounds_run']:>6d} "
            f"{_fmt(e10 and e10['accuracy']):>7s} {_fmt(e10 and e10['macro_f1']):>7s} {_fmt(e20 and e20['accuracy']):>7s} "
            f"{_fmt(e20 and e20['macro_f1']):>7s} {r.get('uplink_bytes_per_party') or '-':>11} {r['wall_s']:>7.0f}"
            + _diagnostics(r))
    return "\n".join(lines)


def _diagnostics(r) -> str:
    """The benchmark's diagnostics of a row, where it has them: the applied update's cosine with the clean mean in
    round 1 and averaged over the later rounds (AggregateCosine), and the accuracy of each moving average of the
    iterates (IterateAverages)."""
    out, cos = "", r.get("cosine_per_round") or []
    if len(cos) > 1:
        out += f"  cos {cos[0]:.2f} then {sum(cos[1:]) / len(cos[1:]):.3f}"
    if r.get("ema_results"):
        out += "  ema " + " ".join(f"{d}:{m['accuracy']:.4f}" for d, m in r["ema_results"].items())
    return out


def seed_group(name: str) -> str:
    """A row's name without its trailing ``-sN`` (seed): the rows of one setting over seeds share it."""
    return re.sub(r"-s\d+$", "", name)


def markdown(rows, split: str = "test") -> str:
    """The rows of one split grouped over seeds (a trailing ``-sN`` in the name): mean accuracy and macro-F1 at the
    last round, mean accuracy at round 10, bytes per party per round, and each seed's figures."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["split"] == split:
            groups.setdefault(seed_group(r["name"]), []).append(r)
    lines = ["| row | local | server | ε | rounds | seeds | accuracy | macro-F1 | accuracy @10 | bytes/party | "
             "cosine | per seed (accuracy / macro-F1) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        r = rs[0]
        acc = sum(x["accuracy"] for x in rs) / len(rs)
        f1 = sum(x["macro_f1"] for x in rs) / len(rs)
        each = ", ".join(f"{x['accuracy']:.3f} / {x['macro_f1']:.3f}" for x in sorted(rs, key=lambda x: x["seed"]))
        at10 = [(x["by_round"].get("10") or x["by_round"].get(10) or {}).get("accuracy") for x in rs]
        acc10 = "-" if None in at10 or r["rounds_run"] <= 10 else f"{sum(at10) / len(at10):.3f}"
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        # mean over rounds and seeds of the per-round cosine (AggregateCosine), where the rows have it
        cos = [c for x in rs for c in (x.get("cosine_per_round") or [])]
        cosine = f"{sum(cos) / len(cos):.3f}" if cos and all(x.get("cosine_per_round") for x in rs) else "-"
        lines.append(f"| {name} | {r['local_optimizer']} lr {r['local_lr']:g}, {r['local_steps']} steps of "
                     f"{r['local_batch']} | {r['server_optimizer']} lr {r['server_lr']:g} | {eps} | {r['rounds_run']} | "
                     f"{len(rs)} | {acc:.3f} | {f1:.3f} | {acc10} | {r.get('uplink_bytes_per_party', '-')} | {cosine} | {each} |")
    return "\n".join(lines)


def plot_cosine(rows, path: str) -> None:
    """The per-round cosine between the applied update and the clean mean of the parties' updates
    (`AggregateCosine`), one line per row of the held-out split (mean over its seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _plotting import label_axes

    groups: dict[str, list[list[float]]] = {}
    for r in rows:
        if r["split"] == "tune" and r.get("cosine_per_round"):
            groups.setdefault(seed_group(r["name"]), []).append(r["cosine_per_round"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in sorted(groups.items()):
        mean = [sum(c) / len(c) for c in zip(*runs)]
        ax.plot(range(1, len(mean) + 1), mean, marker=".", label=f"{name.replace('population-tune-', '')} ({len(runs)} seeds)")
    ax.axhline(0, color="grey", lw=0.5)
    label_axes(ax, "round", "cosine(applied update, clean mean update)",
               "Federated, 1,000 parties, ~100 per round, epsilon 8 (held-out runs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None):
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("hf_drencoder.federated.simulation").setLevel(logging.INFO)  # one line per round
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", choices=list(PLANS), default="final")
    p.add_argument("--only", nargs="*", help="Row names of the plan to run (default: all).")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--table", action="store_true", help="Only print the table of the rows measured.")
    p.add_argument("--markdown", action="store_true", help="Only print the rows of --split grouped over seeds, as markdown.")
    p.add_argument("--split", default="test", choices=["test", "tune"], help="The split --markdown groups (default: test).")
    p.add_argument("--plot-cosine", metavar="PNG", help="Only plot the per-round cosine of the held-out rows that have it.")
    a = p.parse_args(argv)
    rows = load(a.out)
    if a.plot_cosine:
        plot_cosine(rows, a.plot_cosine)
        return
    if a.markdown:
        print(markdown(rows, a.split))
        return
    if not a.table:
        for spec in PLANS[a.plan]:
            if a.only and spec["name"] not in a.only:
                continue
            if any(r["name"] == spec["name"] for r in rows):
                continue
            print(f"[federated_defaults {time.strftime('%H:%M:%S')}] {spec['name']}", flush=True)
            row = run_row(spec)
            rows = [r for r in load(a.out) if r["name"] != row["name"]] + [row]  # other processes may write too
            save(a.out, rows)
            print(f"  accuracy {row['accuracy']:.4f}, macro-F1 {row['macro_f1']:.4f}, {row['wall_s']:.0f} s", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
