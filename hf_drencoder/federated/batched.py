"""Several parties' local training in one batched forward and backward pass (``parallel_parties > 1``).

A party of a population of thousands holds a few rows, so its local steps are forwards of a handful of rows, where
the per-call overhead of a transformer dominates. Here the local steps of G parties run together: every trainable
tensor (LoRA factors and ``modules_to_save`` copies, all ``nn.Linear`` weights and biases) gets one copy per party,
stacked ``[G, *shape]``; each row of the joint batch is multiplied by its own party's copy (selected by the row's
party index), and the loss is the sum over parties of each party's mean loss. The gradient of party g's copy is
then the gradient of party g's own loss, and AdamW and SGD are elementwise, so one optimizer over the stacks takes
exactly the step each party's own optimizer would take. Batches are drawn as `Party.batch_indices` draws them, from
each party's own seed: the same rows, in the same order, as one party at a time.

This is only sound if rows do not influence each other in the forward pass (a party's update must depend on its own
data only: the client-level sensitivity is about one party). `check_parties_independent` refuses batch-coupling
layers and collators (BatchNorm, packing, ...) and checks numerically, on real rows of two parties, that a row's
loss does not change when the other party's rows leave the batch. Everything after the local update (clipping,
the party's own noise, encoding) is per party, as before.
"""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from typing import Sequence

import torch

from ..losses import per_sample_losses
from ..privacy.coupling import check_example_independence, check_up_front
from .party import Party, _model_inputs, log_party_failure
from .server import party_round_randomness

__all__ = ["BatchedParties", "BatchedPartiesError", "batched_local_updates", "check_parties_independent"]

logger = logging.getLogger("hf_drencoder.federated.simulation")  # the server's log, as for one party at a time


class BatchedPartiesError(ValueError):
    """The model or the data cannot train several parties in one batch."""


def _owners(model, params: Sequence[torch.nn.Parameter]) -> list[tuple[torch.nn.Module, str]]:
    """(module, "weight" or "bias") of every trainable tensor; all must belong to ``nn.Linear`` modules."""
    where = {}
    for module in model.modules():
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None) if isinstance(module, torch.nn.Linear) else None
            if isinstance(p, torch.nn.Parameter):
                where[id(p)] = (module, attr)
    missing = [i for i, p in enumerate(params) if id(p) not in where]
    if missing:
        raise BatchedPartiesError(
            f"{len(missing)} trainable tensor(s) do not belong to nn.Linear layers (e.g. LoRA on embeddings or "
            "convolutions): train the parties one at a time (parallel_parties=1)")
    return [where[id(p)] for p in params]


def _grouped_linear(self, x: torch.Tensor) -> torch.Tensor:
    # row n of the batch uses its party's copy of each trained tensor: W[idx[n]], b[idx[n]]; a frozen one is shared
    idx = self._dr_group.index
    w = self._dr_stacks.get("weight")
    if w is None:
        y = torch.nn.functional.linear(x, self.weight)
    else:
        y = torch.einsum("n...i,noi->n...o", x, w[idx].to(x.dtype))
    b = self._dr_stacks.get("bias")
    if b is not None:
        y = y + b[idx].to(y.dtype).reshape(y.shape[0], *([1] * (y.dim() - 2)), -1)
    elif self.bias is not None:
        y = y + self.bias.to(y.dtype)
    return y


class _Group:
    index: torch.Tensor | None = None


@contextmanager
def _stacked(model, params, stacks):
    """Route the forward of every module owning a trainable tensor through its per-party stacks."""
    group = _Group()
    owners = _owners(model, params)
    patched = {}
    for (module, attr), stack in zip(owners, stacks):
        if id(module) not in patched:
            patched[id(module)] = module
            module._dr_stacks = {}
            module._dr_group = group
            module.forward = types.MethodType(_grouped_linear, module)
        module._dr_stacks[attr] = stack
    try:
        yield group
    finally:
        for m in patched.values():
            del m.forward, m._dr_stacks, m._dr_group


