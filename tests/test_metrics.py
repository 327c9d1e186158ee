"""Tests of the shipped offline metrics, against hand-computed values."""

import math
import socket

import numpy as np
import pytest


@pytest.fixture(scope="module")
def metrics(offline):
    from hf_drencoder.metrics import load_metric

    def no_network(*args, **kwargs):
        raise AssertionError(f"metric loading tried to open a connection to {args}")

    # Loading must not even try the Hub.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        return {name: load_metric(name) for name in ("accuracy", "f1", "macro_f1", "perplexity")}


# predictions / references where macro-F1 differs from accuracy:
#   class 0: TP 1, FP 1, FN 0 -> F1 = 2*1 / (2*1 + 1 + 0) = 2/3
#   class 1: TP 1, FP 1, FN 2 -> F1 = 2*1 / (2*1 + 1 + 2) = 2/5
#   class 2: TP 0, FP 0, FN 1 -> F1 = 0
PREDS = [0, 1, 2, 0, 1]
REFS = [0, 1, 1, 1, 2]


def test_accuracy(metrics):
    acc = metrics["accuracy"]
    assert acc.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1]) == {"accuracy": 0.5}
    assert acc.compute(predictions=PREDS, references=REFS)["accuracy"] == pytest.approx(2 / 5)
    assert acc.compute(predictions=PREDS, references=REFS, normalize=False)["accuracy"] == 2
    # Only examples 0 and 1 are right: (3 + 1) / (3 + 1 + 1 + 1 + 4).
    weighted = acc.compute(
        predictions=PREDS, references=REFS, sample_weight=[3, 1, 1, 1, 4]
    )
    assert weighted["accuracy"] == pytest.approx(0.4)


def test_f1_macro_differs_from_accuracy(metrics):
    f1 = metrics["f1"]
    macro = f1.compute(predictions=PREDS, references=REFS)["f1"]
    assert macro == pytest.approx((2 / 3 + 2 / 5 + 0) / 3)
    assert macro != pytest.approx(2 / 5)
    assert f1.compute(predictions=PREDS, references=REFS, average=None)["f1"] == pytest.approx(
        [2 / 3, 2 / 5, 0.0]
    )
    # Support of classes 0, 1, 2 is 1, 3, 1.
    assert f1.compute(predictions=PREDS, references=REFS, average="weighted")["f1"] == pytest.approx(
        (2 / 3 * 1 + 2 / 5 * 3 + 0 * 1) / 5
    )
    # Single-label micro-F1 is accuracy.
    assert f1.compute(predictions=PREDS, references=REFS, average="micro")["f1"] == pytest.approx(2 / 5)


def test_f1_binary_and_labels(metrics):
    f1 = metrics["f1"]
    # pos_label 1: TP 1, FP 1, FN 1 -> 2 / 4.
    binary = f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 1], average="binary")
    assert binary["f1"] == pytest.approx(0.5)
    # Constant predictor: class 0 F1 = 6/7, class 1 never predicted = 0.
    assert f1.compute(predictions=[0, 0, 0, 0], references=[0, 0, 0, 1])["f1"] == pytest.approx(3 / 7)
    # An absent class listed explicitly drags the macro mean down.
    with_absent = f1.compute(predictions=[0, 1], references=[0, 1], labels=[0, 1, 2])
    assert with_absent["f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="binary"):
        f1.compute(predictions=PREDS, references=REFS, average="binary")
    with pytest.raises(ValueError, match="average"):
        f1.compute(predictions=PREDS, references=REFS, average="samples")


def test_metrics_agree_with_scikit_learn(metrics):
    from sklearn.metrics import accuracy_score, f1_score

    rng = np.random.default_rng(0)
    refs, preds = rng.integers(0, 5, 200), rng.integers(0, 5, 200)
    preds[:80] = refs[:80]
    weights = rng.random(200)
    assert metrics["accuracy"].compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(
        accuracy_score(refs, preds))
    for average in ("macro", "micro", "weighted"):
        ours = metrics["macro_f1"].compute(predictions=preds, references=refs, average=average, sample_weight=weights)
        assert ours["f1"] == pytest.approx(f1_score(refs, preds, average=average, sample_weight=weights))
    # the default of the shipped script is macro (the Hub's f1 defaults to binary)
    assert metrics["macro_f1"].compute(predictions=preds, references=refs)["f1"] == pytest.approx(
        f1_score(refs, preds, average="macro"))
    assert metrics["f1"].compute(predictions=preds, references=refs)["f1"] == pytest.approx(
        f1_score(refs, preds, average="macro"))


def test_perplexity_from_losses(metrics):
    ppl = metrics["perplexity"]
    losses = [[0.5, 1.5, 2.0], [1.0]]
    mean = (0.5 + 1.5 + 2.0 + 1.0) / 4
    result = ppl.compute(predictions=losses)
    assert result["perplexity"] == pytest.approx(math.exp(mean))
    assert result["nll"] == pytest.approx(mean)
    assert result["num_tokens"] == 4

    # Labels mask padding: only 0.5 and 1.0 are scored.
    masked = ppl.compute(predictions=losses, references=[[7, -100, -100], [3]])
    assert masked["perplexity"] == pytest.approx(math.exp(0.75))
    assert masked["num_tokens"] == 2

    flat = ppl.compute(predictions=[0.5, 1.5, 2.0, 1.0])
    assert flat["perplexity"] == pytest.approx(math.exp(mean))


def test_perplexity_from_logits(metrics):
    ppl = metrics["perplexity"]
    # Uniform logits over 4 tokens: every NLL is log 4, perplexity 4.
    uniform = ppl.compute(predictions=[np.zeros((3, 4))], references=[[0, 3, 1]])
    assert uniform["perplexity"] == pytest.approx(4.0)

    logits = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]
    nll_0 = math.log(math.exp(2) + 2) - 2  # target 0
    nll_1 = math.log(2 + math.e) - 0  # target 2
    result = ppl.compute(predictions=[logits], references=[[0, 2, -100]])
    assert result["num_tokens"] == 2
    assert result["perplexity"] == pytest.approx(math.exp((nll_0 + nll_1) / 2), rel=1e-6)

    # Causal-LM alignment: logits[t] scored against labels[t + 1].
    shifted = ppl.compute(predictions=[logits], references=[[-100, 0, 2]], shift_labels=True)
    assert shifted["perplexity"] == pytest.approx(result["perplexity"], rel=1e-6)

    with pytest.raises(ValueError, match="references"):
        ppl.compute(predictions=[logits])


