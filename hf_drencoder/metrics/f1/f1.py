"""F1 metric, shipped with hf_drencoder so that it loads without the Hub.

Load it with ``evaluate.load("<path to this folder>")`` or, more simply,
``hf_drencoder.metrics.load_metric("f1")``.  Unlike the Hub's ``f1`` metric
the default is the macro average, the usual summary for imbalanced
multi-class data such as Reuters R8, and it is computed with numpy alone
(same conventions as scikit-learn's ``f1_score`` with ``zero_division=0``).
"""

import datasets
import evaluate
import numpy as np

_AVERAGES = ("macro", "micro", "weighted", "binary", None)

_DESCRIPTION = """\
The F1 score is the harmonic mean of precision and recall:
F1 = 2 * (precision * recall) / (precision + recall) = 2 TP / (2 TP + FP + FN).
For several classes the per-class scores are averaged (macro by default).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, one per example.
    references (`list` of `int`): true class ids, one per example.
    average (`str` or `None`, defaults to `"macro"`):
        - `"macro"`: unweighted mean of the per-class F1 scores, so rare
          classes count as much as frequent ones.
        - `"micro"`: F1 of the pooled counts; equals accuracy for
          single-label data when all classes are included.
        - `"weighted"`: mean of per-class scores weighted by class support.
        - `"binary"`: the score of class `pos_label` only.
        - `None`: the list of per-class scores, in the order of `labels`.
    labels (`list` of `int`, *optional*): classes to score.  Defaults to
        every class seen in `predictions` or `references`; pass all class
        ids to make a class absent from both count as 0 in the macro mean.
    pos_label (`int`, defaults to 1): the class scored when `average="binary"`.
    sample_weight (`list` of `float`, *optional*): one weight per example.

Returns:
    f1 (`float`, or `list` of `float` when `average=None`): in [0, 1].
    A class that is never predicted nor present scores 0.

Examples:
    >>> f1 = hf_drencoder.metrics.load_metric("f1")
    >>> f1.compute(predictions=[0, 0, 0, 0], references=[0, 0, 0, 1])
    {'f1': 0.42857142857142855}
"""

_CITATION = """\
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and others},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


def _safe_ratio(numerator, denominator):
    # zero_division=0 convention: an undefined score counts as 0.
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://en.wikipedia.org/wiki/F-score"],
        )

    def _compute(
        self,
        predictions,
        references,
        average="macro",
        labels=None,
        pos_label=1,
        sample_weight=None,
    ):
        if average not in _AVERAGES:
            raise ValueError(f"average must be one of {_AVERAGES}, got {average!r}")
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.size == 0:
            raise ValueError("F1 of an empty set of predictions is undefined")
        if sample_weight is None:
            weights = np.ones(len(predictions), dtype=np.float64)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64)
            if weights.shape != predictions.shape:
                raise ValueError(
                    f"sample_weight has shape {weights.shape}, predictions {predictions.shape}"
                )

        present = np.union1d(predictions, references)
        if average == "binary":
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs at most two classes, got {present.tolist()}; "
                    "choose average='macro', 'micro' or 'weighted'"
                )
            labels = [pos_label]
        elif labels is None:
            labels = present
        labels = np.asarray(labels)

        is_pred = predictions[None, :] == labels[:, None]
        is_true = references[None, :] == labels[:, None]
        true_pos = (is_pred & is_true) @ weights
        pred_count = is_pred @ weights
        true_count = is_true @ weights

        if average == "micro":
            score = _safe_ratio(2 * true_pos.sum(), pred_count.sum() + true_count.sum())
            return {"f1": float(score)}

        per_class = _safe_ratio(2 * true_pos, pred_count + true_count)
        if average is None:
            return {"f1": per_class.tolist()}
        if average == "weighted":
            if true_count.sum() == 0:
                return {"f1": 0.0}
            return {"f1": float(np.average(per_class, weights=true_count))}
        # "macro", and "binary" which has a single class left.
        return {"f1": float(per_class.mean())}
