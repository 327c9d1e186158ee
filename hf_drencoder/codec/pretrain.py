"""Pre-training a codec on synthetic gradients drawn from a prior, never on real gradients.

The encoder and the MMSE decoder follow from the prior in closed form. What is trained is the optional
nonlinear residual of the decoder (``decoder="mlp"``): on fresh prior samples, with noise levels drawn from
the range the codec will meet, against a held-out synthetic validation set, with early stopping. It is
kept only if it beats the linear MMSE decoder on that held-out set; otherwise it is switched off and the
codec decodes with MMSE alone (the report in ``codec.pretrain_report`` says which and by how much).
"""

from __future__ import annotations

import copy
import math

import torch

from .codec import GradientCodec
from .priors import GaussianPrior


def _noise_levels(noise_std, n_levels: int) -> list[float]:
    if noise_std is None:
        return [0.0]
    if isinstance(noise_std, (int, float)):
        s = float(noise_std)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"noise_std must be >= 0 and finite, got {noise_std}")
        return [s]
    lo, hi = (float(x) for x in noise_std)
    if not (0 < lo <= hi and math.isfinite(hi)):
        raise ValueError(f"noise_std range must satisfy 0 < low <= high, got {noise_std}")
    if n_levels == 1 or lo == hi:
        return [lo]
    return [math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (n_levels - 1)) for i in range(n_levels)]


def _relative_loss(est: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    return (est - clean).pow(2).sum() / clean.pow(2).sum().clamp(min=1e-30)


@torch.no_grad()
def heldout_loss(codec: GradientCodec, val: list[tuple[float, torch.Tensor, torch.Tensor]], use_residual: bool) -> float:
    """Relative squared error ``sum ||g_hat - g||^2 / sum ||g||^2`` over a held-out synthetic set."""
    num = den = 0.0
    for s, clean, noisy in val:
        z = codec.encode(noisy, s)
        est = codec._decode_batch(z, s * s, use_residual)
        num += float((est - clean).pow(2).sum())
        den += float(clean.pow(2).sum())
    return num / max(den, 1e-30)


def pretrain_codec(
    prior: GaussianPrior,
    latent_ratio: float = 1 / 64,
    *,
    decoder: str = "mmse",
    noise_std=None,
    temporal_window: int = 0,
    temporal_rho: float | None = None,
    lora_rank: int | None = None,
    max_steps: int = 300,
    batch_size: int = 32,
    val_size: int = 128,
    noise_levels: int = 4,
    eval_every: int = 20,
    patience: int = 3,
    lr: float = 1e-3,
    min_gain: float = 0.01,
    seed: int = 0,
    progress: bool = True,
    **codec_kwargs,
) -> GradientCodec:
    """Build a `GradientCodec` for ``prior`` and pre-train it on samples of ``prior``.

    Args:
        prior: a `GaussianPrior` (from `build_prior`); the only input, no gradients.
        latent_ratio: latent size over gradient size, in (0, 1].
        decoder: ``"mmse"`` (closed form; only a held-out evaluation is run) or ``"mlp"`` (train the residual).
        noise_std: per-coordinate noise std the codec must decode under: ``None`` (clean), a number, or a
            ``(low, high)`` range sampled log-uniformly at ``noise_levels`` levels.
        temporal_window: latent slots for the span form of the temporal prior (0: off).
        temporal_rho: persistence of the AR(1) temporal prior; ``None`` means 0.8 (the best measured, see
            docs/codec.md) for the MMSE decoder and 0 for the learned one, which is trained on the static prior.
            The temporal state is used at run time; pretraining evaluates the first step (the static prior).
        lora_rank: rank of the warm-started low-rank part for the LoRA factors; ``None`` means 1 for the MMSE
            decoder (the best measured) and 0 for the learned one. Groups that do not fit in 80% of the
            latent are left to coordinate selection.
        max_steps: steps of residual training; every ``eval_every`` steps a held-out evaluation, stop after
            ``patience`` evaluations without improvement, keep the best state.
        batch_size: synthetic gradients per step of residual training.
        lr: learning rate of residual training.
        min_gain: the residual is kept only if its held-out loss is below ``(1 - min_gain)`` x the MMSE one.
        seed: seeds sampling, noise and initialisation (same seed, same codec).
    """
    from tqdm.auto import tqdm

    if not isinstance(prior, GaussianPrior):
        raise TypeError(f"pretrain_codec takes a GaussianPrior (from build_prior), got {type(prior).__name__}")
    if val_size < 1 or batch_size < 1 or max_steps < 0:
        raise ValueError("val_size and batch_size must be >= 1 and max_steps >= 0")
    levels = _noise_levels(noise_std, noise_levels)
    if temporal_rho is None:
        temporal_rho = 0.8 if decoder == "mmse" and not temporal_window else 0.0
    if lora_rank is None:
        lora_rank = 1 if decoder == "mmse" else 0
    with torch.random.fork_rng():  # seed the residual's initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        codec = GradientCodec.from_prior(
            prior, latent_ratio, decoder=decoder, temporal_window=temporal_window, temporal_rho=temporal_rho, lora_rank=lora_rank,
            seed=seed, **codec_kwargs,
        )
    gen_val = torch.Generator().manual_seed(seed * 2 + 1)
    gen_train = torch.Generator().manual_seed(seed * 2 + 2)

    def draw(n, s, gen):
        clean = prior.sample(n, gen)
        noisy = clean + s * torch.randn(clean.shape, generator=gen) if s > 0 else clean
        return clean, noisy

    per_level = max(1, val_size // len(levels))
    val = [(s, *draw(per_level, s, gen_val)) for s in levels]
    report = {"noise_levels": levels, "val_size": per_level * len(levels), "mmse_heldout": heldout_loss(codec, val, False)}

    if decoder == "mlp" and codec.residual is not None:
        opt = torch.optim.Adam(codec.residual.parameters(), lr=lr)
        best = initial = heldout_loss(codec, val, True)
        best_state, bad, history = copy.deepcopy(codec.residual.state_dict()), 0, [(0, initial)]
        bar = tqdm(range(1, max_steps + 1), desc="pretrain codec", disable=not progress)
        step = 0
        for step in bar:
            s = levels[int(torch.randint(len(levels), (1,), generator=gen_train))]
            clean, noisy = draw(batch_size, s, gen_train)
            with torch.no_grad():
                z = codec.encode(noisy)
                base = codec._decode_batch(z, s * s, False)
            est = base + codec._residual(z, codec.prior_mean, s * s)
            loss = _relative_loss(est, clean)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % eval_every == 0 or step == max_steps:
                val_loss = heldout_loss(codec, val, True)
                history.append((step, val_loss))
                bar.set_postfix(heldout=f"{val_loss:.4f}", mmse=f"{report['mmse_heldout']:.4f}")
                if val_loss < best - 1e-6:
                    best, bad, best_state = val_loss, 0, copy.deepcopy(codec.residual.state_dict())
                else:
                    bad += 1
                    if bad >= patience:
                        break
        codec.residual.load_state_dict(best_state)
        keep = best < (1 - min_gain) * report["mmse_heldout"]
        codec.mlp_enabled.fill_(keep)
        report.update(
            {
                "mlp_initial_heldout": initial,
                "mlp_best_heldout": best,
                "mlp_history": history,
                "steps": step,
                "mlp_kept": bool(keep),
                "decision": "learned residual beats MMSE on held-out synthetic data"
                if keep
                else "learned residual did not beat MMSE by min_gain; decoding with MMSE only",
            }
        )
    codec._record_config("pretrain_report", report)
    return codec


__all__ = ["heldout_loss", "pretrain_codec"]
