"""Per-example losses.

Per-sample gradients are only per-sample if the loss is a sum of per-example terms. Trainer's default loss
is a token mean over the whole batch, which couples examples (one example's length changes another's
weight), so the private path computes one loss per example (a per-sequence token mean for language models)
and sums them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TASKS = ("causal_lm", "seq2seq_lm", "token_classification", "sequence_classification")

# transformers' own model-class mappings (model_type -> class name) decide the loss family: class-name suffixes
# miss GPT2LMHeadModel, T5ForConditionalGeneration and many more.
_TASK_MAPPINGS = (
    ("causal_lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    ("seq2seq_lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("sequence_classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("token_classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
)
_SUFFIXES = {"ForCausalLM": "causal_lm", "ForSequenceClassification": "sequence_classification",
             "ForTokenClassification": "token_classification"}


def base_model_of(model):
    """The transformers model inside a ``PeftModel`` (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def infer_task(model) -> str:
    """The loss family of a (peft-wrapped) transformers model, from transformers' model-class mappings."""
    from transformers.models.auto import modeling_auto

    base = base_model_of(model)
    name = type(base).__name__
    for cls in type(base).__mro__:
        for task, mapping in _TASK_MAPPINGS:
            if cls.__name__ in set(getattr(modeling_auto, mapping).values()):
                return task
    task = next((t for suffix, t in _SUFFIXES.items() if name.endswith(suffix)), None)
    if task is not None:  # a custom class following transformers' naming
        return task
    raise ValueError(
        f"cannot tell the per-example loss of {name}: DRTrainer knows the causal-LM, seq2seq-LM, sequence- and "
        "token-classification heads of transformers' model mappings. For another head, subclass DRTrainer and "
        "override per_sample_losses(model, inputs) to return one loss per example"
    )


def _token_mean(token_losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(token_losses.dtype)
    return (token_losses * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def per_sample_losses(logits: torch.Tensor, labels: torch.Tensor, task: str, problem_type: str | None = None) -> torch.Tensor:
    """One loss per example, shape ``[B]``.

    - ``causal_lm``: next-token cross-entropy (labels shifted by one), mean over the example's tokens whose
      label is not -100; an example with no such token has loss 0.
    - ``token_classification`` and ``seq2seq_lm``: the same without the shift (decoder outputs are aligned
      with their labels).
    - ``sequence_classification``: cross-entropy, or MSE / BCE following ``config.problem_type``.
    """
    logits = logits.float()
    if task in ("causal_lm", "token_classification", "seq2seq_lm"):
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
