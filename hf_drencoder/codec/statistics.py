"""Stage 1: private statistics of per-sample-clipped LoRA gradients.

A party releases, for a few Poisson-sampled batches, noisy sums of its clipped per-example gradients
``g_i`` (``||g_i|| <= C``) and of their element-wise squares. Nothing else about the gradients ever
leaves it; the server builds a prior from these sums and pre-trains the codec on samples of that prior.

Released parts (all sums over the examples of one batch):

``sum``        per element, ``sum_i g_i``                                 degree 1, length ``dim``
``sumsq``      per element, ``sum_i g_i**2``                              degree 2, length ``dim``
``row_sumsq``  per tensor row, ``sum_i sum_cols g_i**2`` (tensor as matrix)  degree 2, one per row
``col_sumsq``  per tensor column, ``sum_i sum_rows g_i**2``               degree 2, one per column

Sensitivity (add/remove one example, the relation the Poisson-subsampled accountants use). Scale every
degree-d part by ``C**-d`` and stack the parts into one vector ``v``. One example changes ``v`` by

    ||g/C||^2 + sum over degree-2 parts ||p(g**2)/C**2||^2  <=  1 + (P - 1) * 1 = P,

because ``||g|| <= C`` and every degree-2 part ``p(g**2)`` is a non-negative vector whose L1 norm is
``||g||^2 <= C^2`` (rows and columns are sums of disjoint sets of squares), so its L2 norm is at most
``C^2``. With ``P`` parts the L2 sensitivity of ``v`` is ``sqrt(P)``; for ``sum`` + ``sumsq`` alone it is
``sqrt(2)``. Adding ``N(0, (z * sqrt(P))^2 I)`` to ``v`` is therefore ONE Gaussian mechanism with noise
multiplier ``z``: the accountant records ``(z, q, 1)`` per batch, exactly like one DP-SGD step. In gradient
units the noise on a degree-d part has std ``z * sqrt(P) * C**d``. Summing the noisy batch releases, and
everything derived from them afterwards (means, per-module moments, priors, the codec), is post-processing.

Recording the parts as separate mechanisms ``(z, q, 2)`` would NOT be valid: both are computed on the same
Poisson sample, while the accountant's composition assumes an independent sample per release.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..privacy.accounting import PrivacyAccountant
from ..privacy.clipping import clip_and_sum, per_sample_norms
from ..privacy.noise import gaussian_noise_like, make_generator
from ..privacy.per_sample import attach_grad_sample_hooks, pop_per_sample_gradients
from .layout import LoraLayout

PARTS = ("sum", "sumsq", "row_sumsq", "col_sumsq")
DEFAULT_PARTS = PARTS
_DEGREE = {"sum": 1, "sumsq": 2, "row_sumsq": 2, "col_sumsq": 2}

STATS_WEIGHTS = "statistics.safetensors"
STATS_CONFIG = "statistics.json"


def statistics_sensitivity(parts: Sequence[str]) -> float:
    """L2 sensitivity of the scaled joint vector of ``parts`` (see module docstring): ``sqrt(len(parts))``."""
    parts = _check_parts(parts)
    return math.sqrt(len(parts))


def part_noise_std(part: str, noise_multiplier: float, max_grad_norm: float, parts: Sequence[str]) -> float:
    """Std of the noise one batch release adds to ``part``, in gradient units (``z sqrt(P) C^degree``)."""
    return noise_multiplier * statistics_sensitivity(parts) * max_grad_norm ** _DEGREE[part]


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    parts = tuple(parts)
    if not parts:
        raise ValueError(f"no statistics to release: choose one or more of {PARTS}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown statistics part(s) {unknown}; choose from {PARTS}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"statistics parts repeated: {parts}")
    return tuple(p for p in PARTS if p in parts)  # canonical order


def _part_sizes(layout: LoraLayout) -> dict[str, int]:
    rows = sum(b.matrix_shape[0] for b in layout.blocks)
    cols = sum(b.matrix_shape[1] for b in layout.blocks)
    return {"sum": layout.dim, "sumsq": layout.dim, "row_sumsq": rows, "col_sumsq": cols}


def _marginals(layout: LoraLayout, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column sums of ``sq`` ([..., dim]) per tensor, concatenated in layout order."""
    rows, cols = [], []
    for b, sl in layout.block_slices():
        m = sq[..., sl].reshape(*sq.shape[:-1], *b.matrix_shape)
        rows.append(m.sum(-1))
        cols.append(m.sum(-2))
    return torch.cat(rows, -1), torch.cat(cols, -1)


