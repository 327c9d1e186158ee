"""Refusals before the first private release: datasets without labels, untokenized text, labels out of range,
and codec paths that are missing or corrupted (named, with what is wrong)."""

import json
import os

import pytest
from datasets import Dataset

from hf_drencoder.codec import CodecLoadError, GradientCodec, LayoutMismatchError, LoraLayout, load_codec
from hf_drencoder.data_checks import (
    DataCheckError,
    check_has_labels,
    check_label_range,
    check_tokenized,
    check_train_dataset,
)


def tokenized(labels, key="label"):
    return Dataset.from_dict({"input_ids": [[1, 2, 3]] * len(labels), "attention_mask": [[1, 1, 1]] * len(labels),
                              key: labels})


def test_a_dataset_without_labels_is_refused_with_its_column_names():
    data = Dataset.from_dict({"input_ids": [[1, 2]], "attention_mask": [[1, 1]], "category": [0]})
    with pytest.raises(DataCheckError, match="no label column") as e:
        check_has_labels(data)
    assert "input_ids, attention_mask, category" in str(e.value)
    assert check_has_labels(tokenized([0, 1])) == "label"
    assert check_has_labels(tokenized([0, 1], key="labels")) == "labels"
    # list-of-dict datasets too
    with pytest.raises(DataCheckError, match="its columns are: input_ids"):
        check_has_labels([{"input_ids": [1]}])


def test_untokenized_text_is_refused():
    raw = Dataset.from_dict({"text": ["a b", "c"], "label": [0, 1]})
    with pytest.raises(DataCheckError, match="not tokenized") as e:
        check_tokenized(raw)
    assert "'text'" in str(e.value) and "tokenizer(b['text']" in str(e.value)
    strings = Dataset.from_dict({"input_ids": ["a b", "c"], "label": [0, 1]})
    with pytest.raises(DataCheckError, match="hold text"):
        check_tokenized(strings)
    check_tokenized(tokenized([0]))


def test_labels_out_of_range_are_refused_with_the_values_found():
    with pytest.raises(DataCheckError) as e:
        check_label_range(tokenized([0, 1, 3, 3, -1]), num_labels=3)
    msg = str(e.value)
    assert "outside [0, 3)" in msg and "3 (2 times)" in msg and "-1 (1 time)" in msg
    with pytest.raises(DataCheckError, match="num_labels=6"):
        check_label_range(tokenized([0, 5]), num_labels=3)
    with pytest.raises(DataCheckError, match="not class ids"):
        check_label_range(Dataset.from_dict({"input_ids": [[1]], "label": ["spam"]}), num_labels=2)
    check_label_range(tokenized([0, 1, 2]), num_labels=3)
    check_label_range(tokenized([0.0, 1.0]), num_labels=2)  # whole floats are class ids
    # per-token labels may carry the ignore index
    check_label_range(Dataset.from_dict({"input_ids": [[1, 2]], "labels": [[-100, 1]]}), num_labels=2)


def test_check_train_dataset_runs_every_check_for_the_task():
    check_train_dataset(tokenized([0, 1]), num_labels=2)
    with pytest.raises(DataCheckError, match="empty"):
        check_train_dataset(tokenized([]), num_labels=2)
    with pytest.raises(DataCheckError, match="no label column"):
        check_train_dataset(Dataset.from_dict({"input_ids": [[1]]}), num_labels=2)
    check_train_dataset(Dataset.from_dict({"input_ids": [[1]]}), task="causal_lm")  # the collator makes labels
    with pytest.raises(DataCheckError, match="outside"):
        check_train_dataset(tokenized([0, 2]), num_labels=2, what="eval_dataset")


@pytest.fixture
def saved_codec(tmp_path):
    layout = LoraLayout(["m.lora_A.weight", "m.lora_B.weight"], [[2, 8], [8, 2]])
    folder = tmp_path / "codec"
    GradientCodec(layout=layout.to_dict(), latent_ratio=1 / 4).save_pretrained(folder)
    return folder, layout


def test_load_codec_loads_and_checks_the_layout(saved_codec):
    folder, layout = saved_codec
    codec = load_codec(str(folder), layout=layout)
    assert codec.layout.fingerprint == layout.fingerprint
    assert load_codec(codec, layout=layout) is codec
    with pytest.raises(LayoutMismatchError):
        load_codec(str(folder), layout=LoraLayout(["x.lora_A.weight"], [[2, 8]]))


def test_missing_codec_path_names_the_path_not_the_repo_id_rules(tmp_path, offline):
    missing = str(tmp_path / "no" / "such" / "codec")
    with pytest.raises(CodecLoadError) as e:
        load_codec(missing)
    assert missing in str(e.value) and "does not exist" in str(e.value)
    assert "Repo id must be" not in str(e.value)
    with pytest.raises(CodecLoadError, match="'./not-here' does not exist"):
        load_codec("./not-here")
    # a valid-looking id with no folder and no Hub: both readings are named
    with pytest.raises(CodecLoadError, match="no such local folder"):
        load_codec("not-a-folder-here")


def test_corrupted_codec_folders_name_the_file_and_the_fault(saved_codec):
    folder, _ = saved_codec
    weights, config = folder / "model.safetensors", folder / "config.json"
    good_config = config.read_text()
    weights.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(CodecLoadError, match="model.safetensors is corrupted"):
        load_codec(str(folder))
    config.write_text("{not json")
    with pytest.raises(CodecLoadError, match="config.json is not valid JSON"):
        load_codec(str(folder))
    config.write_text(json.dumps({"latent_ratio": 0.25}))
    with pytest.raises(CodecLoadError, match="no 'layout'"):
        load_codec(str(folder))
    config.write_text(good_config)
    os.remove(weights)
    with pytest.raises(CodecLoadError, match="has no model.safetensors") as e:
        load_codec(str(folder))
    assert "config.json" in str(e.value)  # what the folder holds
    with pytest.raises(CodecLoadError, match="is a file"):
        load_codec(str(config))
