"""Group-level (user-level) privacy: the unit protected is a group of rows (all the rows of one person).

Adding or removing one group must move the released sum by at most C. Three pieces make that true:

- the sampler includes each *group* independently with probability q (Poisson over groups) and keeps a
  sampled group's rows together in one micro-batch on one process;
- the collator tags each row with its group's position in the micro-batch (``dr_group_index``);
- ``sum_by_group`` adds a group's per-example gradients into one vector, which the mechanism then clips to C
  as it would clip one example.

The accountant is unchanged: the same subsampled Gaussian, with q = expected groups per step / groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler

from .sampling import EMPTY_BATCH_KEY

GROUP_INDEX_KEY = "dr_group_index"


def _is_missing(value) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN (float, numpy or 0-d tensor) is the one value unequal to itself
    except (TypeError, ValueError, RuntimeError):
        return type(value).__name__ == "NAType"  # pandas.NA refuses bool(); an array id is refused as unhashable later


def group_rows(group_values: Sequence) -> list[list[int]]:
    """Row indices of each group, groups in order of first appearance (stable for a given column).

    ``group_values[i]`` is the group id of row ``i`` (e.g. ``dataset["user_id"]``). A missing id is refused: it
    has no owner, and putting all such rows into one "None" group or one group each would both be a guess about
    whose data they are."""
    if isinstance(group_values, torch.Tensor):
        group_values = group_values.tolist()
    position: dict = {}
    groups: list[list[int]] = []
    for row, value in enumerate(group_values):
        if _is_missing(value):
            raise ValueError(
                f"row {row} has a missing group id ({value!r}): every row must name the group (person) it belongs "
                "to. Fill or drop such rows before training with privacy_unit='group'"
            )
        try:
            k = position.setdefault(value, len(groups))
        except TypeError:
            raise TypeError(
                f"row {row} has an unhashable group id of type {type(value).__name__}: use a string or integer id"
            ) from None
        if k == len(groups):
            groups.append([])
        groups[k].append(row)
    return groups


class GroupPoissonBatchSampler(Sampler[list[int]]):
    """Yields the micro-batches (row indices) of Poisson-sampled logical batches of *groups*.

    Same contract as ``PoissonBatchSampler``, with groups in place of examples: each logical batch (one optimizer
    step) includes every group independently with probability ``sample_rate``; the sampled groups (not their rows)
    are split into ``micro_batches`` consecutive chunks, and data parallel processes keep the groups
    ``rank::num_replicas`` of each chunk of one global draw. A group's rows therefore always land in one
    micro-batch of one process, where they are summed and clipped as one contribution. Empty micro-batches are
    valid outcomes and must still be (noise-only) steps.

    ``max_rows_per_group``: a sampled group with more rows contributes that many, chosen uniformly at random
    without replacement, afresh at every step. The choice comes from the same generator as the inclusion draws:
    that generator is secret (seeded like the noise) and identical on every process, so all processes agree on
    the rows. This bounds compute per group; the sensitivity is C either way.

    Draws come from a generator seeded with ``(seed, epoch)``, so a resumed run replays the same batches.
    """

    def __init__(
        self,
        groups: list[list[int]],
        sample_rate: float,
        steps_per_epoch: int,
        micro_batches: int = 1,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        max_rows_per_group: int | None = None,
    ):
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        if not groups:
            raise ValueError("GroupPoissonBatchSampler needs at least one group")
        if not (0 < sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if max_rows_per_group is not None and (isinstance(max_rows_per_group, bool) or int(max_rows_per_group) < 1):
            raise ValueError(f"max_rows_per_group must be None or an integer >= 1, got {max_rows_per_group}")
        seen: set[int] = set()
        for k, rows in enumerate(groups):
            if len(rows) == 0:
                raise ValueError(f"group {k} has no rows")
            for r in rows:
                # a row in two groups would be one person's data in two units: add/remove of a group would no
                # longer bound that person's influence
                if r in seen:
                    raise ValueError(f"row {r} belongs to more than one group; groups must be disjoint")
                seen.add(r)
        self.groups = [torch.as_tensor(list(rows), dtype=torch.long) for rows in groups]
        self.sample_rate = sample_rate
        self.steps_per_epoch = steps_per_epoch
        self.micro_batches = micro_batches
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.max_rows_per_group = None if max_rows_per_group is None else int(max_rows_per_group)
        self.epoch = 0

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch * self.micro_batches

    def _rows_of(self, group: int, g: torch.Generator) -> torch.Tensor:
        rows = self.groups[group]
        k = self.max_rows_per_group
        if k is None or rows.numel() <= k:
            return rows
        pick = torch.randperm(rows.numel(), generator=g)[:k]
        return rows[pick.sort().values]

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.epoch) % (2**63))
        for _ in range(self.steps_per_epoch):
            sampled = (torch.rand(self.num_groups, generator=g) < self.sample_rate).nonzero().flatten().tolist()
            # rows are chosen for every sampled group on every process (not just this share), so that the
            # generators of all processes stay in step
            rows = {k: self._rows_of(k, g) for k in sampled}
            for chunk in _split(sampled, self.micro_batches):
                share = chunk[self.rank :: self.num_replicas]
                yield torch.cat([rows[k] for k in share]).tolist() if share else []


def _split(items: list, parts: int) -> list[list]:
    """``items`` cut into ``parts`` consecutive chunks whose sizes differ by at most one (as torch.tensor_split)."""
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(items[start:end])
        start = end
    return out


class GroupIndexCollator:
    """Wraps a data collator: takes the group column out of every row, collates the rest, and adds
    ``dr_group_index`` ([b] long): each row's group numbered 0..g-1 in order of first appearance in the micro-batch
    (a group's rows need not be adjacent).

    Put it *outside* Trainer's column removal (``GroupIndexCollator(RemoveColumnsCollator(...))``), since that
    would drop the group column first. An empty micro-batch returns the same marker as ``EmptyBatchCollator``, so
    it works inside or outside one. The rows given are not modified.

    The collated tensors must have the rows as their first dimension: a collator that packs rows into one
    sequence would break the row -> group alignment that the clipping relies on, and is refused.
    """

    def __init__(self, collator, column: str):
        self.collator = collator
        self.column = column

    def __call__(self, features):
        if len(features) == 0:
            return {EMPTY_BATCH_KEY: torch.ones(1)}
        position: dict = {}
        index, rows = [], []
        for i, f in enumerate(features):
            if self.column not in f:
                raise KeyError(f"row {i} of the batch has no group column {self.column!r}")
            value = f[self.column]
            if _is_missing(value):
                raise ValueError(f"row {i} of the batch has a missing group id ({value!r})")
            if isinstance(value, torch.Tensor):
                value = value.item()
            index.append(position.setdefault(value, len(position)))
            rows.append({k: v for k, v in f.items() if k != self.column})
        batch = self.collator(rows)
        b = len(features)
        for key, value in batch.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != b:
                raise ValueError(
                    f"the collator returned {key!r} with first dimension {value.shape[0]} for {b} rows: group privacy "
                    "needs one batch row per dataset row (a packing collator such as DataCollatorWithFlattening "
                    "cannot be used; use DataCollatorWithPadding)"
                )
        batch[GROUP_INDEX_KEY] = torch.tensor(index, dtype=torch.long)
        return batch


def sum_by_group(
    grad_samples: list[torch.Tensor],
    group_index: torch.Tensor,
    num_groups: int | None = None,
    out: list[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Per-example gradients ``[b, *shape]`` (one tensor per parameter) -> per-group sums ``[g, *shape]`` (fp32).

    Clipping the result as if each group were one example bounds each group's contribution by C. ``num_groups``
    defaults to ``group_index.max() + 1``; pass it (and ``out``, the sums so far) when one micro-batch is run as
    several physical pieces, so that a group split across pieces is still summed *before* it is clipped."""
    group_index = torch.as_tensor(group_index)
    if group_index.dim() != 1 or group_index.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"group_index must be a 1-D integer tensor, got {group_index.dtype} {tuple(group_index.shape)}"
        )
    b = group_index.shape[0]
    if num_groups is None:
        num_groups = int(group_index.max()) + 1 if b else 0
    if b and (int(group_index.min()) < 0 or int(group_index.max()) >= num_groups):
        raise ValueError(f"group_index values must lie in [0, {num_groups})")
    if out is not None and len(out) != len(grad_samples):
        raise ValueError(f"out has {len(out)} tensors for {len(grad_samples)} parameters")
    sums = []
    for j, gs in enumerate(grad_samples):
        if gs.shape[0] != b:
            raise ValueError(f"per-example gradient {j} has {gs.shape[0]} rows for {b} group indices")
        if out is None:
            acc = torch.zeros((num_groups, *gs.shape[1:]), dtype=torch.float32, device=gs.device)
        else:
            acc = out[j]
            if acc.shape != (num_groups, *gs.shape[1:]):
                raise ValueError(f"out[{j}] has shape {tuple(acc.shape)}, expected {(num_groups, *gs.shape[1:])}")
        sums.append(acc.index_add_(0, group_index.to(gs.device), gs.float()))
    return sums

