"""Accuracy metric, shipped with hf_drencoder so that it loads without the Hub.

Load it with ``evaluate.load("<path to this folder>")`` or, more simply,
``hf_drencoder.metrics.load_metric("accuracy")``.  It mirrors the inputs and
result of the Hub's ``accuracy`` metric for single-label classification, and
computes it the same way, with scikit-learn's ``accuracy_score``.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import accuracy_score

_DESCRIPTION = """\
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, one per example.
    references (`list` of `int`): true class ids, one per example.
    normalize (`bool`, defaults to `True`): if `False`, return the (weighted)
        number of correct predictions instead of the proportion.
    sample_weight (`list` of `float`, *optional*): one weight per example.

Returns:
    accuracy (`float`): in [0, 1] when `normalize=True`, else a count.

Examples:
    >>> accuracy = hf_drencoder.metrics.load_metric("accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])
    {'accuracy': 0.5}
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
class Accuracy(evaluate.Metric):
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
            reference_urls=["https://en.wikipedia.org/wiki/Accuracy_and_precision"],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        if predictions.size == 0:
            raise ValueError("accuracy of an empty set of predictions is undefined")
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape != predictions.shape:
                raise ValueError(
                    f"sample_weight has shape {sample_weight.shape}, predictions {predictions.shape}"
                )
        score = accuracy_score(references, predictions, normalize=normalize, sample_weight=sample_weight)
        return {"accuracy": float(score)}