@dataclass
class GradientStatistics:
    """Released (noisy) totals over ``num_releases`` batches, with what is needed to read them.

    ``expected_examples`` = ``sample_rate * dataset_size * num_releases`` is the public normaliser: means
    are divided by it, never by the drawn (private) number of examples.
    """

    layout: LoraLayout
    totals: dict[str, torch.Tensor]
    max_grad_norm: float
    noise_multiplier: float
    sample_rate: float
    num_releases: int
    expected_examples: float
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        parts = _check_parts(tuple(self.totals))
        if self.expected_examples <= 0 or self.num_releases <= 0:
            raise ValueError("empty statistics: no batch was released (num_releases and expected_examples must be > 0)")
        sizes = _part_sizes(self.layout)
        for p in parts:
            t = self.totals[p]
            if t.shape != (sizes[p],):
                raise ValueError(f"statistics part {p} has shape {tuple(t.shape)}, layout needs ({sizes[p]},)")
            if not torch.isfinite(t).all():
                raise ValueError(f"statistics part {p} contains NaN or inf values")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive and finite, got {self.max_grad_norm}")
        self.totals = {p: self.totals[p].float() for p in parts}

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.totals)

    def noise_std(self, part: str) -> float:
        """Std of the noise in the released TOTAL of ``part`` (``num_releases`` independent draws)."""
        return part_noise_std(part, self.noise_multiplier, self.max_grad_norm, self.parts) * math.sqrt(self.num_releases)

    def mean_noise_std(self, part: str) -> float:
        """Std of the noise in ``moment(part)`` (the total divided by ``expected_examples``)."""
        return self.noise_std(part) / self.expected_examples

    def moment(self, part: str) -> torch.Tensor:
        """``total / expected_examples``: first moment for ``sum``, second moments for the others."""
        if part not in self.totals:
            raise KeyError(f"statistics part {part!r} was not released (have {self.parts})")
        return self.totals[part] / self.expected_examples

    @property
    def nbytes(self) -> int:
        """Bytes of the released statistics (fp32), once, after summing the batch releases."""
        return 4 * sum(t.numel() for t in self.totals.values())

    def block_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor (module x factor): mean entry and mean squared entry, by post-processing.

        The second moment comes from whichever degree-2 part sums the tensor with the least noise.
        """
        nb = len(self.layout.blocks)
        mean = torch.zeros(nb)
        sq = torch.zeros(nb)
        first = self.moment("sum") if "sum" in self.totals else None
        rows = self.moment("row_sumsq") if "row_sumsq" in self.totals else None
        cols = self.moment("col_sumsq") if "col_sumsq" in self.totals else None
        el = self.moment("sumsq") if "sumsq" in self.totals else None
        r_off = c_off = 0
        for i, (b, sl) in enumerate(self.layout.block_slices()):
            nr, nc = b.matrix_shape
            if first is not None:
                mean[i] = first[sl].mean()
            candidates = []
            if rows is not None:
                candidates.append((nr, rows[r_off : r_off + nr].sum()))
            if cols is not None:
                candidates.append((nc, cols[c_off : c_off + nc].sum()))
            if el is not None:
                candidates.append((b.numel, el[sl].sum()))
            if candidates:  # fewest summed noisy entries = least noise
                sq[i] = min(candidates, key=lambda c: c[0])[1] / b.numel
            r_off += nr
            c_off += nc
        return mean, sq

    # persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.totals.items()}, os.path.join(directory, STATS_WEIGHTS))
        config = {
            "layout": self.layout.to_dict(),
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "num_releases": self.num_releases,
            "expected_examples": self.expected_examples,
            "parts": list(self.parts),
            "meta": self.meta,
        }
        with open(os.path.join(directory, STATS_CONFIG), "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def load(cls, directory: str) -> "GradientStatistics":
        from safetensors.torch import load_file

        with open(os.path.join(directory, STATS_CONFIG)) as f:
            config = json.load(f)
        totals = load_file(os.path.join(directory, STATS_WEIGHTS))
        return cls(
            layout=LoraLayout.from_dict(config["layout"]),
            totals={p: totals[p] for p in config["parts"]},
            max_grad_norm=config["max_grad_norm"],
            noise_multiplier=config["noise_multiplier"],
            sample_rate=config["sample_rate"],
            num_releases=config["num_releases"],
            expected_examples=config["expected_examples"],
            meta=config.get("meta", {}),
        )


class StatisticsAccumulator:
    """Sums clipped per-sample statistics over the micro-batches of one batch, releases them noised.

    ``add`` takes per-sample gradients (one ``[b, *shape]`` tensor per layout tensor, or a flat
    ``[b, dim]``); ``release_batch`` adds the Gaussian noise of one mechanism invocation and records it in
    the accountant; ``finish`` returns the released totals as `GradientStatistics`.
    """

    def __init__(
        self,
        layout: LoraLayout,
        max_grad_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        dataset_size: int,
        parts: Sequence[str] = DEFAULT_PARTS,
        accountant: PrivacyAccountant | None = None,
        noise_seed: int | None = None,
    ):
        if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
            raise ValueError(f"max_grad_norm must be positive and finite, got {max_grad_norm}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be >= 0 and finite, got {noise_multiplier}")
        if noise_multiplier == 0 and accountant is not None:
            raise ValueError("noise_multiplier=0 releases the statistics without privacy; refusing to record it in an accountant")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if dataset_size <= 0:
            raise ValueError("dataset_size must be > 0")
        self.layout = layout
        self.parts = _check_parts(parts)
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.dataset_size = int(dataset_size)
        self.accountant = accountant
        self.generator = make_generator("cpu", noise_seed)
        sizes = _part_sizes(layout)
        self._batch = {p: torch.zeros(sizes[p]) for p in self.parts}
        self._totals = {p: torch.zeros(sizes[p]) for p in self.parts}
        self.num_releases = 0

    def add(self, grad_samples) -> torch.Tensor:
        """Clip each example to ``max_grad_norm`` (flat clipping) and add its statistics to the batch."""
        if isinstance(grad_samples, torch.Tensor):
            grad_samples = self.layout.unflatten(grad_samples)
        grad_samples = [g.detach().float().cpu() for g in grad_samples]
        # the same flat clipping as the training mechanism, so that ||g_i|| <= C holds for every example
        sums, norms = clip_and_sum(grad_samples, self.max_grad_norm, "flat")
        factor = (self.max_grad_norm / (per_sample_norms(grad_samples) + 1e-6)).clamp(max=1.0)
        if "sum" in self.parts:
            self._batch["sum"] += self.layout.flatten(sums)
        if len(self.parts) > ("sum" in self.parts):
            flat = self.layout.flatten(grad_samples) * factor[:, None]
            sq = flat.pow(2)
            if "sumsq" in self.parts:
                self._batch["sumsq"] += sq.sum(0)
            if "row_sumsq" in self.parts or "col_sumsq" in self.parts:
                rows, cols = _marginals(self.layout, sq.sum(0))
                if "row_sumsq" in self.parts:
                    self._batch["row_sumsq"] += rows
                if "col_sumsq" in self.parts:
                    self._batch["col_sumsq"] += cols
        return norms

    def release_batch(self) -> None:
        """One Gaussian mechanism on this batch's sums; also called for an empty batch (noise only)."""
        for p in self.parts:
            std = part_noise_std(p, self.noise_multiplier, self.max_grad_norm, self.parts)
            noisy = self._batch[p]
            if std > 0:
                noisy = noisy + gaussian_noise_like(noisy, std, self.generator)
            self._totals[p] += noisy
            self._batch[p] = torch.zeros_like(self._batch[p])
        self.num_releases += 1
        if self.accountant is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate, 1)

    def finish(self, meta: dict | None = None) -> GradientStatistics:
        if self.num_releases == 0:
            raise ValueError("empty statistics: release_batch() was never called")
        return GradientStatistics(
            layout=self.layout,
            totals={p: t.clone() for p, t in self._totals.items()},
            max_grad_norm=self.max_grad_norm,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            num_releases=self.num_releases,
            expected_examples=self.sample_rate * self.dataset_size * self.num_releases,
            meta=dict(meta or {}),
        )


