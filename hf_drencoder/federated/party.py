"""The party step: local training from the global adapter, then clip -> noise -> encode, all on the party.

Nothing un-noised leaves a party: `privatize_update` clips the update to C and adds N(0, sigma^2 C^2 I)
drawn from the party's own generator, so each message alone is a Gaussian mechanism with noise multiplier
sigma on that party's data, whoever reads it (the server included). The functions take and return plain
tensors so that a transport other than this process (e.g. Flower) can call them.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..codec.layout import LoraLayout
from ..codec.statistics import PARTS, StatisticsAccumulator
from ..losses import per_sample_losses
from ..privacy.clipping import clip_and_sum
from ..privacy.noise import gaussian_noise_like

MESSAGE_KINDS = ("update", "latent", "statistics")

# What a party reports to the server when it does not send its message: a fixed code, never the exception's
# text (an error message can quote the party's data, e.g. "Target 7 is out of bounds"). The full text goes to
# the party's own log (this module's logger).
PARTY_ERROR = "party-error"  # anything raised while the party trained on its data or built its message
PARTY_REFUSED = "party-refused"  # the party's own privacy guard refused what the server asked (its log says why)
PARTY_CODES = (PARTY_ERROR, PARTY_REFUSED)

party_logger = logging.getLogger(__name__)


def log_party_failure(party_id, where: str, error: BaseException, code: str = PARTY_ERROR,
                      log: logging.Logger | None = None) -> str:
    """Log ``error`` in full to the party's own log (``log``, default this module's logger) and return the
    code the server may see."""
    (log or party_logger).warning("party %s: %s failed (%s: %s); the server is told only %r", party_id, where,
                         type(error).__name__, error, code, exc_info=error)
    return code


@dataclass
class PartyMessage:
    """What one party sends in one round: a flat fp32 payload (the noised update, its latent, or its noised
    statistics). ``num_bytes`` is the uplink cost of the payload."""

    party_id: int
    payload: torch.Tensor
    kind: str

    def __post_init__(self):
        if self.kind not in MESSAGE_KINDS:
            raise ValueError(f"unknown message kind {self.kind!r}; one of {MESSAGE_KINDS}")
        self.payload = self.payload.detach().float().reshape(-1)

    @property
    def num_bytes(self) -> int:
        return 4 * self.payload.numel()


def privatize_update(update: torch.Tensor, max_norm: float, noise_multiplier: float, generator: torch.Generator | None) -> torch.Tensor:
    """``clip_C(update) + N(0, (noise_multiplier * C)^2 I)`` for a flat update (flat clipping, the same
    clipping as the per-example path). ``noise_multiplier = 0`` and ``max_norm = inf`` is the non-private
    baseline (the update unchanged)."""
    update = update.detach().float()
    if math.isfinite(max_norm):
        (update,), _ = clip_and_sum([update[None]], max_norm, "flat")
    if noise_multiplier > 0:
        if generator is None:
            raise ValueError("a generator is needed to draw the party's noise")
        update = update + gaussian_noise_like(update, noise_multiplier * max_norm, generator)
    return update


def encode_message(noised: torch.Tensor, codec=None, noise_std: float | None = None) -> tuple[torch.Tensor, str]:
    """The payload a party sends: its noised update, or that update's latent under ``codec`` (encoded at the
    noise level ``noise_std`` the server will decode at). Encoding is post-processing of the noised update."""
    if codec is None:
        return noised, "update"
    return codec.encode(noised, noise_std=noise_std), "latent"


def statistics_message(update: torch.Tensor, layout: LoraLayout, max_norm: float, noise_multiplier: float,
                       noise_seed: int | None, parts: Sequence[str] = PARTS) -> torch.Tensor:
    """Stage 1 on one party: the party's update is one "sample" of `StatisticsAccumulator`, clipped to
    C and released with that class's noise (multiplier ``noise_multiplier`` on the joint scaled vector of
    ``parts``), locally. Returns the released parts concatenated in canonical order."""
    acc = StatisticsAccumulator(layout, max_norm, noise_multiplier, sample_rate=1.0, dataset_size=1, parts=parts,
                                noise_seed=noise_seed)
    if update is not None:
        acc.add(update.detach().float().reshape(1, -1))
    acc.release_batch()
    stats = acc.finish()
    return torch.cat([stats.totals[p] for p in stats.parts])


def _model_inputs(model) -> set[str] | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return None
    return set(params)


class Party:
    """One party: its private dataset, its collator, and the local-training step.

    ``local_update`` runs local steps starting from the parameters' current values (the global adapter)
    and returns the flat change; the parameters are restored to their starting values whatever happens,
    so a party that raises leaves the global state as it found it.
    """

    def __init__(self, party_id: int, dataset, data_collator: Callable[[list], dict]):
        if len(dataset) == 0:
            raise ValueError(f"party {party_id} has no data")
        self.party_id = int(party_id)
        self.dataset = dataset
        self.data_collator = data_collator

    def __len__(self) -> int:
        return len(self.dataset)

    def batch_indices(self, steps: int, batch_size: int, generator: torch.Generator):
        """Row indices of each local step: epochs of a ``generator`` permutation, cut into batches of
        ``min(batch_size, rows)`` (a batch never spans two epochs)."""
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator)
        pos = 0
        for _ in range(steps):
            if pos + min(batch_size, n) > n:
                order, pos = torch.randperm(n, generator=generator), 0
            idx = order[pos : pos + min(batch_size, n)]
            pos += len(idx)
            yield [int(i) for i in idx]

    def _batches(self, steps: int, batch_size: int, generator: torch.Generator):
        for idx in self.batch_indices(steps, batch_size, generator):
            yield self.data_collator([self.dataset[i] for i in idx])

    def local_update(self, model, params: list[torch.nn.Parameter], layout: LoraLayout, *, steps: int, batch_size: int,
                     learning_rate: float, optimizer: str = "sgd", task: str, seed: int = 0) -> torch.Tensor:
        """Flat ``local - start`` of the trainable tensors after ``steps`` local optimizer steps (non-private
        locally: the privacy unit is the party, and its whole update is clipped and noised afterwards)."""
        start = [p.detach().clone() for p in params]
        device = params[0].device
        keep = _model_inputs(model)
        problem_type = getattr(getattr(model, "config", None), "problem_type", None)
        gen = torch.Generator().manual_seed(int(seed))
        opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
        opt = opt_cls(params, lr=learning_rate, **({"weight_decay": 0.0} if optimizer == "adamw" else {}))
        was_training = model.training
        model.train()
        try:
            for batch in self._batches(steps, batch_size, gen):
                labels = batch["labels"].to(device)
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and (keep is None or k in keep)}
                losses = per_sample_losses(model(**inputs).logits, labels, task, problem_type)
                opt.zero_grad(set_to_none=True)
                losses.mean().backward()
                opt.step()
            with torch.no_grad():
                # on the CPU: the party's noise generator, the codec and the server work there
                return (layout.flatten([p.detach() for p in params]) - layout.flatten(start)).cpu()
        finally:
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
                    p.grad = None
            model.train(was_training)

    def step(self, model, params, layout: LoraLayout, *, steps: int, batch_size: int, learning_rate: float, optimizer: str,
             task: str, seed: int, max_norm: float, noise_multiplier: float, generator: torch.Generator | None,
             codec=None, codec_noise_std: float | None = None) -> PartyMessage:
        """One round on this party: local training, clip, local noise, encode. Returns the message."""
        update = self.local_update(model, params, layout, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                                   optimizer=optimizer, task=task, seed=seed)
        return self.message(update, max_norm=max_norm, noise_multiplier=noise_multiplier, generator=generator, codec=codec,
                            codec_noise_std=codec_noise_std)

    def message(self, update: torch.Tensor, *, max_norm: float, noise_multiplier: float, generator: torch.Generator | None,
                codec=None, codec_noise_std: float | None = None) -> PartyMessage:
        """This party's message for its local ``update``: clip, its own noise, encode. A codec that clips in its latent
        (``clips_in_latent``: a fixed linear map of public state, as `SubspaceCodec`) encodes first, and the latent is
        clipped to C and noised: the same Gaussian mechanism on k values instead of d."""
        if codec is not None and getattr(codec, "clips_in_latent", False):
            latent = codec.encode(update.detach().float(), noise_std=codec_noise_std)
            return PartyMessage(self.party_id, privatize_update(latent, max_norm, noise_multiplier, generator), "latent")
        noised = privatize_update(update, max_norm, noise_multiplier, generator)
        payload, kind = encode_message(noised, codec, codec_noise_std)
        return PartyMessage(self.party_id, payload, kind)


__all__ = ["MESSAGE_KINDS", "PARTY_CODES", "PARTY_ERROR", "PARTY_REFUSED", "Party", "log_party_failure", "PartyMessage", "encode_message", "privatize_update", "statistics_message"]
