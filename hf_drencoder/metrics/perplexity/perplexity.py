"""Perplexity from losses or logits, shipped with hf_drencoder (no Hub needed).

The Hub's ``perplexity`` metric loads a causal language model and scores
raw text with it.  This one never loads a model: it turns what an
evaluation loop already has (per-token losses, or logits and labels) into
the corpus perplexity ``exp(total NLL / number of scored tokens)``.

Load it with ``evaluate.load("<path to this folder>")`` or, more simply,
``hf_drencoder.metrics.load_metric("perplexity")``.
"""

import datasets
import evaluate
import numpy as np

# Stands in for the labels of losses given without references.  Any value
# other than the ignore index would do; an extreme one cannot collide with
# a user-chosen ignore_index.
_SCORED = int(np.iinfo(np.int64).max)

_DESCRIPTION = """\
Perplexity is the exponential of the mean negative log-likelihood (NLL) per
scored token: PPL = exp(sum of token NLLs / number of scored tokens).  Every
token weighs the same, so long sequences count more than short ones (this is
not the mean of per-sequence perplexities).  NLLs use the natural logarithm.
"""

_KWARGS_DESCRIPTION = """
Inputs come in one of three shapes; the first example decides which, and
every later batch must keep it.

1. Per-token losses, one sequence per example:
    predictions (`list` of `list` of `float`): NLL of each token (natural
        log), e.g. `CrossEntropyLoss(reduction="none")` output per sequence.
    references (`list` of `list` of `int`, *optional*): the token labels,
        same lengths.  Only used as a mask: tokens whose label is
        `ignore_index` are left out.  If omitted, every loss is scored, so
        drop padding yourself or pass the labels.
2. Flat per-token losses:
    predictions (`list` of `float`), references (`list` of `int`,
        *optional*): as in 1, for a single stream of tokens.
3. Logits and labels, one sequence per example:
    predictions (`list` of `[seq_len, vocab_size]` arrays): unnormalised
        logits; log-softmax is applied here.
    references (`list` of `list` of `int`): target token ids, `seq_len` each.
        Required.  Storing full logits costs `seq_len * vocab_size` floats
        per example; for a large vocabulary prefer shape 1.

Keyword args of `compute`:
    ignore_index (`int`, defaults to -100): label of tokens that are not
        scored (padding, prompt, unmasked positions of MLM), the Hugging Face
        convention.
    shift_labels (`bool`, defaults to `False`): for causal LM logits whose
        labels are the input ids (what `Trainer` hands to
        `compute_metrics`), score logits[t] against labels[t + 1].  Leave
        `False` for masked LM or already-aligned labels.  Logits only.

Returns:
    perplexity (`float`): exp(nll).
    nll (`float`): mean NLL per scored token, in nats.
    num_tokens (`int`): number of scored tokens.

Examples:
    >>> ppl = hf_drencoder.metrics.load_metric("perplexity")
    >>> ppl.compute(predictions=[[1.0, 2.0], [3.0]])
    {'perplexity': 7.38905609893065, 'nll': 2.0, 'num_tokens': 3}
"""

_CITATION = """\
@article{jelinek1977perplexity,
  title={Perplexity--a measure of the difficulty of speech recognition tasks},
  author={Jelinek, Fred and Mercer, Robert L. and Bahl, Lalit R. and Baker, James K.},
  journal={The Journal of the Acoustical Society of America},
  volume={62},
  number={S1},
  pages={S63--S63},
  year={1977}
}
"""


def _default_references(predictions):
    references = []
    for prediction in predictions:
        ndim = np.ndim(prediction)
        if ndim == 0:
            references.append(_SCORED)
        elif ndim == 1:
            references.append([_SCORED] * len(prediction))
        else:
            raise ValueError(
                "perplexity from logits needs the target token ids: pass them as references"
            )
    return references


def _token_nll(prediction, reference, ignore_index, shift_labels):
    prediction = np.asarray(prediction, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.int64)
    if prediction.ndim == 2:
        if shift_labels:
            prediction, reference = prediction[:-1], reference[1:]
        if prediction.shape[0] != reference.shape[0]:
            raise ValueError(
                f"logits cover {prediction.shape[0]} positions but labels {reference.shape[0]}"
            )
        keep = reference != ignore_index
        logits, targets = prediction[keep], reference[keep]
        if targets.size and (targets.min() < 0 or targets.max() >= logits.shape[1]):
            raise ValueError(
                f"label ids must lie in [0, {logits.shape[1]}) or equal ignore_index={ignore_index}"
            )
        # Max-shifted log-sum-exp keeps large logits from overflowing.
        peak = logits.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
        return log_norm - logits[np.arange(len(targets)), targets]
    if prediction.shape != reference.shape:
        raise ValueError(
            f"losses have shape {prediction.shape} but references {reference.shape}"
        )
    return prediction[reference != ignore_index]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Tried in order on the first example; see _KWARGS_DESCRIPTION.
            features=[
                datasets.Features(
                    {
                        "predictions": datasets.Value("float32"),
                        "references": datasets.Value("int64"),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(datasets.Value("float32")),
                        "references": datasets.Sequence(datasets.Value("int64")),
                    }
                ),
                datasets.Features(
                    {
                        "predictions": datasets.Sequence(
                            datasets.Sequence(datasets.Value("float32"))
                        ),
                        "references": datasets.Sequence(datasets.Value("int64")),
                    }
                ),
            ],
            reference_urls=["https://en.wikipedia.org/wiki/Perplexity"],
        )

    # Overridden so that losses may come without references; `compute`
    # routes its inputs through here too.  The docstrings are required:
    # evaluate appends the inputs description to them.
    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of losses (references optional) or logits and labels."""
        if predictions is not None and references is None:
            references = _default_references(predictions)
        return super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one example: losses (reference optional) or logits and labels."""
        if prediction is not None and reference is None:
            reference = _default_references([prediction])[0]
        return super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, ignore_index=-100, shift_labels=False):
        if len(predictions) and np.ndim(predictions[0]) == 0:
            # Flat token stream: one sequence.
            predictions, references = [predictions], [references]
        if shift_labels and any(np.ndim(p) != 2 for p in predictions):
            raise ValueError("shift_labels applies to logits only; losses are already aligned")

        total_nll, num_tokens = 0.0, 0
        for prediction, reference in zip(predictions, references):
            nll = _token_nll(prediction, reference, ignore_index, shift_labels)
            total_nll += float(nll.sum())
            num_tokens += int(nll.size)
        if num_tokens == 0:
            raise ValueError("no token left to score (all labels equal ignore_index?)")
        mean_nll = total_nll / num_tokens
        return {"perplexity": float(np.exp(mean_nll)), "nll": mean_nll, "num_tokens": num_tokens}
