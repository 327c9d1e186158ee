"""Empirical privacy audit in one training run (Steinke, Nasr and Jagielski, 2023).

The audit inserts m canaries, includes each one independently with probability 1/2, runs the private training
the user runs (DRTrainer with its clipping, noise, codec and accountant), scores each canary, guesses the
top-scored k+ as members and the bottom-scored k- as non-members (abstaining on the rest), and turns the number
of correct guesses into a lower bound on epsilon that holds with probability at least ``confidence``:

    if the run is (epsilon, delta)-DP with respect to each canary, then the number of correct guesses is
    stochastically dominated by a Binomial(r, e^eps / (1 + e^eps)), up to a delta term (their Appendix D).

A lower bound above the epsilon the accountant reports for the canaries is impossible for a correct
implementation except with probability 1 - confidence: it means noise was skipped or too small, clipping
was bypassed, or a release was not accounted. A bound below the reported epsilon proves nothing (docs/audit.md).

Two kinds of canaries:

* ``gradient`` (white box): canary i is a fixed unit direction u_i in the space the mechanism clips and noises
  (the trainable LoRA tensors; the codec's latent with ``noise_space="latent"``), scaled to ``canary_scale * C``. It enters the mechanism as one more per-sample gradient row of
  ``GaussianGradientMechanism.add_per_sample`` (so it is clipped, summed and noised exactly like a real
  example) in every optimizer step (``canary_sampling="every_step"``: a sample with rate q = 1) or in each
  step with the data's Poisson rate q (``"poisson"``). Its score is <u_i, sum of the released noisy sums>,
  read from the mechanism's release (``observe="release"``, before any codec) or from the gradient the
  optimizer is given (``observe="update"``, after the post-privacy hooks, i.e. the decoded gradient).
* ``input`` (black box): canaries are extra training rows (random tokens with random labels unless the caller
  gives its own), each added to the training set with probability 1/2; the score is minus the final model's
  loss on the canary.

Federated mode (:func:`run_federated_audit`, ``hf-drencoder audit --mode federated``): canaries are parties
whose update is u_i of norm C (:class:`FederatedCanaries`). Their messages are built by the parties' own
``privatize_update`` and ``encode_message`` and join the round's messages before the server aggregates them
(they count in k of sum / sqrt(k)); the score is <u_i, sum over rounds of the aggregate>, read before decoding.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from .privacy.accounting import compute_epsilon

logger = logging.getLogger(__name__)

CANARY_TYPES = ("gradient", "input")
CANARY_SAMPLING = ("every_step", "poisson")
OBSERVE = ("release", "update")
DIRECTIONS = ("random", "dirac")


class PrivacyAuditError(RuntimeError):
    """The audit measured more privacy loss than the accountant reports: a bug or a wrong accounting.
    ``result`` holds the :class:`AuditResult`."""

    def __init__(self, message: str, result: "AuditResult | None" = None):
        super().__init__(message)
        self.result = result


# ---------------------------------------------------------------------------------------------------------
# Statistics: correct guesses -> a lower bound on epsilon
# ---------------------------------------------------------------------------------------------------------


def audit_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability, under the hypothesis that the run is (epsilon, delta)-DP for each of m canaries (each
    included with probability 1/2), that an auditor making r guesses gets at least v of them right.

    With q = e^eps / (1 + e^eps) (the accuracy of eps-randomized response) this is
    P[Binomial(r, q) >= v] + 2 m delta max_{i=1..v} P[v - i <= Binomial(r, q) < v] / i
    (Steinke, Nasr and Jagielski 2023, Appendix D), capped at 1.
    """
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not (epsilon >= 0):
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not (0 <= delta <= 1):
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))
    if delta == 0:
        return min(tail, 1.0)
    # partial[i-1] = P[v - i <= Bin < v] for i = 1..v
    partial = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(partial / np.arange(1, v + 1)))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """The largest epsilon rejected at level ``beta``: with probability >= 1 - beta over the canaries'
    inclusion and the run's randomness, the run is not (eps', delta)-DP for any eps' below the returned value.
    0 when nothing can be rejected. Bisection to 1e-9 from below (the returned value is always a rejected one).
    """
    if not (0 < beta < 1):
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}")
    if audit_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while audit_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e4:  # cannot happen for finite r (q^r -> 1); a guard against an endless loop
            return lo
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if audit_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def default_guess_grid(m: int) -> list[tuple[int, int]]:
    """Candidate (k+, k-) pairs: r = 100%, 90%, ..., 30%, 25%, 20%, 15%, 10%, 5% of the m canaries, split evenly between IN and OUT
    or all IN (input canaries are usually recognised as members, seldom as non-members). Trying K candidates
    costs a Bonferroni factor K on beta, which :func:`lower_bound_from_scores` applies."""
    grid = []
    for frac in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05):
        r = int(round(m * frac))
        if r < 1:
            break
        for pair in ((r - r // 2, r // 2), (r, 0)):
            if pair not in grid:
                grid.append(pair)
    return grid


@dataclass
class GuessOutcome:
    k_plus: int
    k_minus: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    candidates_tried: int


def count_correct(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> tuple[int, int]:
    """Guess the k+ highest-scored canaries IN and the k- lowest-scored OUT. Returns (guesses, correct).
    Ties are broken by canary index (a fixed rule that does not look at membership)."""
    m = len(scores)
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > m:
        raise ValueError(f"need k+ ({k_plus}) + k- ({k_minus}) <= m ({m})")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    guessed_in, guessed_out = order[:k_plus], order[m - k_minus:] if k_minus else order[:0]
    correct = int(included[guessed_in].sum()) + int((~included[guessed_out]).sum())
    return k_plus + k_minus, correct


def lower_bound_from_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
) -> GuessOutcome:
    """The one-run audit's bound from canary scores (higher = more likely a member) and the true membership.

    Every (k+, k-) in ``guesses`` (default :func:`default_guess_grid`) is tried at level
    (1 - confidence) / len(guesses), and the best is returned: by the union bound the returned epsilon is a
    lower bound with probability >= ``confidence``. Give one pair to avoid the correction.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError("scores and included must be 1-d and of the same length")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite (a NaN score would be ranked arbitrarily)")
    m = len(scores)
    grid = list(guesses) if guesses is not None else default_guess_grid(m)
    if not grid:
        raise ValueError("no (k+, k-) candidates to try")
    beta = (1.0 - confidence) / len(grid)
    best = None
    for k_plus, k_minus in grid:
        r, v = count_correct(scores, included, k_plus, k_minus)
        eps = epsilon_lower_bound(m, r, v, delta, beta)
        if best is None or eps > best.epsilon_lower_bound:
            best = GuessOutcome(k_plus, k_minus, r, v, eps, len(grid))
    return best


# ---------------------------------------------------------------------------------------------------------
# Gradient canaries (white box)
# ---------------------------------------------------------------------------------------------------------


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
        rows = self._canaries._rows_for_step()
        if rows is not None and getattr(self._inner, "draws_noise", True):
            self._inner.add_per_sample(rows)
        out = self._inner.release(*args, **kwargs)
        self._canaries.releases += 1
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
    if num_canaries < 1:
        raise ValueError("num_canaries must be >= 1")
    for name, value, choices in (("sampling", sampling, CANARY_SAMPLING), ("observe", observe, OBSERVE),
                                 ("direction", direction, DIRECTIONS)):
        if value not in choices:
            raise ValueError(f"{name}={value!r} is unknown: choose one of {', '.join(choices)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"scale must be positive and finite, got {scale}")


class _Canaries:
    """What both kinds of white-box canaries share: m canaries, each included with probability 1/2 (drawn
    from ``seed``), and their accumulated scores."""

    def __init__(self, num_canaries: int, sampling: str = "every_step", observe: str = "release",
                 direction: str = "random", scale: float = 1.0, seed: int = 0):
        _check_canary_args(num_canaries, sampling, observe, direction, scale)
        self.num_canaries, self.sampling, self.observe = num_canaries, sampling, observe
        self.direction, self.scale = direction, float(scale)
        self._gen = torch.Generator().manual_seed(seed)
        self.included = (torch.rand(num_canaries, generator=self._gen) < 0.5).numpy()
        self.scores = np.zeros(num_canaries)
        self.releases = 0


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
        norm = self.scale * float(trainer.args.per_sample_max_grad_norm)
        self._directions = _CanaryDirections(self.num_canaries, d, self.direction, self._gen)
        if self.observe == "update" and getattr(trainer, "_latent_noise", False):
            raise ValueError(
                "observe='update' scores canaries in the space of the LoRA gradient, but this run clips and noises "
                "codec latents (noise_space='latent'), where the canaries are placed: use observe='release'"
            )
        self._norm = norm
        self._sample_rate = trainer.ledger.sample_rate
        trainer._mechanism = _CanaryMechanism(mech, self)
        if self.observe == "update":
            expected = mech.expected_batch_size
            # appended last: it sees what the optimizer is given, after every other post-privacy hook
            trainer.post_privacy_hooks.append(lambda grads: self._score(grads, expected) or grads)

    def _rows_for_step(self) -> list[torch.Tensor] | None:
        present = torch.as_tensor(self.included)
        if self.sampling == "poisson":
            present = present & (torch.rand(self.num_canaries, generator=self._gen) < self._sample_rate)
        idx = torch.nonzero(present).flatten()
        if idx.numel() == 0:
            return None
        flat = self._directions.rows(idx)
        flat = (flat * self._norm).to(self._device)
        return [t.reshape(idx.numel(), *s) for t, s in zip(flat.split(self._numels, dim=1), self._shapes)]

    def _score(self, grads: list[torch.Tensor], expected_batch_size: float) -> None:
        # The release is (sum + noise) / B; scale back to the sum so that scores read in units of C.
        flat = torch.cat([g.detach().float().flatten().cpu() for g in grads]) * expected_batch_size
        s = self._directions.project(flat)
        self.scores += s.double().numpy()


# ---------------------------------------------------------------------------------------------------------
# Input canaries (black box)
# ---------------------------------------------------------------------------------------------------------


def make_input_canaries(train_dataset, num_canaries: int, seed: int = 0):
    """``num_canaries`` rows shaped like ``train_dataset``'s rows with random content: each copies a random
    row's columns and length, draws its tokens uniformly from the token range seen in the dataset and, for a
    classification label, a label drawn uniformly from those seen (for language-model labels: the new tokens).

    Needs ``input_ids`` and ``labels`` (or ``label``) columns; pass your own canaries otherwise.
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
    rows = []
    for t in rng.integers(0, len(train_dataset), size=num_canaries):
        row = dict(train_dataset[int(t)])
        mask = np.asarray(row.get("attention_mask", [1] * len(row["input_ids"])))
        new_ids = np.where(mask > 0, rng.integers(lo, hi + 1, size=len(row["input_ids"])), row["input_ids"])
        row["input_ids"] = new_ids.tolist()
        if scalar_labels:
            row[label_col] = label_values[int(rng.integers(len(label_values)))]
        else:
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


# ---------------------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    """What one audit run measured. ``epsilon_accountant`` is the accountant's epsilon for the canaries in this
    run (``epsilon_reported`` with q = 1 for every-step gradient canaries), the number the bound must not exceed."""

    canary_type: str
    canary_sampling: str
    observe: str
    num_canaries: int
    num_included: int
    guesses: int
    correct: int
    abstentions: int
    k_plus: int
    k_minus: int
    candidates_tried: int
    confidence: float
    delta: float
    epsilon_lower_bound: float
    epsilon_accountant: float
    epsilon_reported: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    dp_enabled: bool
    passed: bool
    message: str
    report: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        def f(x):
            return "inf" if x == math.inf else f"{x:.4f}" if isinstance(x, float) else str(x)

        rows = [
            ("canaries", f"{self.num_canaries} {self.canary_type} ({self.canary_sampling}, observe={self.observe}), "
                         f"{self.num_included} included"),
            ("guesses", f"{self.guesses} (k+={self.k_plus}, k-={self.k_minus}), {self.correct} correct, "
                        f"{self.abstentions} abstentions"),
            ("confidence", f"{self.confidence} ({self.candidates_tried} (k+, k-) candidates, Bonferroni)"),
            ("delta", f"{self.delta:.3g}"),
            ("epsilon lower bound", f(self.epsilon_lower_bound)),
            ("epsilon accountant", f"{f(self.epsilon_accountant)} ({self.accountant}, for the canaries)"),
            ("epsilon reported", f"{f(self.epsilon_reported)} (the run's, q={self.sample_rate:.4g})"),
            ("noise multiplier", f(self.noise_multiplier)),
            ("steps", str(self.steps)),
            ("result", "PASS" if self.passed else "FAIL"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows) + f"\n{self.message}"


def _training_history(ledger, extra_skip: int = 0) -> list[tuple[float, float, int]]:
    """The ledger's history without the releases made before training (stage-1 statistics: the ledger's
    ``prior_steps`` plus ``extra_skip`` more), in which no gradient canary takes part."""
    skip, out = getattr(ledger, "prior_steps", 0) + extra_skip, []
    for sigma, q, n in ledger.accountant.history:
        take = min(n, skip)
        skip -= take
        if n - take:
            out.append((sigma, q, n - take))
    return out


def _canary_epsilon(trainer, canary_type: str, sampling: str) -> tuple[float, float]:
    """(epsilon for the canaries, the run's reported epsilon), at the run's delta and headline accountant.

    Input canaries are training rows: the reported epsilon (stage 1 included) is theirs. Gradient canaries take
    part in the training releases the ledger counted, with the data's rate q (``poisson``) or in every one
    (``every_step``: q = 1); the epsilon is computed from those history entries, so a release the ledger
    recorded with a wrong noise multiplier or not at all shows up as a bound above it.
    """
    ledger = trainer.ledger
    if ledger.disabled:
        return math.inf, math.inf
    reported = ledger.accountant.epsilon()
    if canary_type == "input":
        return reported, reported
    history = _training_history(ledger)
    if sampling == "every_step":
        history = [(sigma, 1.0, n) for sigma, _, n in history]
    with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q) = -inf at q = 1 and handles it
        return compute_epsilon(history, ledger.delta, ledger.accountant_name), reported


def run_audit(
    build_trainer: Callable,
    train_dataset,
    canary_type: str = "gradient",
    num_canaries: int = 256,
    canary_sampling: str = "every_step",
    observe: str = "release",
    direction: str = "random",
    canary_scale: float = 1.0,
    canary_dataset=None,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    check: bool = True,
) -> AuditResult:
    """Train once with canaries and return the audit's lower bound next to the accountant's epsilon.

    Args:
        build_trainer: ``train_dataset -> DRTrainer``, exactly as the user builds theirs (model, arguments,
            codec, hooks). It is called once, with ``train_dataset`` (gradient canaries) or with ``train_dataset``
            plus the included input canaries; the audit calls ``train()``.
        canary_type: ``gradient`` (white box) or ``input`` (black box).
        canary_dataset: input canaries to use instead of :func:`make_input_canaries`' random ones (same columns).
        confidence: the bound holds with at least this probability (1 - beta).
        guesses: (k+, k-) candidates; default :func:`default_guess_grid`, paid for with a Bonferroni correction.
        check: raise :class:`PrivacyAuditError` when the lower bound exceeds the accountant's epsilon.
    """
    if canary_type not in CANARY_TYPES:
        raise ValueError(f"canary_type={canary_type!r} is unknown: choose one of {', '.join(CANARY_TYPES)}")
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if canary_type == "gradient":
        canaries = GradientCanaries(num_canaries, canary_sampling, observe, direction, canary_scale, seed)
        trainer = build_trainer(train_dataset)
        canaries.attach(trainer)
        trainer.train()
        if canaries.releases == 0:
            raise RuntimeError("no release was observed: the canaries were not installed in the mechanism")
        if trainer.dp_enabled and trainer.ledger.steps < canaries.releases:
            raise PrivacyAuditError(
                f"the mechanism released {canaries.releases} steps but the ledger counted {trainer.ledger.steps}: "
                "a release was not accounted"
            )
        scores, included = canaries.scores, canaries.included
    else:
        from datasets import concatenate_datasets

        canary_sampling, observe = "dataset", "final_model_loss"
        if canary_dataset is None:
            canary_dataset = make_input_canaries(train_dataset, num_canaries, seed)
        num_canaries = len(canary_dataset)
        included = (torch.rand(num_canaries, generator=torch.Generator().manual_seed(seed + 1)) < 0.5).numpy()
        members = canary_dataset.select(np.flatnonzero(included).tolist())
        trainer = build_trainer(concatenate_datasets([train_dataset, members]) if len(members) else train_dataset)
        trainer.train()
        scores = input_canary_scores(trainer, canary_dataset)

    report = trainer.privacy_report()
    eps_canary, eps_reported = _canary_epsilon(trainer, canary_type, canary_sampling)
    outcome = lower_bound_from_scores(scores, included, report["delta"], confidence, guesses)
    passed, message = _verdict(outcome.epsilon_lower_bound, eps_canary, confidence)
    result = AuditResult(
        canary_type=canary_type, canary_sampling=canary_sampling, observe=observe, num_canaries=num_canaries,
        num_included=int(np.sum(included)), guesses=outcome.guesses, correct=outcome.correct,
        abstentions=num_canaries - outcome.guesses, k_plus=outcome.k_plus, k_minus=outcome.k_minus,
        candidates_tried=outcome.candidates_tried, confidence=confidence, delta=report["delta"],
        epsilon_lower_bound=outcome.epsilon_lower_bound, epsilon_accountant=eps_canary, epsilon_reported=eps_reported,
        accountant=report["accountant"], noise_multiplier=report["noise_multiplier"],
        sample_rate=report["sample_rate"], steps=report["steps"] if report["dp_enabled"] else trainer.state.global_step,
        dp_enabled=report["dp_enabled"], passed=passed, message=message, report=report,
    )
    if check and not passed:
        raise PrivacyAuditError(message, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Federated mode: canary parties (client-level, white box)
# ---------------------------------------------------------------------------------------------------------


class _RecordingCodec:
    """The server's view of the codec: delegates everything, and keeps the last input of ``decode`` (the latent
    aggregate R / sqrt(E[k]) the server decodes), so canaries can be scored before decoding."""

    def __init__(self, inner, sink: "FederatedCanaries"):
        self._inner, self._sink = inner, sink

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def decode(self, latent, *args, **kwargs):
        self._sink._last_latent = latent.detach().float().reshape(-1).clone()
        return self._inner.decode(latent, *args, **kwargs)


class FederatedCanaries(_Canaries):
    """m canary parties, each included with probability 1/2 (``included``), for one FederatedSimulation run.

    An included canary is a party whose update is a fixed unit direction u_i (in the flat LoRA update space,
    where the parties clip and add noise) scaled to ``scale * max_update_norm``. When it takes part in a
    round it sends what a real party sends: ``encode_message(privatize_update(update, C, sigma, its own
    generator))`` from :mod:`hf_drencoder.federated.party` (clipped to C, its own N(0, sigma^2 C^2) noise,
    encoded with the federation's codec). Its message is added to the round's messages before
    ``FederatedServer.aggregate_round`` runs, so it counts in k of R = sum / sqrt(k) like any party.

    Args:
        num_canaries: m.
        sampling: ``every_step`` (an included canary takes part in every round: a party with rate q = 1,
            compared with the client-level accountant at q = 1 for the rounds run) or ``poisson`` (each round
            with the federation's party rate q, like a real party: compared with the reported epsilon).
        observe: ``release`` (the aggregate before decoding: R itself without a codec, the latent aggregate
            with one, scored against the encoded directions) or ``update`` (the decoded update the server
            applies, scored against u_i).
        direction: as in :class:`GradientCanaries`.
        scale: as in :class:`GradientCanaries`.
        seed: sets membership, directions and the Poisson draws (the canaries' noise comes from the
            federation's ``noise_seed``, or OS entropy).
    """

    def __init__(self, num_canaries: int, sampling: str = "every_step", observe: str = "release",
                 direction: str = "random", scale: float = 1.0, seed: int = 0):
        super().__init__(num_canaries, sampling, observe, direction, scale, seed)
        self._last_latent = None

    def attach(self, simulation) -> None:
        """Hook into ``simulation`` (a fresh FederatedSimulation, before ``run()``): sets it up (ledger,
        calibration, codec, server) and wraps its server's ``aggregate_round``."""
        if simulation.round != 0 or simulation.history:
            raise ValueError("audit a fresh federation: rounds already run (or resumed) contain no canary")
        simulation._setup()
        server = simulation.server
        if getattr(server, "_audit_canaries", None) is not None:
            return
        self._sim, self._server = simulation, server
        self._num_parties = server.num_parties
        self._norm = self.scale * float(simulation.args.max_update_norm)
        self._directions = _CanaryDirections(self.num_canaries, server.layout.dim, self.direction, self._gen)
        if server.codec is not None:
            server.codec = _RecordingCodec(server.codec, self)
        inner = server.aggregate_round

        def aggregate_round(messages, round_index):
            extra = self._messages(round_index)
            target = self._release_directions() if self.observe == "release" else None
            out = inner(list(messages) + extra, round_index)
            self.releases += 1
            self._score(out, target)
            return out

        server.aggregate_round = aggregate_round
        server._audit_canaries = self

    def _messages(self, round_index: int) -> list:
        from .federated import party as party_module
        from .federated.server import derive_seed
        from .privacy.noise import make_generator

        present = torch.as_tensor(self.included)
        if self.sampling == "poisson":
            present = present & (torch.rand(self.num_canaries, generator=self._gen) < self._server.sample_rate)
        idx = torch.nonzero(present).flatten()
        if idx.numel() == 0:
            return []
        server, sim = self._server, self._sim
        updates = self._directions.rows(idx) * self._norm
        out = []
        for i, update in zip(idx.tolist(), updates):
            pid = self._num_parties + i
            # the party's own code path: a bug in clipping, noise or encoding reaches the canaries too
            gen = make_generator("cpu", derive_seed(sim.args.noise_seed, 4, round_index, pid)) if server.dp_enabled else None
            noised = party_module.privatize_update(update, server.max_norm, server.noise_multiplier, gen)
            payload, kind = party_module.encode_message(noised, sim.codec, server.decode_noise_std or None)
            out.append(party_module.PartyMessage(pid, payload, kind))
        return out

    def _release_directions(self) -> torch.Tensor | None:
        """With a codec: the canaries' directions in the latent space (the encoder is linear), unit rows, at
        the codec's current state (the parties encoded with the same state)."""
        codec = self._sim.codec
        if codec is None:
            return None
        enc = codec.encode(self._directions.rows(torch.arange(self.num_canaries)), noise_std=self._server.decode_noise_std or None)
        return enc / enc.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _score(self, decoded: torch.Tensor, latent_dirs: torch.Tensor | None) -> None:
        server = self._server
        # under DP the server releases y = R / sqrt(E[k]); scale back to R so that scores read in units of C
        unit = math.sqrt(server.expected_parties) if server.dp_enabled else 1.0
        if latent_dirs is not None:
            s = latent_dirs @ (self._last_latent * unit)
        else:
            s = self._directions.project(decoded.detach().float().reshape(-1).cpu() * unit)
        self.scores += s.double().numpy()


def _verdict(lower_bound: float, eps_canary: float, confidence: float) -> tuple[bool, str]:
    if lower_bound <= eps_canary:
        return True, (
            f"PASS: the audit's lower bound {lower_bound:.3f} does not exceed the accountant's "
            f"{eps_canary:.3f}. This does not prove the run private: a correct and a subtly wrong implementation "
            "can both give a lower bound below epsilon."
        )
    return False, (
        f"FAIL: with confidence {confidence}, the run leaked more than epsilon={eps_canary:.3f} about a canary "
        f"(lower bound {lower_bound:.3f} > accountant's epsilon). Noise was skipped or too small, "
        "clipping was bypassed, or a release was not accounted: do not trust this configuration's reported epsilon."
    )


def run_federated_audit(
    simulation,
    num_canaries: int = 256,
    canary_sampling: str = "every_step",
    observe: str = "release",
    direction: str = "random",
    canary_scale: float = 1.0,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    check: bool = True,
) -> AuditResult:
    """Run a federation once with canary parties and return the audit's lower bound next to the client-level
    accountant's epsilon (see :class:`FederatedCanaries` for the canaries and what is compared).

    Args:
        simulation: a fresh :class:`~hf_drencoder.federated.FederatedSimulation` built as the user builds
            theirs (model, arguments, codec), or a function of no arguments that returns one. The audit calls
            ``run()``.
        confidence: as in :func:`run_audit`.
        guesses: as in :func:`run_audit`.
        check: as in :func:`run_audit`.
    """
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sim = simulation() if callable(simulation) else simulation
    canaries = FederatedCanaries(num_canaries, canary_sampling, observe, direction, canary_scale, seed)
    canaries.attach(sim)
    sim.run()
    if canaries.releases == 0:
        raise RuntimeError("no round was aggregated: the canaries took part in nothing")
    report = sim.privacy_report()
    ledger = sim.ledger
    if ledger.disabled:
        eps_canary = eps_reported = math.inf
    else:
        # stage-1 statistics rounds are in the history too (no canary takes part in them)
        stats_rounds = sum(1 for h in sim.history if h.get("stage") == "statistics")
        history = _training_history(ledger, stats_rounds)
        counted = sum(n for _, _, n in history)
        if counted < canaries.releases:
            raise PrivacyAuditError(
                f"the server aggregated {canaries.releases} rounds but the ledger counted {counted}: a round was not accounted"
            )
        if canary_sampling == "every_step":
            history = [(sigma, 1.0, n) for sigma, _, n in history]
        with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q) = -inf at q = 1 and handles it
            eps_canary = compute_epsilon(history, ledger.delta, ledger.accountant_name)
        eps_reported = ledger.accountant.epsilon()
    outcome = lower_bound_from_scores(canaries.scores, canaries.included, report["delta"], confidence, guesses)
    passed, message = _verdict(outcome.epsilon_lower_bound, eps_canary, confidence)
    result = AuditResult(
        canary_type="party", canary_sampling=canary_sampling, observe=observe, num_canaries=num_canaries,
        num_included=int(np.sum(canaries.included)), guesses=outcome.guesses, correct=outcome.correct,
        abstentions=num_canaries - outcome.guesses, k_plus=outcome.k_plus, k_minus=outcome.k_minus,
        candidates_tried=outcome.candidates_tried, confidence=confidence, delta=report["delta"],
        epsilon_lower_bound=outcome.epsilon_lower_bound, epsilon_accountant=eps_canary, epsilon_reported=eps_reported,
        accountant=report["accountant"], noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"],
        steps=canaries.releases, dp_enabled=report["dp_enabled"], passed=passed, message=message, report=report,
    )
    if check and not passed:
        raise PrivacyAuditError(message, result)
    return result


# ---------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------

_MODELS = ("tiny-bert", "tiny-llama", "minilm-r8")
MODES = ("central", "federated")


def _model_and_data(name: str, n: int, seed: int):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    if name == "minilm-r8":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from .embedded import load_reuters, minilm_path, tokenize_dataset

        data = load_reuters("r8")
        num_labels = data["train"].features["label"].num_classes
        path = minilm_path()
        tok = AutoTokenizer.from_pretrained(path)
        data = tokenize_dataset(data, tok, max_length=64)
        train = data["train"].select(range(min(n, len(data["train"])))) if n else data["train"]
        return lambda: AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels), train
    seq = 16
    if name == "tiny-bert":
        from transformers import BertConfig, BertForSequenceClassification

        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, max_position_embeddings=64)
        ids = torch.randint(1, 100, (n, seq), generator=g)
        labels = torch.randint(0, 3, (n,), generator=g).tolist()
        cls = BertForSequenceClassification
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
        ids = torch.randint(0, 128, (n, seq), generator=g)
        labels = ids.tolist()
        cls = LlamaForCausalLM
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels})

    def make_model():
        torch.manual_seed(seed)
        return cls(cfg)

    return make_model, data