def per_sample_gradients(model: torch.nn.Module, hooks, batch: dict, task: str, problem_type=None) -> list[torch.Tensor]:
    """Per-example gradients of the trainable tensors for one micro-batch (opacus hooks already attached).

    The loss is the sum of per-example losses, so ``grad_sample[i]`` is exactly example i's gradient.
    """
    from ..losses import per_sample_losses

    params = [p for p in model.parameters() if p.requires_grad]
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    losses = per_sample_losses(out.logits, labels, task, problem_type)
    losses.sum().backward()
    return pop_per_sample_gradients(params, losses.shape[0])


def collect_gradient_statistics(
    model: torch.nn.Module,
    dataset,
    collate_fn: Callable[[list], dict],
    *,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    num_batches: int,
    accountant: PrivacyAccountant | None = None,
    parts: Sequence[str] = DEFAULT_PARTS,
    micro_batch_size: int = 32,
    seed: int | None = None,
    noise_seed: int | None = None,
    progress: bool = True,
) -> GradientStatistics:
    """Stage 1 on one party: release noisy statistics of ``num_batches`` Poisson batches of ``dataset``.

    Each example is in each batch independently with probability ``q = expected_batch_size / len(dataset)``;
    its gradient (the sum of the per-example losses' gradients w.r.t. the trainable LoRA tensors) is clipped
    to ``max_grad_norm``; each batch's sums are released with noise multiplier ``noise_multiplier`` and
    recorded as ``accountant.step(noise_multiplier, q)``, composing with training in the same ledger.
    """
    from tqdm.auto import tqdm

    from ..losses import infer_task
    from ..privacy.sampling import PoissonBatchSampler

    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    n = len(dataset)
    q = expected_batch_size / n
    if not (0 < q <= 1):
        raise ValueError(f"expected_batch_size must be in (0, len(dataset)={n}], got {expected_batch_size}")
    layout = LoraLayout.from_model(model)
    task = infer_task(model)
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)
    acc = StatisticsAccumulator(layout, max_grad_norm, noise_multiplier, q, n, parts, accountant, noise_seed)
    # the sampling is secret like the noise (amplification by subsampling assumes nobody knows the batches):
    # fresh OS entropy unless a seed is given (reproducible runs for tests)
    sampler = PoissonBatchSampler(
        n, q, steps_per_epoch=num_batches, micro_batches=1, seed=seed if seed is not None else secrets.randbits(62)
    )
    was_training = model.training
    model.train()  # opacus hooks capture nothing in eval mode
    hooks = attach_grad_sample_hooks(model)
    try:
        for indices in tqdm(sampler, total=num_batches, desc="stage-1 statistics", disable=not progress):
            for start in range(0, len(indices), micro_batch_size):
                chunk = indices[start : start + micro_batch_size]
                batch = collate_fn([dataset[i] for i in chunk])
                acc.add(per_sample_gradients(model, hooks, batch, task, problem_type))
            acc.release_batch()  # also for an empty batch: its size must not show
    finally:
        hooks.cleanup()
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    return acc.finish({"dataset_size": n, "expected_batch_size": expected_batch_size, "task": task})


__all__ = [
    "DEFAULT_PARTS",
    "GradientStatistics",
    "PARTS",
    "StatisticsAccumulator",
    "collect_gradient_statistics",
    "part_noise_std",
    "per_sample_gradients",
    "statistics_sensitivity",
]
