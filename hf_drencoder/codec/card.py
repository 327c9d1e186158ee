"""The model card (README.md) of a saved `GradientCodec`: what its prior cost in privacy, the LoRA layout it fits,
how to load it.

`GradientCodec.save_pretrained` and `push_to_hub` write it through `PyTorchModelHubMixin.generate_model_card`.
The stage-1 cost is stated as recorded in the codec's ``stage1_privacy``: the (sigma, q, releases) of the
statistics release and, when the release recorded its delta (``hf-drencoder pretrain-codec`` does), the epsilon
of that release alone under every accountant. Using the codec to train on the same data adds this cost to the
training run's ledger (``DRTrainer`` does it); the card says so.
"""

from __future__ import annotations


from huggingface_hub import ModelCard, ModelCardData

PAPER_URL = "https://arxiv.org/abs/2412.17053"
CODEC_TAGS = ("hf-drencoder", "lora", "gradient-compression", "dr-encoder")
# a layout table longer than this lists the first tensors only (the full layout is in config.json)
_MAX_ROWS = 24


def _fmt(x, digits: int = 4) -> str:
    from ..hub import _fmt as fmt  # one formatting for both cards

    return fmt(x, digits)


def _stage1_epsilons(history, delta) -> dict:
    from ..privacy.accounting import ACCOUNTANTS, compute_epsilon

    if not history or delta is None:
        return {}
    out = {}
    for name in ACCOUNTANTS:
        try:
            out[f"epsilon_{name}"] = float(compute_epsilon(history, float(delta), name))
        except Exception:  # noqa: BLE001 - an accountant that cannot evaluate this history is left out
            continue
    return out


def stage1_metadata(codec) -> dict:
    """The ``differential_privacy`` block of the codec's card: what building its prior cost."""
    info = codec.stage1_privacy
    if info is None:
        return {"stage": 1, "known": False}
    if info.get("public"):
        return {"stage": 1, "known": True, "public": True, "reason": info.get("reason")}
    history = [[float(s), float(q), int(t)] for s, q, t in info["history"]]
    meta = {"stage": 1, "known": True, "public": False, "privacy_unit": info.get("unit", "example"),
            "history": history}
    for key in ("delta", "accountant", "released", "max_grad_norm"):
        if info.get(key) is not None:
            meta[key] = info[key]
    eps = _stage1_epsilons(history, info.get("delta"))
    meta.update(eps)
    accountant = info.get("accountant", "prv")
    if f"epsilon_{accountant}" in eps:
        meta["epsilon"] = eps[f"epsilon_{accountant}"]
    return meta


def _privacy_section(codec, meta: dict) -> list[str]:
    lines = ["## Privacy cost of the prior (stage 1)", ""]
    if not meta["known"]:
        return lines + [
            "This codec does not record what its prior cost. Its prior may encode private data: `DRTrainer` refuses "
            "it for training on private data until its provenance is declared (`codec.mark_public(reason)`).", "",
        ]
    if meta.get("public"):
        return lines + [
            f"Declared public (no privacy cost): {meta.get('reason')}. A false declaration voids the guarantee of "
            "every run that uses this codec.", "",
        ]
    unit = meta["privacy_unit"]
    releases = sum(t for _, _, t in meta["history"])
    what = meta.get("released") or "noisy sums of clipped per-example LoRA gradient statistics"
    eps = meta.get("epsilon")
    if eps is not None:
        head = (f"Building the prior cost **ε = {_fmt(eps)}** ({meta.get('accountant', 'prv').upper()} accountant) at "
                f"**δ = {_fmt(meta['delta'], 3)}**, {unit}-level, for {releases} release(s) of the Gaussian mechanism.")
    else:
        head = (f"Building the prior cost {releases} release(s) of the Gaussian mechanism at {unit} level; the "
                "release did not record its δ, so ε is not stated here: compute it with "
                "`hf_drencoder.compute_epsilon(history, delta, accountant)` from the history below.")
    lines += [
        head, "",
        f"What was released: {what}. The codec was then trained only on synthetic gradients drawn from the prior "
        "built from that release (post-processing); it never saw a real gradient.", "",
        "Training with this codec on the same data composes this cost with the training steps: `DRTrainer` adds "
        "the history below to its accountant, so the ε it reports includes stage 1.", "",
        "| quantity | value |", "|---|---|",
    ]
    for key, label in (("epsilon_prv", "ε PRV"), ("epsilon_rdp", "ε RDP"), ("epsilon_gdp", "ε GDP (CLT)"),
                       ("delta", "δ"), ("max_grad_norm", "clipping norm C")):
        if meta.get(key) is not None:
            lines.append(f"| {label} | {_fmt(meta[key])} |")
    lines.append(f"| privacy unit | {unit} |")
    lines += [f"| release σ = {_fmt(s)}, q = {_fmt(q)} | {t} time(s) |" for s, q, t in meta["history"]]
    return lines + [""]


