"""One thread for the codec's few memory-bound passes."""

from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def one_thread():
    """Run the codec's few memory-bound passes on one thread. Measured on a loaded 2-core machine: one
    roundtrip at 1/64 of MiniLM's LoRA gradient took ~420 ms with a 2-thread pool (every parallel region
    waits for a descheduled thread) and 2-15 ms on one thread."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def single_threaded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_thread():
            return fn(*args, **kwargs)

    return wrapper


__all__ = ["one_thread", "single_threaded"]
