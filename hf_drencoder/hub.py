"""The model card of a privately trained adapter: Hub metadata plus the privacy report, in one README.md.

``DRTrainer.save_model`` writes it next to the adapter and ``privacy_report.json``; ``DRTrainer.push_to_hub``
uploads it with them through huggingface_hub, like any Trainer model card. The card states the guarantee
exactly as the accountants computed it: every epsilon next to the accountant that produced it, the delta,
the mechanism's parameters (noise multiplier, sampling rate, number of compositions, clipping norm), the
privacy unit and, when a gradient codec was used, its latent ratio. A report of a run without DP says so
and claims nothing.

The same numbers are in the YAML metadata under ``differential_privacy`` so that they can be read by a
program (``ModelCard.load(repo_id).data.differential_privacy``).
"""

from __future__ import annotations

import math
import os
import re

from huggingface_hub import ModelCard, ModelCardData

__all__ = ["build_model_card", "privacy_metadata", "privacy_section", "hub_model_id", "CARD_NAME"]

CARD_NAME = "README.md"
LIBRARY_NAME = "hf-drencoder"
BASE_TAGS = ("lora", "dr-encoder", "peft")
DP_TAG = "differential-privacy"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _version() -> str:
    from . import __version__

    return __version__


def hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be a Hub repo id (``owner/name`` or ``name``), else None (a local folder, empty)."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith("."):
        return None
    if not _REPO_ID.match(name) or "--" in name or ".." in name or name.endswith(".git"):
        return None
    return name


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
        "epsilon", "accountant", "epsilon_prv", "epsilon_rdp", "epsilon_gdp", "mu_gdp", "delta", "noise_multiplier",
        "sample_rate", "max_grad_norm", "clipping", "expected_batch_size", "target_epsilon",
        "codec_latent_ratio", "noise_space", "uplink_bytes", "uplink_ratio",
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
        lines += [f"- σ = {_fmt(float(s))}, q = {_fmt(float(q))}, {int(n)} times" for s, q, n in history]
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
) -> ModelCard:
    """A ``huggingface_hub.ModelCard`` for an adapter trained by hf-drencoder.

    Args:
        report: ``DRTrainer.privacy_report()`` (or a federated run's report). Read with ``.get``: keys a run
            did not produce (e.g. ``codec_latent_ratio`` without a codec) are reported as absent.
        base_model: Hub id of the base model; a local path is left out of the metadata (the Hub expects an id).
        datasets: Hub dataset id(s) the adapter was trained on, if they are on the Hub.
        tags: extra tags; ``lora``, ``dr-encoder``, ``peft`` and (when DP was on) ``differential-privacy``
            are always present.
        model_name: title of the card.
        language: Hub metadata, passed through.
        license: Hub metadata, passed through.
        eval_results: metrics to list (e.g. ``trainer.evaluate()``); stated as not covered by the guarantee.
    """
    dp = bool(report.get("dp_enabled", True))
    all_tags = ([DP_TAG] if dp else []) + list(BASE_TAGS)
    all_tags += [t for t in _as_list(tags) if t not in all_tags]
    base = hub_model_id(base_model)
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        base_model=base,
        datasets=_as_list(datasets) or None,
        tags=all_tags,
        language=language,
        license=license,
        pipeline_tag=None,
        differential_privacy=privacy_metadata(report),
    )
    title = model_name or "LoRA adapter trained with differential privacy"
    if not dp:
        title = model_name or "LoRA adapter (non-private baseline)"
    intro = [f"# {title}", ""]
    what = "A LoRA adapter" + (f" for [{base}](https://huggingface.co/{base})" if base else "")
    what += " trained with hf-drencoder (DP LoRA fine-tuning after DR-Encoder, Wu et al., AAAI-25)."
    intro += [what, ""]
    body = "\n".join(intro) + "\n" + privacy_section(report)
    if eval_results:
        body += "\n## Evaluation\n\nNot covered by the privacy guarantee (computed on evaluation data as usual).\n\n"
        body += "| metric | value |\n|---|---|\n"
        body += "".join(f"| {k} | {_fmt(v) if isinstance(v, (int, float)) else v} |\n" for k, v in eval_results.items())
    body += (
        "\n## Usage\n\n```python\nfrom peft import PeftModel\n\n"
        "model = PeftModel.from_pretrained(base_model, \"<this repo id or folder>\")\n```\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
