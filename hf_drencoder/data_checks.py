"""Checks of a training set before anything private is released.

A private run that fails after its first step has already spent privacy: the noise was drawn, the accountant
counted the step, and the statistics of stage 1 may have been released. These checks read the data only to
refuse it (they release nothing) and name what was found, so that the fix is obvious:

- `check_has_labels`: a classification set without a label column (its column names are listed);
- `check_tokenized`: raw text where token ids are expected;
- `check_label_range`: labels a classification head of ``num_labels`` classes cannot score.

`check_train_dataset` runs all three. Every check raises `DataCheckError` (a ``ValueError``) and returns
nothing otherwise. They accept a `datasets.Dataset`, a list of dict rows or any map-style dataset whose items
are dicts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "DataCheckError",
    "LABEL_COLUMNS",
    "check_has_labels",
    "check_label_range",
    "check_tokenized",
    "check_train_dataset",
    "column_names",
    "label_column",
]

LABEL_COLUMNS = ("labels", "label")
_TOKEN_COLUMNS = ("input_ids", "inputs_embeds")
# the ignore index of the Hugging Face losses: a label that is not scored
IGNORE_INDEX = -100


class DataCheckError(ValueError):
    """A training set that cannot be trained on as given; the message says what was found and the fix."""


def column_names(dataset) -> list[str]:
    """Column names of a `datasets.Dataset`, or the keys of the first item of another dataset."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict
        raise DataCheckError(f"expected one split, got a DatasetDict with splits {', '.join(names)}: pass e.g. dataset['train']")
    if names is not None:
        return list(names)
    if len(dataset) == 0:
        return []
    first = dataset[0]
    if not isinstance(first, dict):
        raise DataCheckError(f"dataset items must be dicts of columns (input_ids, labels, ...), got {type(first).__name__}")
    return list(first)


def _describe(names: Sequence[str]) -> str:
    return ", ".join(names) if names else "(none)"


def label_column(dataset, candidates: Iterable[str] = LABEL_COLUMNS) -> str | None:
    """The first of ``candidates`` that is a column of ``dataset``, else None."""
    names = column_names(dataset)
    return next((c for c in candidates if c in names), None)


def check_has_labels(dataset, *, candidates: Iterable[str] = LABEL_COLUMNS, what: str = "train_dataset") -> str:
    """Refuse a dataset without a label column; returns the label column's name.

    Args:
        dataset: the training set.
        candidates: accepted label column names, first match wins (default ``labels``, then ``label``).
        what: how the message names the dataset.
    """
    candidates = tuple(candidates)
    found = label_column(dataset, candidates)
    if found is None:
        names = column_names(dataset)
        raise DataCheckError(
            f"{what} has no label column (looked for {', '.join(repr(c) for c in candidates)}); its columns are: "
            f"{_describe(names)}. Rename the column that holds the labels (dataset.rename_column(old, 'labels')) "
            "or add one"
        )
    return found


def check_tokenized(dataset, *, what: str = "train_dataset") -> None:
    """Refuse a dataset that holds text where the model expects token ids (``input_ids``)."""
    names = column_names(dataset)
    if not any(c in names for c in _TOKEN_COLUMNS):
        texts = [c for c in names if _is_text_column(dataset, c)]
        hint = (f" It has text in {', '.join(repr(c) for c in texts)}: tokenize it first, e.g. "
                f"dataset.map(lambda b: tokenizer(b[{texts[0]!r}], truncation=True), batched=True)") if texts else ""
        raise DataCheckError(f"{what} is not tokenized: no input_ids column; its columns are: {_describe(names)}.{hint}")
    if "input_ids" in names and len(dataset) > 0:
        first = _column(dataset, "input_ids", limit=1)[0]
        if isinstance(first, str) or (isinstance(first, (list, tuple)) and first and isinstance(first[0], str)):
            raise DataCheckError(
                f"{what}'s input_ids hold text ({str(first)[:40]!r}), not token ids: tokenize the text with the "
                "model's tokenizer first"
            )


def _is_text_column(dataset, name: str) -> bool:
    if len(dataset) == 0:
        return False
    return isinstance(_column(dataset, name, limit=1)[0], str)


def _column(dataset, name: str, limit: int | None = None) -> list:
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):
        part = dataset if n == len(dataset) else dataset.select(range(n))
        return list(part.with_format(None)[name])
    return [dataset[i][name] for i in range(n)]


def _as_int_labels(values: list, name: str, what: str) -> np.ndarray:
    flat = []
    for v in values:
        if hasattr(v, "tolist"):
            v = v.tolist()
        if isinstance(v, (list, tuple)):
            flat.extend(v)
        else:
            flat.append(v)
    arr = np.asarray(flat)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            return arr.astype(np.int64)
        sample = ", ".join(repr(v) for v in flat[:3])
        raise DataCheckError(
            f"{what}'s {name!r} column holds {arr.dtype} values ({sample}), not class ids: map the labels to "
            "integers 0 .. num_labels - 1 first"
        )
    return arr.astype(np.int64)


def check_label_range(dataset, num_labels: int, *, label: str | None = None, what: str = "train_dataset",
                      allow_ignore_index: bool = True) -> None:
    """Refuse class labels outside ``[0, num_labels)``, naming the values found and how many rows hold them.

    Args:
        dataset: the training set.
        num_labels: the number of classes of the model's head (``model.config.num_labels``).
        label: the label column (default: ``labels`` or ``label``).
        what: how the message names the dataset.
        allow_ignore_index: accept -100 (the Hugging Face losses' "not scored") in per-token labels.
    """
    if num_labels is None or num_labels < 1:
        raise DataCheckError(f"num_labels must be >= 1, got {num_labels}")
    label = label or check_has_labels(dataset, what=what)
    values = _column(dataset, label)
    labels = _as_int_labels(values, label, what)
    ok = (labels >= 0) & (labels < num_labels)
    if allow_ignore_index:
        ok |= labels == IGNORE_INDEX
    if ok.all():
        return
    bad = Counter(labels[~ok].tolist())
    found = ", ".join(f"{v} ({n} time{'s' if n > 1 else ''})" for v, n in sorted(bad.items())[:8])
    more = f" and {len(bad) - 8} more values" if len(bad) > 8 else ""
    fix = f"Map the labels to 0 .. {num_labels - 1}"
    if labels.max() >= num_labels and labels[labels != IGNORE_INDEX].min() >= 0:
        fix += f", or build the model's head with num_labels={int(labels.max()) + 1}"
    raise DataCheckError(
        f"{what} has labels outside [0, {num_labels}) for a {num_labels}-class head: {found}{more}. {fix}"
    )


def check_train_dataset(dataset, *, task: str = "sequence_classification", num_labels: int | None = None,
                        what: str = "train_dataset") -> None:
    """All checks for one training set, before the first private release.

    Args:
        dataset: the training set.
        task: ``"sequence_classification"`` (labels required and range-checked against ``num_labels``) or
            ``"causal_lm"`` (labels are optional: a collator derives them from ``input_ids``).
        num_labels: classes of the head; ``None`` skips the range check (e.g. regression).
        what: how the messages name the dataset.
    """
    if len(dataset) == 0:
        raise DataCheckError(f"{what} is empty")
    check_tokenized(dataset, what=what)
    if task == "causal_lm":
        return
    name = check_has_labels(dataset, what=what)
    if num_labels is not None and num_labels > 1:
        check_label_range(dataset, num_labels, label=name, what=what, allow_ignore_index=False)
