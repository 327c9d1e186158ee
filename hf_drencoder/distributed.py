"""The one place where processes talk to each other (data-parallel DP): everything goes through accelerate.

Before training, the processes compare a fingerprint of their training sets (``gather_from_processes``).
The private step needs one collective: the sum over processes of each process's clipped (and, on the main
process, noised) gradient sum. Nothing un-noised leaves the job: the sum is only ever used after the noise
drawn by the main process is in it.
"""

from __future__ import annotations

import torch
from accelerate.utils import broadcast_object_list, gather_object, reduce


def sum_over_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sum of ``tensors`` over all processes (one flat all-reduce), the same result on every rank."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    total = reduce(flat, reduction="sum")
    out, offset = [], 0
    for t in tensors:
        out.append(total[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def from_main_process(value):
    """``value`` as the main process has it, on every process (a no-op in one process)."""
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def gather_from_processes(value) -> list:
    """``value`` from every process, in rank order, on every process."""
    return list(gather_object([value]))


__all__ = ["from_main_process", "gather_from_processes", "sum_over_processes"]