def batched_local_updates(model, params: list[torch.nn.Parameter], layout, parties: Sequence[Party], seeds: Sequence[int], *,
                          steps: int, batch_size: int, learning_rate: float, optimizer: str, task: str,
                          data_collator) -> list[torch.Tensor]:
    """Flat ``local - start`` of each party in ``parties`` after ``steps`` local steps from the current parameters,
    as `Party.local_update` computes them one at a time (``seeds``: each party's local-training seed). The model's
    parameters are left unchanged."""
    G = len(parties)
    device = params[0].device
    start = [p.detach().clone() for p in params]
    stacks = [s[None].repeat(G, *([1] * s.dim())).requires_grad_(True) for s in start]
    keep = _model_inputs(model)
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    opt = opt_cls(stacks, lr=learning_rate, **({"weight_decay": 0.0} if optimizer == "adamw" else {}))
    draws = [party.batch_indices(steps, batch_size, torch.Generator().manual_seed(int(seed)))
             for party, seed in zip(parties, seeds)]
    was_training = model.training
    model.train()
    try:
        with _stacked(model, params, stacks) as group:
            for _ in range(steps):
                picks = [next(d) for d in draws]
                rows = [party.dataset[i] for party, idx in zip(parties, picks) for i in idx]
                sizes = torch.tensor([len(idx) for idx in picks], device=device)
                batch = data_collator(rows)
                group.index = torch.repeat_interleave(torch.arange(G, device=device), sizes)
                labels = batch["labels"].to(device)
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and (keep is None or k in keep)}
                losses = per_sample_losses(model(**inputs).logits, labels, task, problem_type)
                per_party = torch.zeros(G, device=device, dtype=losses.dtype).index_add_(0, group.index, losses)
                opt.zero_grad(set_to_none=True)
                (per_party / sizes).sum().backward()  # each party's mean loss: its copy gets only its own gradient
                opt.step()
        with torch.no_grad():
            flat = layout.flatten([s.detach() for s in stacks]) - layout.flatten(start)[None]
        return [u.cpu() for u in flat]
    finally:
        model.train(was_training)
        for p in params:
            p.grad = None


def check_parties_independent(model, parties: Sequence[Party], data_collator, task: str) -> None:
    """Refuse to batch parties whose rows could influence each other's loss: batch-coupling layers and collators by
    name, then numerically on real rows of two parties (`check_example_independence`)."""
    check_up_front(model, data_collator)
    keep = _model_inputs(model)
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)
    rows = [p.dataset[i] for p in parties[:2] for i in range(min(3, len(p.dataset)))]
    device = next(model.parameters()).device

    def loss_fn(batch):
        labels = batch["labels"].to(device)
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and (keep is None or k in keep)}
        return per_sample_losses(model(**inputs).logits, labels, task, problem_type)

    with torch.random.fork_rng(devices=[]):
        check_example_independence(rows, data_collator, loss_fn, model, task=task,
                                   collator_name=f"the data collator {type(data_collator).__name__}")


class BatchedParties:
    """The simulation's batched local training: checks independence once (refused, not worked around: a party's
    update must depend on its own rows only), then trains each chunk of sampled parties in one pass; if a pass raises,
    returns None so that its parties train one at a time and a failing party is found and left out alone."""

    def __init__(self, model, params, layout, parties: Sequence[Party], data_collator, task: str):
        self.model, self.params, self.layout, self.parties = model, params, layout, parties
        self.data_collator, self.task = data_collator, task
        self.checked = False

    def updates(self, chunk: list[int], round_index: int, args) -> list[torch.Tensor] | None:
        if not self.checked:
            check_parties_independent(self.model, [self.parties[p] for p in chunk[:2]], self.data_collator, self.task)
            self.checked = True
        seeds = [party_round_randomness(args.seed, None, round_index, pid, False)[0] for pid in chunk]
        try:
            return batched_local_updates(
                self.model, self.params, self.layout, [self.parties[p] for p in chunk], seeds, steps=args.local_steps,
                batch_size=args.local_batch_size, learning_rate=args.local_learning_rate, optimizer=args.local_optimizer,
                task=self.task, data_collator=self.data_collator)
        except Exception as e:  # noqa: BLE001 - retried one party at a time, where a failure is a party's own
            log_party_failure(f"{chunk[0]}..{chunk[-1]}", f"round {round_index + 1} (batched)", e)
            logger.warning("round %d: the batched local training of %d parties failed (%s); training them one at a time",
                           round_index + 1, len(chunk), type(e).__name__)
            return None
