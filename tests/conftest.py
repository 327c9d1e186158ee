"""Tiny models built from configs and tiny datasets: no Hub access anywhere in the suite."""

import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="GDP accounting is experimental")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one torch thread each
    torch.set_num_threads(1)
from datasets import Dataset  # noqa: E402


def make_tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, attention_dropout=0.0,
    )
    return LlamaForCausalLM(cfg)


def make_tiny_tokenizer():
    """A word-level tokenizer (<pad>, <eos>, <unk>, user, assistant, :, w0 ... w99) with a chat template that marks
    the assistant turns for TRL's assistant-only loss; no Hub access."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "user", "assistant", ":"] + [f"w{i}" for i in range(100)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
        " <eos>{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
    )
    return fast


def make_tiny_bert(seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
    )
    return BertForSequenceClassification(cfg)


def make_lm_dataset(n=64, seq=16, seed=0, vary_length=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    labels = ids.clone()
    if vary_length:
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
        for i, length in enumerate(lengths):
            mask[i, length:] = 0
            labels[i, length:] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": labels.tolist()})


def make_cls_dataset(n=64, seq=12, num_labels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    labels = torch.randint(0, num_labels, (n,), generator=g)
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": [[1] * seq] * n, "labels": labels.tolist()}
    )


def dr_args(tmp_path, **kw):
    from hf_drencoder import DRTrainingArguments

    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=4, report_to="none",
        logging_steps=1, save_strategy="no", disable_tqdm=True, learning_rate=1e-2, noise_seed=0, seed=0,
    )
    base.update(kw)
    if not base.get("disable_dp") and "target_epsilon" not in base and "noise_multiplier" not in base:
        base["noise_multiplier"] = 1.0
    return DRTrainingArguments(**base)


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Offline Hugging Face environment with a throw-away cache home (read by the libraries when loading)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        mp.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_bert():
    return make_tiny_bert()


@pytest.fixture
def lm_dataset():
    return make_lm_dataset()


@pytest.fixture
def cls_dataset():
    return make_cls_dataset()


@pytest.fixture
def tiny_chat_llama(tmp_path):
    """A tiny Llama and a word-level tokenizer with a chat template, saved as one model folder."""
    folder = tmp_path / "tiny-llama"
    model = make_tiny_llama()
    model.config.pad_token_id, model.config.eos_token_id, model.config.bos_token_id = 0, 1, None
    model.save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def quiet_library_logs():
    """hf_drencoder's own log at ERROR for one test (the audit runs many trainings); the level is restored after
    it, so later tests that read the log (caplog) still see the library's warnings."""
    import logging

    logger = logging.getLogger("hf_drencoder")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
