"""Checks that examples do not interact in the forward pass.

Clipping each example's gradient to C bounds the sensitivity by C only if one example's loss does not depend on
which other examples share its batch. Layers and data layouts that break this (measured: how far adding one row
moves the clipped sum) are refused before training:

- BatchNorm and other layers that normalise with, or keep running statistics of, the batch (about 1.1 C);
- flattening / padding-free collators and packed rows, where several examples are clipped as one sample (1.5 C
  measured, 2 C worst case);
- left padding with absolute position embeddings, where adding a longer row shifts every other row's positions
  (2.8 C measured on GPT-Neo).

The first two are recognised from the model, the collator and the arguments (`check_up_front`); anything
else is looked for by a numeric guard (`check_example_independence`): per-example losses of a few real
rows must not change when one row is removed from the batch. Everything here only reads the model and the data.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Sequence

import torch

__all__ = [
    "ExampleCouplingError",
    "check_batch_not_packed",
    "check_collator",
    "check_example_independence",
    "check_no_coupling_layers",
    "check_up_front",
    "collator_problems",
    "coupling_layer_problems",
    "is_left_padded",
    "packed_batch_problems",
    "probe_rows",
]

# A row's loss may move by this much (relative, plus absolute) when the batch around it changes, and the rows still
# count as independent. fp32 losses of independent rows collated to another padded length differ by float rounding
# only (measured on tiny Llama, GPT-Neo, BERT: <= 1.1e-7 relative on CPU); every coupling measured moved some row's
# loss by >= 9e-4 relative (left padding: causal-LM Llama 9e-4 to 3e-3, GPT-Neo 3e-2, GPT-Neo classifier 0.13).
# 1e-4 leaves ~1000x headroom above rounding and ~10x below the smallest coupling seen.
# The absolute part is for losses close to 0. Models stored in 16-bit floats round at their own epsilon instead.
RTOL = 1e-4
ATOL = 1e-6

_RUNNING_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_PACKED_BATCH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
_PAD_EACH = (
    "pad each example to its own row instead (e.g. DataCollatorWithPadding, or DataCollatorForLanguageModeling "
    "without padding_free / flattening)"
)


class ExampleCouplingError(ValueError):
    """Examples interact in the forward pass: the per-example clip would not bound the sensitivity by C."""


def _raise(problems: list[str]) -> None:
    if problems:
        raise ExampleCouplingError(
            "DRTrainer cannot guarantee privacy: examples would influence each other's gradients, so clipping each "
            "to C would not bound what one example changes:\n- " + "\n- ".join(problems)
        )


# ---- layers ----


def coupling_layer_problems(model: torch.nn.Module) -> list[str]:
    """One message per layer that mixes the examples of a batch: BatchNorm (any kind, trainable or frozen: a
    frozen BatchNorm in train mode still normalises with the batch's statistics) and any module that keeps
    running statistics of the batch (InstanceNorm with ``track_running_stats``, custom norms with
    ``running_mean`` / ``running_var`` buffers). opacus' own validators decide for the types they know."""
    from opacus.validators import ModuleValidator
    from opacus.validators import batch_norm as opacus_bn
    from opacus.validators import instance_norm as opacus_in

    problems = []
    for name, module in model.named_modules():
        path = name or "<the model itself>"
        # ModuleValidator.validate only looks at modules with trainable parameters; a frozen one mixes the batch too
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is opacus_bn.validate or isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            problems.append(
                f"{path} is a {type(module).__name__}, which normalises each example with the statistics of its whole "
                "batch in training mode (Trainer puts the model in train mode at every step, so model.eval() does not "
                "stick). Replace it with GroupNorm or LayerNorm before wrapping with LoRA (opacus' "
                "ModuleValidator.fix(model) swaps BatchNorm for GroupNorm, but only where the BatchNorm has "
                "trainable parameters, so run it before freezing the base model), or, if the frozen running "
                "statistics are what you want, replace it with a fixed affine layer that uses them "
                "(e.g. torchvision.ops.FrozenBatchNorm2d)"
            )
        elif validator is opacus_in.validate and validator(module):
            problems.append(
                f"{path} is a {type(module).__name__} with track_running_stats=True: its running statistics are "
                "updated from the whole batch. Set track_running_stats=False (opacus' ModuleValidator.fix does it)"
            )
        elif any(getattr(module, "track_running_stats", False) is True or module._buffers.get(b) is not None
                 for b in _RUNNING_STAT_BUFFERS):
            problems.append(
                f"{path} ({type(module).__name__}) keeps running statistics of the batch (a running_mean / running_var "
                "buffer or track_running_stats=True), like BatchNorm. Replace it with a per-example normalisation "
                "(LayerNorm, GroupNorm)"
            )
    return problems


def check_no_coupling_layers(model: torch.nn.Module) -> None:
    _raise(coupling_layer_problems(model))


# ---- collators and packing ----


def _collator_chain(collator) -> list:
    """The collator and the collators it wraps (Trainer's column remover, the empty-batch wrapper, ...)."""
    chain, seen = [], set()
    while collator is not None and id(collator) not in seen:
        seen.add(id(collator))
        chain.append(collator)
        collator = next(
            (getattr(collator, a) for a in ("data_collator", "collator") if getattr(collator, a, None) is not None),
            None,
        )
    return chain


def collator_problems(collator, args=None) -> list[str]:
    """Collators and flags that put several examples into one row (flattening, padding-free, packing)."""
    problems = []
    for c in _collator_chain(collator):
        name = type(c).__name__
        # (TRL's DataCollatorForLanguageModeling has return_position_ids too, and flattens only with padding_free)
        if "Flattening" in name or (hasattr(c, "return_position_ids") and not hasattr(c, "padding_free")):
            problems.append(
                f"the data collator {name} concatenates the examples of a batch into one row, so they are clipped "
                f"as one sample (up to 2 C per example); {_PAD_EACH}"
            )
        elif getattr(c, "padding_free", False) is True:
            problems.append(f"the data collator {name} has padding_free=True (examples flattened into one row); {_PAD_EACH}")
    for flag in ("padding_free", "packing"):
        if args is not None and getattr(args, flag, False) is True:
            problems.append(
                f"the training arguments set {flag}=True, which puts several examples into one row; set {flag}=False "
                f"and {_PAD_EACH}"
            )
    return problems


def check_collator(collator, args=None) -> None:
    _raise(collator_problems(collator, args))


def check_up_front(model: torch.nn.Module, collator, args=None) -> None:
    """The checks that need no data: coupling layers, and collators / flags that flatten or pack."""
    _raise(coupling_layer_problems(model) + collator_problems(collator, args))


def packed_batch_problems(batch) -> list[str]:
    """A collated batch whose rows hold several sequences: position ids that go back down within a row (over
    its attended tokens), or the sequence-boundary keys of flattened batches (``cu_seq_lens_q``, ``seq_idx``)."""
    if not isinstance(batch, Mapping):
        return []
    problems = []
    keys = [k for k in _PACKED_BATCH_KEYS if k in batch]
    if keys:
        problems.append(
            f"the batch carries sequence boundaries ({', '.join(keys)}): several examples share one row; {_PAD_EACH}"
        )
    pos = batch.get("position_ids")
    if torch.is_tensor(pos) and pos.dim() >= 2 and pos.shape[-1] > 1:
        pos = pos.reshape(-1, pos.shape[-1])
        step_ok = pos[:, 1:] >= pos[:, :-1]
        mask = batch.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape == pos.shape:
            # only steps between attended tokens count (a padded position may hold any value); with left padding
            # the attended tokens are contiguous, so consecutive attended pairs are the steps that matter
            attended = mask.bool()
            step_ok = step_ok | ~(attended[:, 1:] & attended[:, :-1])
        bad = (~step_ok).any(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            problems.append(
                f"position_ids restart within {len(rows)} of {pos.shape[0]} rows (row {rows[0]} first): the rows are "
                f"packed with several examples each, which are then clipped as one sample; {_PAD_EACH}"
            )
    return problems


def check_batch_not_packed(batch) -> None:
    _raise(packed_batch_problems(batch))


def is_left_padded(batch) -> bool:
    """Some row of the batch has padding before an attended token."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if not torch.is_tensor(mask) or mask.dim() != 2 or mask.shape[1] < 2:
        return False
    m = mask.bool()
    return bool((~m[:, :-1] & m[:, 1:]).any())


# ---- the numeric guard ----


def _row_length(row) -> int:
    if isinstance(row, Mapping) and "chosen_ids" in row and "rejected_ids" in row:  # a tokenized preference pair
        return len(row.get("prompt_ids") or []) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    if isinstance(row, Mapping):
        mask = row.get("attention_mask")
        if mask is not None:
            return int(torch.as_tensor(mask).sum())
        ids = row.get("input_ids")
        if ids is not None:
            return len(ids)
    return 0


def probe_rows(dataset, max_rows: int = 8, pool: int = 64) -> list[int]:
    """Indices of up to ``max_rows`` rows for the guard: the longest of the first ``pool`` rows first (removing it
    changes the padded length of the batch), the shortest next, then the first others. Uses no random numbers
    (the training RNG is not touched)."""
    n = min(len(dataset), pool)
    lengths = [_row_length(dataset[i]) for i in range(n)]
    longest = max(range(n), key=lambda i: lengths[i])
    shortest = min(range(n), key=lambda i: lengths[i])
    chosen = [longest] + ([shortest] if shortest != longest else [])
    chosen += [i for i in range(n) if i not in chosen][: max(max_rows - len(chosen), 0)]
    return chosen[:max_rows]


def _padded_length(batch) -> int | None:
    for key in ("attention_mask", "input_ids"):
        value = batch.get(key) if isinstance(batch, Mapping) else None
        if torch.is_tensor(value) and value.dim() >= 2:
            return value.shape[-1]
    return None


def _tolerance(model: torch.nn.Module) -> tuple[float, float]:
    """(rtol, atol): `RTOL` / `ATOL` for fp32 weights; weights stored in 16-bit floats round their
    activations at their own epsilon (the loss is then computed in fp32 from those logits), so 2 eps of that type."""
    eps = max((torch.finfo(p.dtype).eps for p in model.parameters() if p.is_floating_point()), default=0.0)
    return max(RTOL, 2 * eps), max(ATOL, 2 * eps * ATOL / RTOL)


def _set_modes(modes: dict) -> None:
    for module, training in modes.items():
        module.training = training


def check_example_independence(
    rows: Sequence,
    collate: Callable[[list], dict],
    loss_fn: Callable[[dict], torch.Tensor],
    model: torch.nn.Module,
    *,
    task: str | None = None,
    collator_name: str = "the data collator",
    rtol: float | None = None,
    atol: float | None = None,
) -> dict:
    """Refuse if removing one row of a small real batch changes another row's loss.

    ``rows`` are training rows (row 0 the longest, see `probe_rows`), ``collate`` the trainer's collator,
    ``loss_fn(batch)`` the trainer's per-example losses ``[B]``. The losses are computed in eval mode (dropout
    off) under ``torch.no_grad``, for all rows, without row 0 (the longest: the padded length changes), and
    without the shortest other row; every remaining row's loss must stay within ``rtol`` (relative) plus ``atol``. The
    model's train/eval mode of every submodule is restored. Call it before opacus hooks are attached (hooks in
    eval mode capture nothing) and before any noise is drawn. Returns the largest changes seen."""
    rows = list(rows)
    if len(rows) < 2:
        return {"rows": len(rows), "max_abs_change": 0.0, "max_rel_change": 0.0}
    default_rtol, default_atol = _tolerance(model)
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol

    full_batch = collate(rows)
    problems = packed_batch_problems(full_batch)
    left = is_left_padded(full_batch)
    shortest = min(range(1, len(rows)), key=lambda i: _row_length(rows[i]))
    if left and task == "causal_lm" and _padded_length(collate([rows[shortest]])) != _padded_length(full_batch):
        # padding to the batch's longest row (not to a fixed length): a row's padding depends on the others
        problems.append(
            "the batch is left-padded to its longest row: the causal-LM loss then predicts each row's first token "
            "from a padding position, whose output depends on how much padding the longest row of the batch adds "
            "(and with absolute position embeddings every position shifts with it); use "
            "tokenizer.padding_side='right'"
        )
    _raise(problems)

    modes = {m: m.training for m in model.modules()}
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    try:
        model.eval()
        # TF32 rounds at 1e-3: keep the comparison in full fp32 (it changes nothing in training)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with torch.no_grad():
            def losses(batch):
                return loss_fn(dict(batch)).detach().double().flatten().cpu()

            full = losses(full_batch)
            if full.shape[0] != len(rows):
                raise ExampleCouplingError(
                    f"{collator_name} turned {len(rows)} rows into {full.shape[0]} per-example losses: it does not keep "
                    f"one example per row, so examples are not clipped separately; {_PAD_EACH}"
                )
            worst_abs, worst_rel, culprit = 0.0, 0.0, None
            for removed in (0, shortest):
                kept = [i for i in range(len(rows)) if i != removed]
                sub = losses(collate([rows[i] for i in kept]))
                ref = full[kept]
                diff = (sub - ref).abs()
                if not torch.isfinite(diff).all():
                    raise ExampleCouplingError("the probe losses are not finite: cannot check example independence")
                rel = diff / ref.abs().clamp(min=1e-12)
                worst_abs = max(worst_abs, float(diff.max()))
                worst_rel = max(worst_rel, float(rel.max()))
                if culprit is None and bool((diff > atol + rtol * ref.abs()).any()):
                    culprit = removed
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
        _set_modes(modes)

    if culprit is not None:
        which = "the longest row (the padded length changed)" if culprit == 0 else "the shortest row"
        if left:
            cause = (
                "the batch is left-padded: with absolute position embeddings every row's positions shift when the "
                "padded length changes; use tokenizer.padding_side='right'"
            )
        else:
            cause = (
                f"{collator_name} (does it mix rows, or pad one row depending on the others?) or a layer that "
                "mixes the examples of a batch (a batch-level normalisation or attention across rows); pad each "
                "example on the right, independently of the others, and use per-example layers only"
            )
        _raise([
            f"removing {which} from a batch of {len(rows)} training rows changed another row's loss by up to "
            f"{worst_rel:.2g} relative (tolerance {rtol:.2g} + {atol:.2g}), computed in eval mode without dropout. "
            f"Likely cause: {cause}"
        ])
    return {"rows": len(rows), "max_abs_change": worst_abs, "max_rel_change": worst_rel}