@dataclass
class AuditArguments:
    mode: str = field(default="central", metadata={
        "help": "central: audit DRTrainer (example-level). federated: audit FederatedSimulation with canary parties "
                "(client-level); the other options are then FederatedArguments'.", "choices": list(MODES)})
    model: str = field(default="tiny-bert", metadata={"help": "tiny-bert | tiny-llama (from configs, random data) | "
                                                              "minilm-r8 (the embedded demo model and data)",
                                                      "choices": list(_MODELS)})
    train_examples: int = field(default=256, metadata={"help": "Training rows (random data for the tiny models; the "
                                                                "first N of R8 for minilm-r8, 0 = all)."})
    canary_type: str = field(default="gradient", metadata={"help": "gradient (white box) or input (black box).",
                                                           "choices": list(CANARY_TYPES)})
    num_canaries: int = field(default=256, metadata={"help": "m: canaries, each included with probability 1/2."})
    canary_sampling: str = field(default="every_step", metadata={
        "help": "Gradient canaries: every_step (q = 1; compared with the accountant at q = 1) or poisson (the data's "
                "rate; compared with the reported epsilon).", "choices": list(CANARY_SAMPLING)})
    observe: str = field(default="release", metadata={
        "help": "Gradient canaries: release (the mechanism's noisy sum) or update (the decoded gradient the "
                "optimizer gets).", "choices": list(OBSERVE)})
    direction: str = field(default="random", metadata={"help": "random or dirac canary directions.",
                                                       "choices": list(DIRECTIONS)})
    canary_scale: float = field(default=1.0, metadata={"help": "Gradient canary norm in units of C (> 1 also tests clipping)."})
    confidence: float = field(default=0.95, metadata={"help": "Confidence of the lower bound (1 - beta)."})
    audit_seed: int = field(default=0, metadata={"help": "Seed of the canaries and their membership."})
    audit_output: str | None = field(default=None, metadata={"help": "Write the JSON result to this file."})


