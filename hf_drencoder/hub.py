"""The model card of a privately trained adapter: Hub metadata plus the privacy report, in one README.md.

``DRTrainer.save_model`` writes it next to the adapter and ``privacy_report.json``; ``DRTrainer.push_to_hub``
uploads it with them through huggingface_hub, like any Trainer model card. The card states the guarantee
exactly as the accountants computed it: every epsilon next to the accountant that produced it, the delta,
the mechanism's parameters (noise multiplier, sampling rate, number of compositions, clipping norm), the
privacy unit and, when a gradient codec was used, its latent ratio. A report of a run without DP says so
and claims nothing.

The same numbers are in the YAML metadata under ``differential_privacy`` so that they can be read by a
program (``ModelCard.load(repo_id).data.differential_privacy``).

The metadata is the Hub's own: ``library_name: peft`` with ``base_model`` (the Hub then shows the PEFT loading
snippet and lists the adapter under its base model), a ``pipeline_tag``, the tags ``hf-drencoder`` and (when DP
was on) ``differential-privacy``, and the evaluation metrics as ``model-index`` results (throughput entries
such as ``eval_runtime`` are left out).
"""

from __future__ import annotations

import math
import os

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = ["build_model_card", "privacy_metadata", "privacy_section", "hub_model_id", "pipeline_tag_for", "CARD_NAME"]

CARD_NAME = "README.md"
# The adapter is a PEFT adapter: the Hub's PEFT integration gives the loading snippet and the base-model relation.
LIBRARY_NAME = "peft"
PROJECT_TAG = "hf-drencoder"
BASE_TAGS = (PROJECT_TAG, "lora", "dr-encoder", "peft")
DP_TAG = "differential-privacy"
# Trainer.evaluate() entries that measure the machine, not the model: not evaluation results.
_THROUGHPUT = ("runtime", "samples_per_second", "steps_per_second", "epoch")
# peft task types (``LoraConfig.task_type``) and the Hub pipeline they serve.
_PIPELINE_OF_TASK = {
    "SEQ_CLS": "text-classification", "CAUSAL_LM": "text-generation", "TOKEN_CLS": "token-classification",
    "SEQ_2_SEQ_LM": "text2text-generation", "QUESTION_ANS": "question-answering", "FEATURE_EXTRACTION": "feature-extraction",
}


