"""Checks that keep a private run's guarantee true: each one refuses (or warns) before a release would be wrong.

They are pure functions of the trainer's inputs (arguments, model, dataset, tensors) so that each can be read
and tested on its own; ``DRTrainer`` calls them at the point where the thing they check is known.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os

import torch

from .privacy.accounting import PrivacyBudgetError

logger = logging.getLogger(__name__)

PRIVACY_REPORT_NAME = "privacy_report.json"

# transformers' optimizers that update a parameter inside backward (from a post-accumulate-grad hook), i.e. on
# the raw batch gradient, before any clipping or noise.
_IN_BACKWARD_OPTIMIZERS = ("layerwise", "lomo")

# peft LoRA initialisations that leave B at zero (an untrained adapter is recognisable) and those that look at
# training data to initialise (a release that no accountant counts).
_ZERO_B_INITS = (True, "gaussian")
_DATA_DEPENDENT_INITS = ("eva", "corda", "lora_ga")

# Signal-to-noise threshold for the "hopeless noise" warning; see ``noise_to_signal_ratio``.
HOPELESS_NOISE_RATIO = 5.0


def trainer_option_problems(trainer, overrides_compute_loss: bool) -> list[str]:
    """Trainer options under which the per-example analysis does not hold, each with the fix.
    ``overrides_compute_loss``: a subclass of the private trainer defines ``compute_loss``."""
    args = trainer.args
    problems = []
    if getattr(trainer, "compute_loss_func", None) is not None:
        problems.append(
            "compute_loss_func is not used by the private step (it computes one loss for the whole batch, and each "
            "example's gradient must be clipped on its own). Override DRTrainer.per_sample_losses(model, inputs) to "
            "return one loss per example instead"
        )
    if overrides_compute_loss:
        problems.append(
            f"{type(trainer).__name__} overrides compute_loss, which the private step does not call. Move the loss "
            "into per_sample_losses(model, inputs), returning one loss per example (a [batch] tensor)"
        )
    if getattr(args, "auto_find_batch_size", False):
        problems.append(
            "auto_find_batch_size=True: after an out-of-memory error Trainer would replay the same secret Poisson "
            "batches on updated weights. Set max_physical_batch_size (rows per forward/backward pass) instead"
        )
    optim = str(getattr(args.optim, "value", args.optim))
    if any(tag in optim for tag in _IN_BACKWARD_OPTIMIZERS):
        problems.append(
            f"optim={optim!r} updates each parameter inside backward, on the raw gradient before clipping and "
            "noise. Use an optimizer that steps after backward (e.g. adamw_torch)"
        )
    return problems


def lora_init_problems(model) -> list[str]:
    """Data-dependent LoRA initialisations: they read training data outside the private step."""
    problems = []
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        init = getattr(cfg, "init_lora_weights", True)
        if isinstance(init, str) and init.lower() in _DATA_DEPENDENT_INITS:
            problems.append(
                f"adapter {name!r} uses init_lora_weights={init!r}, which initialises from the training data without "
                "noise (no accountant covers it). Use init_lora_weights=True or 'gaussian'"
            )
    return problems


def gradient_hook_problems(params) -> list[str]:
    """Hooks on trainable tensors see (or act on) the raw gradient during backward, before clipping and noise."""
    hooked = 0
    for p in params:
        if getattr(p, "_post_accumulate_grad_hooks", None) or getattr(p, "_backward_hooks", None):
            hooked += 1
    if not hooked:
        return []
    return [
        f"{hooked} trainable adapter tensor(s) carry gradient hooks (register_hook / "
        "register_post_accumulate_grad_hook, as layer-wise optimizers such as GaLore/APOLLO layerwise or LOMO "
        "install): they would act on raw gradients before clipping and noise. Remove the hooks, or use an optimizer "
        "that steps after backward"
    ]


def adapter_looks_trained(model) -> bool:
    """True when a LoRA B matrix of an adapter that peft initialises with B = 0 is non-zero: the adapter has been
    trained (on some data) before this run."""
    from peft.tuners.lora import LoraLayer

    configs = getattr(model, "peft_config", None) or {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, b in module.lora_B.items():
            cfg = configs.get(name)
            if cfg is None or getattr(cfg, "init_lora_weights", True) not in _ZERO_B_INITS:
                continue
            if bool(torch.any(b.weight.detach() != 0)):
                return True
    return False


def load_prior_history(path: str) -> list[tuple[float, float, int]]:
    """The release history in a saved ``privacy_report.json`` or a checkpoint's ``dr_privacy_state.json`` (the
    file, or the folder holding it)."""
    from .callbacks import PRIVACY_STATE_NAME

    file = path
    if os.path.isdir(path):
        names = [n for n in (PRIVACY_REPORT_NAME, PRIVACY_STATE_NAME) if os.path.isfile(os.path.join(path, n))]
        file = os.path.join(path, names[0]) if names else os.path.join(path, PRIVACY_REPORT_NAME)
    if not os.path.isfile(file):
        raise PrivacyBudgetError(
            f"prior_privacy_report={path!r}: no {PRIVACY_REPORT_NAME} (saved model) or {PRIVACY_STATE_NAME} "
            "(checkpoint) there"
        )
    with open(file) as f:
        report = json.load(f)
    if "report" in report and "ledger" in report:  # a checkpoint's privacy state
        report = report["report"]
    if not report.get("dp_enabled", True):
        raise PrivacyBudgetError(
            f"{file} describes a run without differential privacy (epsilon = inf): an adapter trained that way "
            "cannot be given a finite guarantee. Start from an adapter trained privately, or from a fresh one"
        )
    history = report.get("history")
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 3 for h in history):
        raise PrivacyBudgetError(f"{file} has no release history ([noise_multiplier, sample_rate, steps] entries)")
    return [(float(s), float(q), int(t)) for s, q, t in history]


def _plain(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def dataset_fingerprint(dataset, rows: int = 16) -> str:
    """Length plus a hash of a fixed spread of rows: processes of a data-parallel job must hold the same rows in
    the same order, or one Poisson draw selects different examples on different processes (a row counted twice)."""
    n = len(dataset)
    picks = sorted({0, n - 1, n // 2} | {(i * 2_654_435_761) % n for i in range(rows)})
    h = hashlib.sha256(str(n).encode())
    for i in picks:
        h.update(json.dumps(_plain(dataset[i]), sort_keys=True, default=repr).encode())
    return f"{n}:{h.hexdigest()}"


def first_non_finite(tensors) -> int | None:
    """Index of the first tensor holding a NaN or an infinity, or None."""
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            return i
    return None


def noise_to_signal_ratio(noise_multiplier: float, dim: int, expected_batch: float, steps: int) -> float:
    """Norm of the noise summed over the run over the largest possible summed signal, for the released mean:
    sqrt(T) sigma C sqrt(d) / B against T C. The demo's default (epsilon 8: sigma 0.61, d 15,368, B 272, T 80)
    is about 0.031; above ``HOPELESS_NOISE_RATIO`` the noise buries any signal the clipped gradients can carry."""
    if steps < 1 or expected_batch <= 0:
        return math.inf
    return noise_multiplier * math.sqrt(dim) / (expected_batch * math.sqrt(steps))


def split_rows(inputs: dict, cap: int) -> list[dict]:
    """A collated micro-batch cut into pieces of at most ``cap`` rows (the first dimension of every tensor)."""
    sizes = {v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(
            "max_physical_batch_size needs a batch whose tensors all have the rows as their first dimension; got "
            f"first dimensions {sorted(sizes)} ({', '.join(inputs)}). Unset max_physical_batch_size or use a "
            "collator that returns [batch, ...] tensors"
        )
    (rows,) = sizes
    if rows <= cap:
        return [inputs]
    out = []
    for start in range(0, rows, cap):
        piece = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                piece[k] = v[start : start + cap]
            elif isinstance(v, torch.Tensor) or v is None or isinstance(v, (bool, int, float, str)):
                piece[k] = v
            else:
                raise ValueError(
                    f"max_physical_batch_size cannot split the batch entry {k!r} of type {type(v).__name__}: unset "
                    "max_physical_batch_size or have the collator return tensors"
                )
        out.append(piece)
    return out


__all__ = [
    "HOPELESS_NOISE_RATIO",
    "adapter_looks_trained",
    "dataset_fingerprint",
    "first_non_finite",
    "gradient_hook_problems",
    "load_prior_history",
    "lora_init_problems",
    "noise_to_signal_ratio",
    "split_rows",
    "trainer_option_problems",
]