AUDIT_DEFAULTS = dict(
    output_dir="drencoder-audit", per_device_train_batch_size=16, max_steps=20, learning_rate=1e-2,
    noise_multiplier=1.0, report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True, seed=0,
    target_delta=1e-5,
)


def _finite_or_str(x):
    """JSON has no infinity: an unbounded epsilon is written as the string "inf"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite_or_str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_str(v) for v in x]
    return x


FEDERATED_AUDIT_DEFAULTS = dict(
    output_dir="drencoder-audit-federated", num_parties=64, parties_per_round=4, num_rounds=10, local_steps=2,
    local_batch_size=4, local_learning_rate=0.1, noise_multiplier=1.0, target_delta=1e-5, eval_every=0,
    disable_tqdm=True, seed=0,
)


def _mode(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1]
    return "central"


def main(argv: list[str] | None = None) -> AuditResult:
    """``hf-drencoder audit``: train once with canaries; print the table and the JSON; exit 1 if the bound
    exceeds the accountant's epsilon. ``--mode federated`` audits a FederatedSimulation with canary parties."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    federated = _mode(argv) == "federated"
    if federated:
        from .federated import FederatedArguments, FederatedSimulation

        parser = HfArgumentParser((AuditArguments, FederatedArguments))
        parser.set_defaults(**FEDERATED_AUDIT_DEFAULTS)
    else:
        from .arguments import DRTrainingArguments
        from .trainer import DRTrainer

        parser = HfArgumentParser((AuditArguments, DRTrainingArguments))
        parser.set_defaults(**AUDIT_DEFAULTS)
    if any(a.startswith("--target_epsilon") for a in argv) or "--disable_dp" in argv:
        parser.set_defaults(noise_multiplier=None)
    a, run_args = parser.parse_args_into_dataclasses(args=argv)
    make_model, data = _model_and_data(a.model, a.train_examples, run_args.seed)
    common = dict(num_canaries=a.num_canaries, canary_sampling=a.canary_sampling, observe=a.observe,
                  direction=a.direction, canary_scale=a.canary_scale, confidence=a.confidence, seed=a.audit_seed,
                  check=True)
    if federated and a.canary_type != "gradient":
        raise SystemExit("hf-drencoder audit: --mode federated audits with canary parties (white-box updates); "
                         "use --canary_type gradient")

    try:
        if federated:
            result = run_federated_audit(lambda: FederatedSimulation(make_model(), data, run_args), **common)
        else:
            def build(train):
                return DRTrainer(model=make_model(), args=run_args, train_dataset=train)

            result = run_audit(build, data, canary_type=a.canary_type, **common)
        failed = None
    except PrivacyAuditError as e:
        if e.result is None:
            raise SystemExit(f"hf-drencoder audit: {e}") from None
        result, failed = e.result, e
    out = _finite_or_str({k: v for k, v in result.to_dict().items() if k != "report"})
    text = json.dumps(out, indent=2, allow_nan=False)
    print(result.table())
    print(text)
    if a.audit_output:
        with open(a.audit_output, "w") as fh:
            fh.write(text + "\n")
    if failed is not None:
        print(f"hf-drencoder audit: {failed}", file=sys.stderr)
        raise SystemExit(1)
    return result


__all__ = [
    "AuditResult",
    "FederatedCanaries",
    "GradientCanaries",
    "PrivacyAuditError",
    "audit_p_value",
    "count_correct",
    "default_guess_grid",
    "epsilon_lower_bound",
    "input_canary_scores",
    "lower_bound_from_scores",
    "make_input_canaries",
    "run_audit",
    "run_federated_audit",
]