def test_perplexity_accumulates_batches(metrics):
    ppl = metrics["perplexity"]
    ppl.add_batch(predictions=[[0.5, 1.5]])
    ppl.add_batch(predictions=[[2.0], [1.0]])
    assert ppl.compute()["perplexity"] == pytest.approx(math.exp(1.25))


def test_compute_metrics_on_eval_prediction(offline):
    from transformers import EvalPrediction

    from hf_drencoder.metrics import classification_compute_metrics

    compute_metrics = classification_compute_metrics()
    logits = np.full((5, 3), -1.0)
    logits[np.arange(5), PREDS] = 2.0
    result = compute_metrics(EvalPrediction(predictions=logits, label_ids=np.array(REFS)))
    # macro-F1 under its own name: the Hub's "f1" defaults to the binary average
    assert set(result) == {"accuracy", "macro_f1"}
    assert result["accuracy"] == pytest.approx(2 / 5)
    assert result["macro_f1"] == pytest.approx((2 / 3 + 2 / 5) / 3)
    # the older name still works and keeps its key
    old = classification_compute_metrics(("accuracy", "f1"))(EvalPrediction(predictions=logits, label_ids=np.array(REFS)))
    assert old == {"accuracy": result["accuracy"], "f1": result["macro_f1"]}

    # Extra model outputs (hidden states) follow the logits in a tuple.
    with_hidden = compute_metrics(
        EvalPrediction(predictions=(logits, np.zeros((5, 7))), label_ids=np.array(REFS))
    )
    assert with_hidden == result

    only_accuracy = classification_compute_metrics(("accuracy",))
    assert only_accuracy(EvalPrediction(predictions=logits, label_ids=np.array(REFS))) == {
        "accuracy": pytest.approx(2 / 5)
    }


def test_unknown_metric_names_are_rejected(offline):
    from hf_drencoder.metrics import classification_compute_metrics, load_metric

    with pytest.raises(ValueError, match="unknown metric"):
        load_metric("bleu")
    with pytest.raises(ValueError, match="classification metrics"):
        classification_compute_metrics(("accuracy", "perplexity"))


def test_causal_lm_perplexity_through_the_trainer_offline(tmp_path, offline, monkeypatch):
    """Perplexity of a tiny Llama through Trainer.evaluate with HF_HUB_OFFLINE=1 and no socket, against the
    model's own loss computed directly."""
    import torch
    from transformers import EvalPrediction, Trainer, TrainingArguments

    from conftest import make_lm_dataset, make_tiny_llama
    from hf_drencoder.metrics import causal_lm_compute_metrics, causal_lm_preprocess_logits

    monkeypatch.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail(f"network access to {a}"))
    model, data = make_tiny_llama().eval(), make_lm_dataset(n=10, seq=12)
    trainer = Trainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4, report_to="none"),
        eval_dataset=data, compute_metrics=causal_lm_compute_metrics(),
        preprocess_logits_for_metrics=causal_lm_preprocess_logits,
    )
    result = trainer.evaluate()

    batch = {k: torch.tensor(data[k]) for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum")
    tokens = int((labels != -100).sum())
    assert result["eval_num_tokens"] == tokens
    assert result["eval_perplexity"] == pytest.approx(math.exp(nll.item() / tokens), rel=1e-4)

    # Raw logits (no preprocessing) give the same number.
    raw = causal_lm_compute_metrics()(EvalPrediction(predictions=logits.numpy(), label_ids=batch["labels"].numpy()))
    assert raw["perplexity"] == pytest.approx(result["eval_perplexity"], rel=1e-4)
    with pytest.raises(ValueError, match="shifted labels"):
        causal_lm_compute_metrics()((np.zeros((10, 12)), batch["labels"].numpy()))