def _version() -> str:
    from . import __version__

    return __version__


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub repo id (``owner/name`` or ``name``), else None (a local folder, empty).

    The check is huggingface_hub's own ``validate_repo_id``; an existing local path is never taken for an id.
    """
    if not name or not isinstance(name, str) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def pipeline_tag_for(model=None, task_type: str | None = None) -> str | None:
    """The Hub ``pipeline_tag`` of an adapter: from ``task_type`` (peft's, e.g. ``"SEQ_CLS"``) or from the
    ``PeftModel``'s LoRA config; None when neither says."""
    if task_type is None and model is not None:
        config = (getattr(model, "peft_config", None) or {}).get("default")
        task_type = getattr(config, "task_type", None)
    if task_type is None:
        return None
    return _PIPELINE_OF_TASK.get(str(getattr(task_type, "value", task_type)))


def _number(x):
    """JSON/YAML-safe number: infinity stays a float ``inf`` (YAML ``.inf``), None stays None."""
    if x is None:
        return None
    if isinstance(x, bool):
        return x
    return float(x) if isinstance(x, float) or not float(x).is_integer() else int(x)


def _fmt(x, digits: int = 4) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _is_party(report: dict) -> bool:
    return report.get("privacy_unit") == "party"


def _releases(report: dict) -> tuple[str, int]:
    """What one composition is ('rounds' for party-level DP, 'steps' otherwise) and how many were made."""
    if _is_party(report):
        rounds = report.get("rounds")
        return "rounds", int(rounds if rounds is not None else report.get("steps", 0))
    return "steps", int(report.get("steps", 0))


def privacy_metadata(report: dict) -> dict:
    """The privacy report as flat YAML metadata (the ``differential_privacy`` block of the card).

    Keys absent from ``report`` are left out (e.g. no codec keys: no codec was used).
    """
    if not report.get("dp_enabled", True):
        return {"enabled": False, "epsilon": math.inf}
    kind, count = _releases(report)
    keys = (
        "epsilon", "accountant", "epsilon_prv", "epsilon_pld", "epsilon_rdp", "epsilon_gdp", "mu_gdp", "delta", "noise_multiplier",
        "sample_rate", "max_grad_norm", "clipping", "clipping_gamma", "expected_batch_size", "target_epsilon",
        "released_dimension", "lora_freeze_a", "codec_latent_ratio", "noise_space", "uplink_bytes", "uplink_ratio",
    )
    meta = {"enabled": True, "privacy_unit": report.get("privacy_unit", "example"), kind: count}
    for key in keys:
        if report.get(key) is not None:
            value = report[key]
            meta[key] = value if isinstance(value, str) else _number(value)
    meta["hf_drencoder_version"] = _version()
    return meta


def privacy_section(report: dict) -> str:
    """The card's text: the guarantee in words and a table of the numbers behind it."""
    if not report.get("dp_enabled", True):
        return (
            "## Privacy\n\n"
            "**This adapter was trained WITHOUT differential privacy** (`disable_dp=True`): it carries no privacy "
            "guarantee (epsilon = ∞). It is a non-private baseline trained through the same code path.\n\n"
            f"Trained with hf-drencoder {_version()}.\n"
        )
    unit = report.get("privacy_unit", "example")
    kind, count = _releases(report)
    eps, delta = report.get("epsilon"), report.get("delta")
    accountant = report.get("accountant", "prv")
    where = " in the gradient codec's latent space" if report.get("noise_space") == "latent" else ""
    if _is_party(report):
        who = ("**party-level** (ε, δ)-differential privacy: for any two federations that differ by one party "
               "(all of one party's data), the distribution of the trained adapter changes by at most (ε, δ)")
    else:
        who = ("**example-level** (ε, δ)-differential privacy: for any two training sets that differ by adding or "
               "removing one example (one row of the training data), the distribution of the trained adapter "
               "changes by at most (ε, δ)")
    lines = [
        "## Privacy",
        "",
        f"This adapter was trained with {who}, with **ε = {_fmt(eps)}** ({accountant.upper()} accountant) at "
        f"**δ = {_fmt(delta, 3)}**. Each {kind[:-1]} clipped every {unit}'s contribution to L2 norm "
        f"{_fmt(report.get('max_grad_norm'))} and added Gaussian noise once{where} (DP-SGD on the LoRA tensors only); "
        "the accountants compose all "
        f"{count} {kind} of the Poisson-subsampled Gaussian mechanism.",
        "",
        "What is protected: the adapter weights and everything computed from them. The training loss and "
        "evaluation metrics are computed on data as usual and are not covered by the guarantee. "
        f"If one person owns several {unit}s, the guarantee per person is weaker (group privacy).",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| ε ({accountant}, used for calibration and the budget) | {_fmt(eps)} |",
        f"| ε PRV (upper bound) | {_fmt(report.get('epsilon_prv'))} |",
        f"| ε PLD (upper bound) | {_fmt(report.get('epsilon_pld'))} |",
        f"| ε RDP | {_fmt(report.get('epsilon_rdp'))} |",
        f"| ε GDP (CLT approximation for q < 1; may under-estimate) | {_fmt(report.get('epsilon_gdp'))} |",
        f"| μ GDP | {_fmt(report.get('mu_gdp'))} |",
        f"| δ | {_fmt(delta, 3)} |",
        f"| noise multiplier σ | {_fmt(report.get('noise_multiplier'))} |",
        f"| sampling rate q | {_fmt(report.get('sample_rate'))} |",
        f"| {kind} (compositions) | {count} |",
        f"| privacy unit | {unit} |",
        f"| clipping norm C | {_fmt(report.get('max_grad_norm'))} |",
    ]
    if report.get("clipping") is not None:
        lines.append(f"| clipping | {report['clipping']} |")
    if report.get("clipping_gamma") is not None:
        lines.append(f"| automatic clipping γ | {_fmt(report['clipping_gamma'])} |")
    if report.get("released_dimension") is not None:
        lines.append(f"| released dimension | {report['released_dimension']} |")
    if report.get("lora_freeze_a"):
        lines.append("| LoRA A | frozen at its random initialisation (FFA-LoRA): only B and the head were trained "
                     "and released; A does not depend on the data |")
    if report.get("expected_batch_size") is not None:
        lines.append(f"| expected batch size | {report['expected_batch_size']} |")
    if report.get("target_epsilon") is not None:
        lines.append(f"| target ε | {_fmt(report['target_epsilon'])} |")
    ratio = report.get("codec_latent_ratio")
    lines.append(f"| gradient codec latent ratio | {_fmt(ratio) if ratio is not None else 'no codec'} |")
    if ratio is not None:
        for key, label in (("noise_space", "noise space"), ("uplink_bytes", "uplink bytes"),
                           ("uplink_ratio", "uplink ratio")):
            if report.get(key) is not None:
                lines.append(f"| {label} | {_fmt(report[key])} |")
    lines.append(f"| hf-drencoder version | {_version()} |")
    history = report.get("history") or []
    if len(history) > 1:
        lines += ["", "Releases composed by the accountants, in order (σ, q, count):", ""]
        lines += [f"- σ = {_fmt(float(h[0]))}, q = {_fmt(float(h[1]))}, {int(h[2])} times"
                  + (f" ({int(h[4])} of {int(h[3])} without replacement)" if len(h) == 5 else "") for h in history]
    if ratio is not None:
        lines += [
            "",
            f"The gradient codec (folder `codec/`, latent ratio {_fmt(ratio)}) encodes the already private "
            "update; encoding and decoding are post-processing and cost no privacy. Load it with "
            "`GradientCodec.from_pretrained(path, model=peft_model)`.",
        ]
    lines += ["", "The full report, with the accountant history, is in `privacy_report.json`.", ""]
    return "\n".join(lines)


def _as_list(x) -> list[str]:
    if x is None:
        return []
    return [x] if isinstance(x, str) else list(x)


def _metrics(eval_results: dict | None) -> dict:
    """Model metrics of a ``Trainer.evaluate()`` dict: ``eval_`` prefix dropped, throughput entries left out."""
    out = {}
    for key, value in (eval_results or {}).items():
        name = key[5:] if key.startswith("eval_") else key
        if name in _THROUGHPUT or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[name] = value
    return out


def _infer_pipeline_tag(metrics: dict) -> str | None:
    if "perplexity" in metrics:
        return "text-generation"
    if {"accuracy", "f1", "macro_f1"} & set(metrics):
        return "text-classification"
    return None


def _eval_results(metrics: dict, task: str | None, dataset: str | None) -> list[EvalResult] | None:
    finite = {k: v for k, v in metrics.items() if math.isfinite(float(v))}
    if not finite or task is None:
        return None
    name = dataset or "evaluation set"
    return [
        EvalResult(task_type=task, dataset_type=dataset or "custom", dataset_name=name, dataset_split="eval",
                   metric_type=key, metric_name=key, metric_value=_number(value))
        for key, value in finite.items()
    ]


def build_model_card(
    report: dict,
    *,
    base_model: str | None = None,
    datasets: str | list[str] | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    eval_results: dict | None = None,
    pipeline_tag: str | None = None,
) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` for an adapter trained by hf-drencoder.

    Args:
        report: ``DRTrainer.privacy_report()`` (or a federated run's report). Read with ``.get``: keys a run
            did not produce (e.g. ``codec_latent_ratio`` without a codec) are reported as absent.
        base_model: Hub id of the base model; a local path is left out of the metadata (the Hub expects an id).
        datasets: Hub dataset id(s) the adapter was trained on, if they are on the Hub.
        tags: extra tags; ``hf-drencoder``, ``lora``, ``dr-encoder``, ``peft`` and (when DP was on)
            ``differential-privacy`` are always present.
        model_name: title of the card (and the ``model-index`` name).
        language: Hub metadata, passed through.
        license: Hub metadata, passed through.
        eval_results: metrics to list (e.g. ``trainer.evaluate()``); stated as not covered by the guarantee. They
            become ``model-index`` results, without the throughput entries (runtime, samples or steps per second).
        pipeline_tag: the Hub pipeline (e.g. ``"text-classification"``; see `pipeline_tag_for`). Default: inferred
            from the metrics (perplexity: ``text-generation``; accuracy or F1: ``text-classification``).
    """
    dp = bool(report.get("dp_enabled", True))
    all_tags = ([DP_TAG] if dp else []) + list(BASE_TAGS)
    all_tags += [t for t in _as_list(tags) if t not in all_tags]
    base = hub_model_id(base_model)
    metrics = _metrics(eval_results)
    pipeline_tag = pipeline_tag or _infer_pipeline_tag(metrics)
    data_ids = [d for d in _as_list(datasets) if hub_model_id(d)]
    title = model_name or "LoRA adapter trained with differential privacy"
    if not dp:
        title = model_name or "LoRA adapter (non-private baseline)"
    results = _eval_results(metrics, pipeline_tag, data_ids[0] if data_ids else None)
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base,
        datasets=_as_list(datasets) or None,
        tags=all_tags,
        language=language,
        license=license,
        pipeline_tag=pipeline_tag,
        model_name=title if results else None,
        eval_results=results,
        differential_privacy=privacy_metadata(report),
        **({"base_model_relation": "adapter"} if base else {}),
    )
    intro = [f"# {title}", ""]
    what = "A LoRA adapter" + (f" for [{base}](https://huggingface.co/{base})" if base else "")
    what += " trained with hf-drencoder (DP LoRA fine-tuning after DR-Encoder, Wu et al., AAAI-25)."
    intro += [what, ""]
    body = "\n".join(intro) + "\n" + privacy_section(report)
    if metrics:
        body += "\n## Evaluation\n\nNot covered by the privacy guarantee (computed on evaluation data as usual).\n\n"
        body += "| metric | value |\n|---|---|\n"
        body += "".join(f"| {k} | {_fmt(v)} |\n" for k, v in metrics.items())
    load_base = (f"base_model = AutoModel.from_pretrained(\"{base}\")  # the head class of your task\n" if base else "")
    body += (
        "\n## Usage\n\n```python\nfrom peft import PeftModel\n" + ("from transformers import AutoModel\n" if base else "")
        + "\n" + load_base + "model = PeftModel.from_pretrained(base_model, \"<this repo id or folder>\")\n```\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