def _layout_section(codec) -> list[str]:
    layout = codec.layout
    lines = [
        "## LoRA layout it fits", "",
        f"{layout.describe()}. `GradientCodec.from_pretrained(path, model=peft_model)` checks a model's trainable "
        "LoRA tensors against this layout (names, shapes, order) and refuses a mismatch.", "",
        "| tensor | shape |", "|---|---|",
    ]
    for block in layout.blocks[:_MAX_ROWS]:
        lines.append(f"| `{block.name}` | {' x '.join(str(n) for n in block.shape)} |")
    if len(layout.blocks) > _MAX_ROWS:
        lines.append(f"| ... {len(layout.blocks) - _MAX_ROWS} more (see `config.json`) | |")
    return lines + [""]


def codec_model_card(codec) -> ModelCard:
    """The card of ``codec`` (a `GradientCodec`)."""
    from .. import __version__

    meta = stage1_metadata(codec)
    tags = list(CODEC_TAGS)
    if meta.get("known") and not meta.get("public"):
        tags.insert(0, "differential-privacy")
    data = ModelCardData(
        library_name="hf-drencoder",
        tags=tags,
        differential_privacy=meta,
        gradient_codec={
            "latent_ratio": float(codec.latent_ratio), "latent_dim": int(codec.latent_dim),
            "payload_bytes": int(codec.payload_bytes), "gradient_dim": int(codec.layout.dim),
            "layout_fingerprint": codec.layout.fingerprint, "prior": codec.prior_kind, "decoder": codec.decoder_kind,
            "hf_drencoder_version": __version__,
        },
    )
    lines = [
        "# Gradient codec for DP LoRA fine-tuning (DR-Encoder stage 1)", "",
        f"An encoder of LoRA gradients to {codec.latent_dim} numbers ({_fmt(float(codec.latent_ratio))} of "
        f"{codec.layout.dim}; {codec.payload_bytes} bytes per message) and a noise-aware decoder, built by "
        f"hf-drencoder {__version__} from a `{codec.prior_kind}` prior. Encoding and decoding an already private "
        "update are post-processing: they cost no privacy.", "",
    ]
    lines += _privacy_section(codec, meta)
    lines += _layout_section(codec)
    report = codec.pretrain_report or {}
    if report.get("mmse_heldout") is not None:
        lines += ["## Quality on held-out synthetic gradients", "",
                  f"Relative MSE of the MMSE decoder: {_fmt(float(report['mmse_heldout']))}.", ""]
    lines += [
        "## Usage", "",
        "```python",
        "from hf_drencoder import DRTrainer, GradientCodec",
        "",
        "codec = GradientCodec.from_pretrained(\"<this repo id or folder>\", model=peft_model)",
        "trainer = DRTrainer(model=peft_model, args=args, train_dataset=train, codec=codec)",
        "```", "",
        "## Links", "",
        f"- Paper: DR-Encoder, Wu et al., AAAI-25: [{PAPER_URL}]({PAPER_URL})",
        "- Library: hf-drencoder (`pip install hf-drencoder`), the `GradientCodec` and `pretrain-codec` command;"
        " the codec's stage-1 statistics and decoder are described in its documentation (Gradient codec page).",
        "- PEFT (the LoRA adapters this codec encodes): [https://huggingface.co/docs/peft](https://huggingface.co/docs/peft)",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


__all__ = ["codec_model_card", "stage1_metadata"]
