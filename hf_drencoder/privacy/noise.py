"""Gaussian noise for the Gaussian mechanism."""

from __future__ import annotations

import secrets

import torch


def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """A generator for noise draws. Without a seed it is seeded from the OS entropy pool, so noise cannot
    be replayed from a seed that appears in a config or a log."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else secrets.randbits(63))
    return g


def gaussian_noise_like(tensor: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise of ``tensor``'s shape, in fp32 on ``tensor``'s device."""
    return torch.normal(0.0, float(std), size=tensor.shape, generator=generator, device=tensor.device, dtype=torch.float32)
