"""F1 metric, shipped with hf_drencoder so that it loads without the Hub.

Load it with ``evaluate.load("<path to this folder>")`` or, more simply,
``hf_drencoder.metrics.load_metric("macro_f1")``.  Unlike the Hub's ``f1``
metric, whose default is ``average="binary"``, the default here is the macro
average, the usual summary for imbalanced multi-class data such as Reuters
R8; the ``compute_metrics`` helpers report it as ``macro_f1`` so that it is
not mistaken for the Hub's binary ``f1``.  It is scikit-learn's ``f1_score``
with ``zero_division=0``.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import f1_score

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
    >>> f1 = hf_drencoder.metrics.load_metric("macro_f1")
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
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape != predictions.shape:
                raise ValueError(
                    f"sample_weight has shape {sample_weight.shape}, predictions {predictions.shape}"
                )
        if average == "binary":
            present = np.union1d(predictions, references)
            if len(present) > 2:
                raise ValueError(
                    f"average='binary' needs at most two classes, got {present.tolist()}; "
                    "choose average='macro', 'micro' or 'weighted'"
                )
        score = f1_score(
            references,
            predictions,
            labels=None if labels is None else list(labels),
            pos_label=pos_label,
            average=average,
            sample_weight=sample_weight,
            zero_division=0,
        )
        if average is None:
            return {"f1": [float(v) for v in np.atleast_1d(score)]}
        return {"f1": float(score)}
