"""Splitting one dataset into the private datasets of N parties: IID, or non-IID by a label column.

Two non-IID schemes by label, both with concentration ``alpha`` (small alpha: each party holds few classes; large
alpha approaches the IID split):

* ``dirichlet`` (Yurochkin et al. 2019): for every class c the rows of that class are divided among the parties in
  proportions ``p_c ~ Dirichlet(alpha * 1_N)``, so party sizes vary too. Every party must end up with at least
  ``min_size`` rows: the proportions are redrawn (from the same seeded generator) until that holds, and a split
  that cannot be found is an error that says which knob to turn. With many parties and few rows each (1,000
  parties on a few thousand rows) no such split exists.
* ``dirichlet_equal_size`` (Hsu, Qi and Brown 2019): every party gets the same number of rows (sizes differ by at
  most one) and its own label mix ``q_i ~ Dirichlet(alpha * p)``, ``p`` the dataset's class frequencies; its rows
  are drawn without replacement from the classes in those proportions (a class that runs out is dropped from the
  mix). This is the scheme for populations of thousands of small parties.
"""

from __future__ import annotations

import numpy as np

PARTITIONS = ("iid", "dirichlet", "dirichlet_equal_size")
_MAX_REDRAWS = 1000


def default_label_column(dataset) -> str:
    """``labels`` if the dataset has it, else ``label``."""
    for name in ("labels", "label"):
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"no label column: the dataset has {dataset.column_names}; pass label_column= (the column the Dirichlet "
        "split is made by)"
    )


def partition_indices(
    dataset,
    num_parties: int,
    scheme: str = "iid",
    alpha: float = 0.5,
    label_column: str | None = None,
    seed: int = 0,
    min_size: int = 1,
) -> list[list[int]]:
    """Row indices of each party: disjoint, covering ``dataset``, every party with ``>= min_size`` rows.

    ``iid``: a seeded shuffle cut into ``num_parties`` pieces whose sizes differ by at most one.
    ``dirichlet``: per class, proportions drawn from Dirichlet(``alpha``); ``dirichlet_equal_size``: equal sizes,
    a Dirichlet(``alpha * p``) label mix per party (see the module docstring).
    """
    n = len(dataset)
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition {scheme!r}; choose one of {PARTITIONS}")
    if num_parties < 1:
        raise ValueError(f"num_parties must be >= 1, got {num_parties}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size}")
    if n < num_parties * min_size:
        raise ValueError(
            f"{n} rows cannot give {num_parties} parties {min_size} row(s) each: use fewer parties or more data"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        perm = rng.permutation(n)
        return [sorted(int(i) for i in part) for part in np.array_split(perm, num_parties)]
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"dirichlet alpha must be positive and finite, got {alpha}")
    column = label_column or default_label_column(dataset)
    labels = np.asarray(dataset[column])
    if labels.ndim != 1:
        raise ValueError(f"label column {column!r} must hold one label per row (a Dirichlet split needs classes)")
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    if scheme == "dirichlet_equal_size":
        return _equal_size_label_mix(classes, n, num_parties, alpha, rng)
    for _ in range(_MAX_REDRAWS):
        parts: list[list[int]] = [[] for _ in range(num_parties)]
        for rows in classes:
            rows = rng.permutation(rows)
            proportions = rng.dirichlet(np.full(num_parties, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(int)
            for party, piece in enumerate(np.split(rows, cuts)):
                parts[party].extend(int(i) for i in piece)
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} rows ({len(classes)} classes) gave all {num_parties} parties "
        f">= {min_size} row(s) in {_MAX_REDRAWS} draws: raise alpha, use fewer parties, or lower min_size"
    )


def _equal_size_label_mix(classes: list[np.ndarray], n: int, num_parties: int, alpha: float,
                          rng: np.random.Generator) -> list[list[int]]:
    """Hsu et al. 2019: party i gets ``n // N`` or ``n // N + 1`` rows with label mix ``Dirichlet(alpha * p)``."""
    pools = [list(rng.permutation(rows)) for rows in classes]
    prior = np.array([len(rows) for rows in classes], dtype=float) / n
    sizes = [len(part) for part in np.array_split(np.arange(n), num_parties)]
    parts: list[list[int]] = []
    for size in sizes:
        mix = rng.dirichlet(alpha * prior)
        mine: list[int] = []
        while len(mine) < size:
            left = np.array([len(pool) for pool in pools], dtype=float)
            weights = mix * (left > 0)
            # every class this party would draw from is used up: draw from what remains, in proportion to it
            weights = weights / weights.sum() if weights.sum() > 0 else left / left.sum()
            counts = rng.multinomial(size - len(mine), weights)
            for c, k in enumerate(counts):
                take = min(int(k), len(pools[c]))
                mine.extend(int(pools[c].pop()) for _ in range(take))
        parts.append(sorted(mine))
    return parts


def partition_dataset(dataset, num_parties: int, scheme: str = "iid", alpha: float = 0.5, label_column=None, seed: int = 0,
                      min_size: int = 1) -> list:
    """The parties' datasets (``dataset.select`` of `partition_indices`)."""
    return [dataset.select(idx) for idx in partition_indices(dataset, num_parties, scheme, alpha, label_column, seed, min_size)]


__all__ = ["PARTITIONS", "default_label_column", "partition_dataset", "partition_indices"]
