"""Per-example losses.

Per-sample gradients are only per-sample if the loss is a sum of per-example terms. Trainer's default loss
is a token mean over the whole batch, which couples examples (one example's length changes another's
weight), so the private path computes one loss per example (a per-sequence token mean for language models)
and sums them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("causal_lm", "token_classification", "sequence_classification")


def infer_task(model) -> str:
    """The loss family of a (peft-wrapped) transformers model, from its class name."""
    base = model
    for attr in ("get_base_model",):
        if hasattr(base, attr):
            base = base.get_base_model()
    name = type(base).__name__
    if name.endswith("ForCausalLM"):
        return "causal_lm"
    if name.endswith("ForTokenClassification"):
        return "token_classification"
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    raise ValueError(
        f"cannot tell the per-example loss of {name}: DRTrainer supports *ForCausalLM, *ForSequenceClassification "
        "and *ForTokenClassification models; for another head subclass DRTrainer and override per_sample_losses()"
    )


def _token_mean(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(token_losses.dtype)
    return (token_losses * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, task: str, problem_type: str | None = None) -> torch.Tensor:
    """One loss per example, shape ``[B]``.

    - ``causal_lm``: next-token cross-entropy (labels shifted by one), mean over the example's tokens whose
      label is not -100; an example with no such token has loss 0.
    - ``token_classification``: the same without the shift.
    - ``sequence_classification``: cross-entropy, or MSE / BCE following ``config.problem_type``.
    """
    logits = logits.float()
    if task in ("causal_lm", "token_classification"):
        if task == "causal_lm":
            # shift the labels, not the logits: slicing [B, T, V] logits would copy them
            labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        b, t, v = logits.shape
        tok = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=-100, reduction="none")
        return _token_mean(tok.view(b, t), labels != -100)
    if task == "sequence_classification":
        if problem_type == "regression" or (problem_type is None and logits.shape[-1] == 1):
            return F.mse_loss(logits.squeeze(-1), labels.to(logits.dtype).view(-1), reduction="none")
        if problem_type == "multi_label_classification":
            return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none").mean(-1)
        return F.cross_entropy(logits, labels.view(-1), reduction="none")
    raise ValueError(f"unknown task {task!r}; one of {TASKS}")
