"""What the app trains: the embedded MiniLM-L6 (or a tiny BERT for tests) on Reuters-R8, split among the parties.

The split of the training set is made by one of hf-drencoder's partitioners (``iid``, ``dirichlet``) or by a
``flwr_datasets`` partitioner (``flwr-iid``, ``flwr-dirichlet``; or pass any ``flwr_datasets.partitioner``
object to :func:`load_partition`). Every party computes the same split from the same seed and keeps its own part:
in a real deployment each SuperNode would load its own data here instead.
"""

from __future__ import annotations

import functools

import torch

from hf_drencoder.embedded import load_reuters, minilm_path, tokenize_dataset
from hf_drencoder.federated import partition_dataset

PARTITIONERS = ("iid", "dirichlet", "flwr-iid", "flwr-dirichlet")
NUM_LABELS = 8  # Reuters-R8


@functools.lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@functools.lru_cache(maxsize=2)
def reuters(split: str, max_samples: int = 0):
    """The R8 ``split`` as a ``datasets.Dataset`` (``text``, ``label``), its first ``max_samples`` rows if > 0."""
    data = load_reuters("r8")[split]
    return data.select(range(min(max_samples, len(data)))) if max_samples > 0 else data


def make_partitioner(name: str, num_partitions: int, alpha: float = 0.5, seed: int = 0):
    """A ``flwr_datasets`` partitioner for ``flwr-iid`` / ``flwr-dirichlet``."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if name == "flwr-iid":
        return IidPartitioner(num_partitions=num_partitions)
    if name == "flwr-dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha, seed=seed,
                                    min_partition_size=1)
    raise ValueError(f"partitioner {name!r} is not a flwr_datasets one: choose one of {', '.join(PARTITIONERS)}")


def load_partition(partition_id: int, num_partitions: int, partitioner="iid", *, alpha: float = 0.5, seed: int = 0,
                   max_samples: int = 0, max_length: int = 32):
    """Party ``partition_id``'s tokenized training rows (``input_ids``, ``attention_mask``, ``labels``).

    ``partitioner``: a name of ``PARTITIONERS`` or a ``flwr_datasets.partitioner.Partitioner`` object (its
    ``num_partitions`` must be ``num_partitions``); the raw R8 ``datasets.Dataset`` is handed to it as is."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is not in [0, num-partitions={num_partitions})")
    train = reuters("train", max_samples)
    if isinstance(partitioner, str) and partitioner in ("iid", "dirichlet"):
        part = partition_dataset(train, num_partitions, partitioner, alpha=alpha, label_column="label", seed=seed)[partition_id]
    else:
        if isinstance(partitioner, str):
            partitioner = make_partitioner(partitioner, num_partitions, alpha, seed)
        partitioner.dataset = train
        if partitioner.num_partitions != num_partitions:
            raise ValueError(f"the partitioner has {partitioner.num_partitions} partitions, num-partitions is {num_partitions}")
        part = partitioner.load_partition(partition_id)
    return tokenize_dataset(part, tokenizer(), max_length=max_length)


def _cfg(context, key: str, default):
    value = context.run_config.get(key, default) if context is not None else default
    return type(default)(value)


def data_fn(partition_id: int, num_partitions: int, context):
    """FlowerParty's ``data_fn``: the partition from the SuperNode's node config, the split from the run config."""
    return load_partition(partition_id, num_partitions, _cfg(context, "partitioner", "iid"),
                          alpha=_cfg(context, "dirichlet-alpha", 0.5), seed=_cfg(context, "partition-seed", 0),
                          max_samples=_cfg(context, "max-train-samples", 0), max_length=_cfg(context, "max-length", 32))


def model_fn(context):
    """The base model, the same on the server and on every party (the classification head is seeded)."""
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if _cfg(context, "model", "embedded") == "tiny":
        # no dropout: a party's local steps depend only on its data and the round's seed (tests compare runs)
        config = BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=512, num_labels=NUM_LABELS,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=NUM_LABELS)


def evaluate_fn(model, server_round: int, context) -> dict:
    """Accuracy of the global adapter on the first ``max-eval-samples`` R8 test documents (on the server)."""
    n = _cfg(context, "max-eval-samples", 300)
    if n <= 0:
        return {}
    test = tokenize_dataset(reuters("test", n), tokenizer(), max_length=_cfg(context, "max-length", 32))
    test.set_format("torch")
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test), 64):
            batch = test[start:start + 64]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train()
    return {"eval_accuracy": correct / len(test)}
