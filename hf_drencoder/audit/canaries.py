"""Canaries: what the audit inserts into a run, and how each is scored.

* Gradient canaries (white box): canary i is a fixed unit direction u_i in the space the mechanism clips and
  noises, of norm ``scale * C``. It enters ``GaussianGradientMechanism.add_per_sample`` as one more per-sample
  gradient row (clipped, summed and noised exactly like an example) in the steps it takes part in. The
  auditor sees every release (the white-box threat model) and scores canary i by <u_i, sum of the releases>.
  A Dirac canary (one coordinate) on a coordinate of its own is then one Gaussian observation per step, and
  the sum over the T steps is its sufficient statistic: its privacy loss is exactly the accountant's at q = 1.
* Input canaries (black box): extra training rows, scored by minus the final model's loss on them.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
from transformers import TrainerCallback

logger = logging.getLogger("hf_drencoder.audit")

CANARY_TYPES = ("gradient", "input")
CANARY_SAMPLING = ("every_step", "poisson")
OBSERVE = ("release", "update")
DIRECTIONS = ("random", "dirac")

# Canary rows go through add_per_sample in chunks: 10^5 dense rows of a 10^5-dimensional adapter do not fit.
_ROWS_PER_CHUNK = 256

# num_canaries=0 ("as many as fit"): one canary for each of 90% of the noised coordinates (the other 10% carry no
# canary and measure the noise for the noise check), up to these many (Dirac canaries keep no m x d matrix;
# random directions do, so they stop much earlier).
AUTO_CANARIES = {"dirac": 50_000, "random": 1_000}
AUTO_CANARY_FRACTION = 0.9



class _CanaryDirections:
    """m fixed unit directions in d dimensions: ``random`` (orthonormal when m <= d; an m x d matrix) or
    ``dirac`` (one coordinate each with a random sign; no m x d matrix). Draws from ``gen`` in a fixed order."""

    def __init__(self, m: int, d: int, direction: str, gen: torch.Generator):
        self.m, self.d = m, d
        if direction == "dirac":
            if m > d:
                raise ValueError(f"{m} Dirac canaries need at least as many coordinates; the adapter has {d}")
            self.coords = torch.randperm(d, generator=gen)[:m]
            self.signs = torch.randint(0, 2, (m,), generator=gen).float() * 2 - 1
            self.dirs = None
        else:
            if m > d:
                logger.warning(
                    "audit: %d canaries in %d dimensions (the space the mechanism noises) cannot be orthogonal; their "
                    "overlap costs the audit power. Use num_canaries <= %d", m, d, d,
                )
            g = torch.randn(d, m, generator=gen)
            if m <= d:
                g, _ = torch.linalg.qr(g)  # orthonormal: no canary's signal lands on another's score
            self.dirs = (g / g.norm(dim=0, keepdim=True)).T.contiguous()  # [m, d] unit rows

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """The unit directions of canaries ``idx`` as an ``[len(idx), d]`` matrix."""
        if self.dirs is not None:
            return self.dirs[idx]
        flat = torch.zeros(idx.numel(), self.d)
        flat[torch.arange(idx.numel()), self.coords[idx]] = self.signs[idx]
        return flat

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """<u_i, flat> for every canary i: an ``[m]`` vector."""
        if self.dirs is None:
            return flat[self.coords] * self.signs
        return self.dirs @ flat


class _CanaryMechanism:
    """Wraps the trainer's GaussianGradientMechanism: at each release the canaries present in the step are
    added as per-sample rows through the mechanism's own ``add_per_sample`` (clipped and summed like data),
    then the mechanism releases, and the release is scored. Everything else is delegated."""

    def __init__(self, inner, canaries: "GradientCanaries"):
        self._inner = inner
        self._canaries = canaries

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def add_per_sample(self, grad_samples):
        return self._inner.add_per_sample(grad_samples)

    def add_summed(self, grads):
        return self._inner.add_summed(grads)

    def release(self, *args, **kwargs):
        # Data parallel: the process that draws the noise (the main one) holds the canaries, so the summed
        # release has each canary once, like an example that Poisson sampling gave to one process.
        if getattr(self._inner, "draws_noise", True):
            for rows in self._canaries._rows_for_step():
                self._inner.add_per_sample(rows)
        out = self._inner.release(*args, **kwargs)
        self._canaries.releases += 1
        self._canaries._record_release(out, self._inner.expected_batch_size)
        if self._canaries.observe == "release":
            self._canaries._score(out, self._inner.expected_batch_size)
        return out


class _AttachGradientCanaries(TrainerCallback):
    """Installs the canaries once DRTrainer.train() has created its mechanism (Trainer calls on_train_begin
    after DRTrainer._start_mechanism and before the first step)."""

    def __init__(self, trainer, canaries: "GradientCanaries"):
        self.trainer, self.canaries = trainer, canaries

    def on_train_begin(self, args, state, control, **kwargs):
        self.canaries._install(self.trainer)


def _check_canary_args(num_canaries: int, sampling: str, observe: str, direction: str, scale: float) -> None:
    if num_canaries < 0:
        raise ValueError("num_canaries must be >= 1 (or 0: as many as the noised space allows)")
    for name, value, choices in (("sampling", sampling, CANARY_SAMPLING), ("observe", observe, OBSERVE),
                                 ("direction", direction, DIRECTIONS)):
        if value not in choices:
            raise ValueError(f"{name}={value!r} is unknown: choose one of {', '.join(choices)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")


class _Canaries:
    """What both kinds of white-box canaries share: m canaries, each included with probability 1/2 (drawn
    from ``seed``), and their accumulated scores. ``num_canaries=0`` means as many as the noised space has
    coordinates (``AUTO_CANARY_FRACTION`` of them), up to ``AUTO_CANARIES[direction]``; m is then fixed when the
    canaries are installed."""

    def __init__(self, num_canaries: int, sampling: str = "every_step", observe: str = "release",
                 direction: str = "random", scale: float = 1.0, seed: int = 0):
        _check_canary_args(num_canaries, sampling, observe, direction, scale)
        self.num_canaries, self.sampling, self.observe = num_canaries, sampling, observe
        self.direction, self.scale = direction, float(scale)
        self._gen = torch.Generator().manual_seed(seed)
        self.included, self.scores = None, None
        if num_canaries:
            self._draw_membership()
        self.releases = 0
        self.release_sum_squares: list[float] = []
        self.release_dims = 0

    def _draw_membership(self) -> None:
        self.included = (torch.rand(self.num_canaries, generator=self._gen) < 0.5).numpy()
        self.scores = np.zeros(self.num_canaries)

    def _resolve(self, d: int) -> None:
        """Fix m for ``num_canaries=0`` once the noised dimension d is known."""
        if not self.num_canaries:
            self.num_canaries = max(1, min(int(AUTO_CANARY_FRACTION * d), AUTO_CANARIES[self.direction]))
            self._draw_membership()


class GradientCanaries(_Canaries):
    """m gradient canaries, each included with probability 1/2 (``included``), for one DRTrainer run.

    Args:
        num_canaries: m.
        sampling: ``every_step`` (an included canary is in every optimizer step: its privacy is that of a
            sample with rate q = 1, which is what the bound is compared with) or ``poisson`` (in each step with
            the run's sample rate q, like a training example: compared with the reported epsilon).
        observe: ``release`` (the mechanism's noisy sum, before the codec: the tightest white-box view) or
            ``update`` (the gradient handed to the optimizer, after the post-privacy hooks).
        direction: ``random`` (unit vectors, orthonormal when m <= d; keeps an m x d matrix) or ``dirac`` (one
            coordinate each with a random sign, for large adapters where m x d floats do not fit).
        scale: canary norm in units of C (``per_sample_max_grad_norm``). 1 is the clipping bound; > 1 also
            tests that clipping is applied (an unclipped canary leaks more than the accountant allows).
        seed: seeds the membership, the directions and the Poisson draws (not the training noise).
    """

    def attach(self, trainer) -> None:
        """Hook into ``trainer`` (a DRTrainer, before ``train()``)."""
        trainer.add_callback(_AttachGradientCanaries(trainer, self))

    def _install(self, trainer) -> None:
        mech = trainer._mechanism
        if mech is None:
            raise RuntimeError("the trainer has no mechanism: gradient canaries attach inside DRTrainer.train()")
        if isinstance(mech, _CanaryMechanism):
            return
        self._shapes = [tuple(p.shape) for p in mech.params]
        self._numels = [p.numel() for p in mech.params]
        self._device = mech.params[0].device
        d = sum(self._numels)
        self._resolve(d)
        norm = self.scale * float(trainer.args.per_sample_max_grad_norm)
        self._directions = _CanaryDirections(self.num_canaries, d, self.direction, self._gen)
        if self.observe == "update" and getattr(trainer, "_latent_noise", False):
            raise ValueError(
                "observe='update' scores canaries in the space of the LoRA gradient, but this run clips and noises "
                "codec latents (noise_space='latent'), where the canaries are placed: use observe='release'"
            )
        self._norm = norm
        self._clip = float(trainer.args.per_sample_max_grad_norm)
        self._sample_rate = trainer.ledger.sample_rate
        trainer._mechanism = _CanaryMechanism(mech, self)
        if self.observe == "update":
            expected = mech.expected_batch_size
            # appended last: it sees what the optimizer is given, after every other post-privacy hook
            trainer.post_privacy_hooks.append(lambda grads: self._score(grads, expected) or grads)

    def _rows_for_step(self):
        """The per-sample rows of the canaries present in this step, in chunks of ``_ROWS_PER_CHUNK`` rows
        (one ``[b, *shape]`` tensor per parameter, as ``add_per_sample`` takes them)."""
        present = torch.as_tensor(self.included)
        if self.sampling == "poisson":
            present = present & (torch.rand(self.num_canaries, generator=self._gen) < self._sample_rate)
        idx = torch.nonzero(present).flatten()
        for chunk in idx.split(_ROWS_PER_CHUNK):
            flat = (self._directions.rows(chunk) * self._norm).to(self._device)
            yield [t.reshape(chunk.numel(), *s) for t, s in zip(flat.split(self._numels, dim=1), self._shapes)]

    def _record_release(self, grads: list[torch.Tensor], expected_batch_size: float) -> None:
        # ||release as a sum||^2 / C^2 for the noise check: the noise the auditor sees, whatever it is scored on.
        # Dirac canaries' own coordinates are left out (their signal would hide missing noise); random
        # directions touch every coordinate, and their signal only makes the check conservative.
        flat = torch.cat([g.detach().double().flatten().cpu() for g in grads]) * expected_batch_size
        if self._directions.dirs is None and self.num_canaries < flat.numel():
            keep = torch.ones(flat.numel(), dtype=torch.bool)
            keep[self._directions.coords] = False
            flat = flat[keep]
        self.release_dims = flat.numel()
        self.release_sum_squares.append(float(flat.pow(2).sum()) / self._clip**2)

    def _score(self, grads: list[torch.Tensor], expected_batch_size: float) -> None:
        # The release is (sum + noise) / B; scale back to the sum so that scores read in units of C.
        flat = torch.cat([g.detach().float().flatten().cpu() for g in grads]) * expected_batch_size
        s = self._directions.project(flat)
        self.scores += s.double().numpy()


# ---------------------------------------------------------------------------------------------------------
# Input canaries (black box)
# ---------------------------------------------------------------------------------------------------------


def make_input_canaries(train_dataset, num_canaries: int, seed: int = 0, vocab_size: int | None = None):
    """``num_canaries`` rows shaped like ``train_dataset``'s rows, built to be memorised, one recipe per model type.

    * Classifier (a scalar label): a copy of a random training row whose tokens (all attended positions but the
      first and the last, which hold the tokenizer's special tokens) are replaced by *rare* tokens -- ids in
      ``[0, vocab_size)`` that occur nowhere in the dataset -- and whose label is *flipped* to another class drawn
      uniformly. Nothing else in the data predicts that label, so only memorising the row lowers its loss.
    * Causal language model (token labels): a uniformly random token sequence over the ids seen in the dataset,
      with the new tokens as labels.

    ``vocab_size`` defaults to one more than the largest id seen. Needs ``input_ids`` and ``labels`` (or
    ``label``) columns; pass your own canaries otherwise.
    """
    from datasets import Dataset

    cols = train_dataset.column_names
    label_col = "labels" if "labels" in cols else "label" if "label" in cols else None
    if "input_ids" not in cols or label_col is None:
        raise ValueError("input canaries need input_ids and labels columns; pass canary_dataset= with your own")
    rng = np.random.default_rng(seed)
    ids = train_dataset["input_ids"]
    flat_ids = np.concatenate([np.asarray(x).ravel() for x in ids])
    lo, hi = int(flat_ids.min()), int(flat_ids.max())
    labels = train_dataset[label_col]
    scalar_labels = not isinstance(labels[0], (list, tuple))
    label_values = sorted(set(labels)) if scalar_labels else None
    if scalar_labels:
        rare = np.setdiff1d(np.arange(vocab_size or hi + 1), np.unique(flat_ids))
        if len(rare) < 16:
            rare = np.arange(lo, hi + 1)  # (almost) every id occurs: fall back to uniform tokens
    rows = []
    for t in rng.integers(0, len(train_dataset), size=num_canaries):
        row = dict(train_dataset[int(t)])
        old_ids = np.asarray(row["input_ids"])
        mask = np.asarray(row.get("attention_mask", [1] * len(old_ids))) > 0
        if scalar_labels:
            inner = mask.copy()
            on = np.flatnonzero(mask)
            if len(on) > 2:
                inner[on[0]] = inner[on[-1]] = False  # keep [CLS] ... [SEP]
            row["input_ids"] = np.where(inner, rng.choice(rare, size=len(old_ids)), old_ids).tolist()
            others = [v for v in label_values if v != row[label_col]] or label_values
            row[label_col] = others[int(rng.integers(len(others)))]
        else:
            new_ids = np.where(mask, rng.integers(lo, hi + 1, size=len(old_ids)), old_ids)
            row["input_ids"] = new_ids.tolist()
            old = np.asarray(row[label_col])
            row[label_col] = np.where(old != -100, new_ids, -100).tolist()
        rows.append(row)
    return Dataset.from_list(rows, features=train_dataset.features)


def input_canary_scores(trainer, canaries) -> np.ndarray:
    """Minus the trained model's per-example loss on each canary (higher = more likely a member)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for batch in trainer.get_eval_dataloader(canaries):
                batch = trainer._prepare_inputs(batch)
                out.append(trainer.per_sample_losses(model, batch).detach().float().cpu())
    finally:
        model.train(was_training)
    losses = torch.cat(out).numpy().astype(np.float64)
    if len(losses) != len(canaries):
        raise RuntimeError(f"scored {len(losses)} canaries, expected {len(canaries)}")
    return -losses

