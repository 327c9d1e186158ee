"""Offline evaluation metrics.

``evaluate.load("accuracy")`` fetches the metric script from the Hugging Face
Hub, which offline machines cannot reach.  The scripts under this package
(``accuracy/accuracy.py``, ``f1/f1.py``, ``perplexity/perplexity.py``) are
``evaluate.Metric`` subclasses written the way ``evaluate`` expects, and are
loaded by their local path instead, so no network access ever happens.
They are package data: they must ship in the wheel next to this file.
"""

import os

import numpy as np

__all__ = [
    "load_metric",
    "classification_compute_metrics",
    "causal_lm_compute_metrics",
    "causal_lm_preprocess_logits",
]

_METRICS = ("accuracy", "macro_f1", "f1", "perplexity")
# "f1" is the older name of "macro_f1" (the same script, macro average by default); a compute_metrics built with
# it keeps reporting under "f1". The Hub's own "f1" defaults to the binary average: hence the new name.
_CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "f1")
_DEFAULT_CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
_SCRIPT = {"macro_f1": "f1"}


def _script_path(name: str) -> str:
    if name not in _METRICS:
        raise ValueError(f"unknown metric {name!r}; shipped metrics are {_METRICS}")
    script = _SCRIPT.get(name, name)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script, f"{script}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the hf_drencoder install lacks its metric scripts "
            "(package data); reinstall hf-drencoder"
        )
    return path


def load_metric(name: str, **kwargs):
    """Load one of the shipped metrics with ``evaluate.load``, offline.

    Args:
        name: ``"accuracy"``, ``"macro_f1"`` (F1, macro-averaged by default; ``"f1"`` is the same script under
            its older name) or ``"perplexity"``.
        **kwargs: passed to ``evaluate.load``.  ``keep_in_memory`` defaults
            to ``True``: results are then gathered in memory instead of in
            lock-protected cache files, which avoids lock clashes between
            several processes (or tests) computing the same metric.

    Returns:
        An ``evaluate.EvaluationModule``; call ``.compute(...)`` on it.  See
        the module's ``inputs_description`` for its inputs.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    # The full file path, not the folder: evaluate then never falls back to
    # looking the name up on the Hub.
    return evaluate.load(_script_path(name), **kwargs)


def _predictions_and_labels(eval_pred):
    """(predictions, labels) of an ``EvalPrediction`` or a tuple; models asked for hidden states or
    attentions return them after the logits, which come first."""
    if hasattr(eval_pred, "predictions"):
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
    else:
        predictions, labels = eval_pred[0], eval_pred[1]
    if isinstance(predictions, (tuple, list)):
        predictions = predictions[0]
    return predictions, labels


def classification_compute_metrics(metrics=_DEFAULT_CLASSIFICATION_METRICS):
    """Build a ``compute_metrics`` function for ``transformers.Trainer``.

    The metrics are loaded once, here, rather than at every evaluation.

    Args:
        metrics: names among ``"accuracy"`` and ``"macro_f1"`` (scikit-learn's
            ``accuracy_score`` and macro-averaged ``f1_score``). ``"f1"`` is
            accepted as the older name of ``"macro_f1"`` and reported as ``f1``.

    Returns:
        A function that takes an ``EvalPrediction`` (or a ``(logits,
        labels)`` pair), takes the arg-max of the logits over the last axis
        and returns a dict such as ``{"accuracy": 0.9, "macro_f1": 0.8}``
        (Trainer logs them as ``eval_accuracy`` and ``eval_macro_f1``).
    """
    if isinstance(metrics, str):
        metrics = (metrics,)
    unknown = [m for m in metrics if m not in _CLASSIFICATION_METRICS]
    if unknown or not metrics:
        raise ValueError(
            f"classification metrics must be among {_CLASSIFICATION_METRICS}, got {tuple(metrics)}"
        )
    modules = {name: load_metric(name) for name in metrics}

    def compute_metrics(eval_pred):
        logits, labels = _predictions_and_labels(eval_pred)
        predictions = np.argmax(np.asarray(logits), axis=-1).reshape(-1)
        references = np.asarray(labels).reshape(-1)
        results = {}
        for name, module in modules.items():
            value = module.compute(predictions=predictions, references=references)
            results[name] = value["f1"] if name in ("f1", "macro_f1") else value[name]
        return results

    return compute_metrics


def causal_lm_preprocess_logits(logits, labels):
    """``preprocess_logits_for_metrics`` for causal language models: per-token NLL instead of logits.

    Trainer keeps every evaluation batch's predictions in memory; for a language model these are
    ``[batch, seq_len, vocab_size]`` logits. This function reduces them, batch by batch, to the NLL of each
    next token (``[batch, seq_len - 1]``, natural log; 0 where the label is -100), which
    `causal_lm_compute_metrics` turns into perplexity.

    Args:
        logits: the model's logits (a tuple whose first item is the logits is accepted).
        labels: the token labels as given to the model (``labels == input_ids``, -100 where not scored).
    """
    import torch

    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    shifted_logits, shifted_labels = logits[:, :-1, :].float(), labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shifted_logits.transpose(1, 2), shifted_labels, ignore_index=-100, reduction="none"
    )


def causal_lm_compute_metrics():
    """Build a ``compute_metrics`` function that reports the perplexity of a causal language model.

    It takes an ``EvalPrediction`` whose predictions are either the per-token NLL produced by
    `causal_lm_preprocess_logits` (recommended: pass it as ``preprocess_logits_for_metrics``) or the raw
    logits, and whose ``label_ids`` are the labels given to the model (the input ids, unshifted, -100 where
    not scored). Token ``t`` is scored by the prediction at ``t - 1``, as in the models' own loss. The metric
    is the shipped ``perplexity`` script, loaded by path (no Hub access).

    Returns:
        A function returning ``{"perplexity": ..., "nll": ..., "num_tokens": ...}``: the corpus perplexity
        ``exp(total NLL / scored tokens)``, not a mean of per-sequence perplexities.
    """
    module = load_metric("perplexity")

    def compute_metrics(eval_pred):
        predictions, labels = _predictions_and_labels(eval_pred)
        predictions, labels = np.asarray(predictions), np.asarray(labels)
        if predictions.ndim == 3:
            return module.compute(predictions=list(predictions), references=list(labels), shift_labels=True)
        if predictions.ndim != 2:
            raise ValueError(
                f"expected per-token NLL [batch, seq_len - 1] or logits [batch, seq_len, vocab], got {predictions.shape}"
            )
        references = labels[:, 1:]
        if predictions.shape != references.shape:
            raise ValueError(
                f"per-token NLL {predictions.shape} does not match the shifted labels {references.shape}: "
                "produce it with causal_lm_preprocess_logits"
            )
        return module.compute(predictions=list(predictions), references=list(references))

    return compute_metrics
