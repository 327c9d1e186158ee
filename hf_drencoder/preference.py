"""Preference pairs as the privacy unit: TRL's ``DPOTrainer`` made private.

One training example is one preference pair (prompt, chosen, rejected). TRL's collator puts the B chosen rows of a
batch first and the B rejected rows after them, so the model sees 2B rows; opacus gives one gradient per row, and
the private step sums the two rows of a pair before clipping (as for a group of rows, `privacy/grouping.py`):
one pair's gradient is clipped to C as a whole, different pairs independently.

The per-pair loss is TRL's DPO loss of that pair alone: the sequence log-probabilities of the policy and of the
reference (TRL's ``compute_ref_log_probs``: the base model with the adapter disabled, the separate ``ref_model``
when one is given, or the precomputed ``ref_*_logps`` columns) go into the loss of each configured type. Loss types
and options that tie pairs together, or that this per-pair loss does not compute, are refused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# loss types computed per pair (TRL's formulas of the same names)
PAIR_LOSSES = ("sigmoid", "hinge", "ipo")
# loss types whose value for one pair depends on the other pairs of the batch
_COUPLING_LOSSES = {
    "aot": "sorts the log-ratios of the whole batch",
    "aot_unpaired": "sorts the log-ratios of the whole batch",
    "sft": "averages the chosen tokens of the whole batch",
}
_NON_MODEL_KEYS = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
_CODEC_AUTO = (
    "codec='auto' with preference pairs: stage 1 collects per-row gradient statistics, not per pair. Pre-train the "
    "codec elsewhere and pass its path, or train without a codec"
)


def dpo_option_problems(args) -> list[str]:
    """DPOConfig settings the private per-pair loss does not cover, each with the fix."""
    if not hasattr(args, "loss_type"):
        return [f"{type(args).__name__} is not a DPOConfig: pass trl.DPOConfig(...) as args"]
    problems = []
    for loss_type in args.loss_type:
        if loss_type in _COUPLING_LOSSES:
            problems.append(
                f"loss_type={loss_type!r} {_COUPLING_LOSSES[loss_type]}, so one pair's loss depends on the other pairs "
                f"and clipping each pair would not bound its influence. Use one of {', '.join(PAIR_LOSSES)}"
            )
        elif loss_type not in PAIR_LOSSES:
            problems.append(
                f"loss_type={loss_type!r} is not computed by the private per-pair loss; use one of "
                f"{', '.join(PAIR_LOSSES)}"
            )
    if args.f_divergence_type != "reverse_kl":
        problems.append(
            f"f_divergence_type={args.f_divergence_type!r} is not computed by the private per-pair loss; use "
            "'reverse_kl' (standard DPO)"
        )
    if args.ld_alpha is not None:
        problems.append("ld_alpha (length-desensitised log-probabilities) is not computed by the private per-pair "
                        "loss; unset it")
    if args.use_weighting:
        problems.append("use_weighting=True (WPO weights) is not computed by the private per-pair loss; set it to False")
    if args.sync_ref_model:
        problems.append("sync_ref_model=True would make the reference follow the trained model; set it to False")
    if args.max_physical_batch_size is not None:
        problems.append(
            "max_physical_batch_size with preference pairs: a Poisson draw is not split into passes yet. Unset it and "
            "bound memory with per_device_train_batch_size and gradient_accumulation_steps"
        )
    if args.codec == "auto":
        problems.append(_CODEC_AUTO)
    if args.privacy_unit == "group":
        problems.append("privacy_unit='group' with preference pairs is not supported: the privacy unit is one pair")
    return problems


def pair_losses(chosen, rejected, ref_chosen, ref_rejected, completion_mask, loss_types, loss_weights, beta):
    """The DPO loss of each pair, ``[B]``: ``chosen`` / ``rejected`` are the policy's sequence log-probabilities of
    the completions, ``ref_*`` the reference's, ``completion_mask`` the ``[2B, T]`` mask of completion tokens
    (chosen rows first); the configured loss types weighted and summed, as TRL's ``DPOTrainer`` does per pair."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    total = torch.zeros_like(margin)
    for loss_type, weight in zip(loss_types, loss_weights, strict=True):
        if loss_type == "sigmoid":  # DPO: -log sigmoid(beta * margin)
            loss = -F.logsigmoid(beta * margin)
        elif loss_type == "hinge":  # SLiC: max(0, 1 - beta * margin)
            loss = torch.relu(1 - beta * margin)
        elif loss_type == "ipo":  # IPO, with the log-ratios per completion token as TRL normalises them
            lengths = completion_mask.sum(dim=1).clamp(min=1).to(margin.dtype)
            chosen_len, rejected_len = lengths.chunk(2)
            loss = (chosen_ratio / chosen_len - rejected_ratio / rejected_len - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"loss_type {loss_type!r} is not a per-pair loss; one of {PAIR_LOSSES}")
        total = total + weight * loss
    return total


class PreferencePairsMixin:
    """The per-pair private step for TRL's ``DPOTrainer`` (put before `PrivateTrainerMixin`; `make_private` does)."""

    def _default_arguments(self):
        from trl import DPOConfig

        return DPOConfig(output_dir="trainer_output")

    def _check_private_arguments(self, args) -> None:
        super()._check_private_arguments(args)
        problems = dpo_option_problems(args) if not args.disable_dp else []
        if problems:
            raise ValueError(f"{type(self).__name__} cannot guarantee privacy with these settings:\n- "
                             + "\n- ".join(problems))

    def _after_trainer_init(self) -> None:
        super()._after_trainer_init()
        peft_config = getattr(self.model, "peft_config", {})
        if self._fresh_adapter and "ref" in peft_config:
            # DPOTrainer copies a PeftModel's adapter into a frozen "ref" adapter for the reference; the adapter was
            # created here with LoRA's zero init, so the reference is the base model with the adapter disabled (as
            # TRL does for a peft_config), without a second adapter in every forward pass and in the saved folder
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")
        if self.dp_enabled and getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{type(self).__name__} cannot guarantee privacy with these settings:\n- the mixture-of-experts "
                "router loss (router_aux_loss_coef) balances experts over the whole batch, so pairs influence each "
                "other's loss; set router_aux_loss_coef=0"
            )

    def _privacy_unit_name(self) -> str:
        return "preference pair"

    def _setup_codec(self, resume_from_checkpoint, n: int):
        if self.dp_enabled and isinstance(self._codec_spec, str) and self._codec_spec == "auto":
            raise ValueError(f"{type(self).__name__} cannot guarantee privacy with these settings:\n- {_CODEC_AUTO}")
        return super()._setup_codec(resume_from_checkpoint, n)

    def _check_data(self) -> None:
        names = getattr(self.train_dataset, "column_names", None) or []
        missing = [c for c in ("prompt_ids", "chosen_ids", "rejected_ids") if c not in names]
        if missing:
            raise ValueError(
                f"train_dataset lacks {', '.join(missing)} after DPOTrainer's preparation: pass a preference dataset "
                "(prompt, chosen, rejected) and let DPOTrainer tokenize it"
            )

    def _rows_of_units(self, inputs, num_units: int):
        rows = inputs["input_ids"].shape[0]
        if rows != 2 * num_units:
            raise RuntimeError(f"a batch of {num_units} preference pairs has {rows} rows, not {2 * num_units}")
        return torch.arange(num_units, device=inputs["input_ids"].device).repeat(2)  # chosen rows, then rejected

    def per_sample_losses(self, model, inputs) -> torch.Tensor:
        """The DPO loss of each preference pair, ``[B]`` (see `pair_losses`)."""
        completion_mask = inputs["completion_mask"]
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        log_probs = model(**model_kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs
        # (prompt-learning adapters prepend virtual tokens: keep the positions of the real tokens, as TRL does)
        logps = log_probs[:, -(completion_mask.shape[1] - 1):].sum(dim=1)
        chosen, rejected = logps.chunk(2)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(
                self.ref_model if self.ref_model is not None else model, inputs
            )
        weights = self.args.loss_weights or [1.0] * len(self.args.loss_type)
        return pair_losses(chosen.float(), rejected.float(), ref_chosen.float(), ref_rejected.float(),
                           completion_mask, self.args.loss_type, weights, self.args.beta)


def preference_mixin_for(trainer_cls: type) -> type | None:
    """`PreferencePairsMixin` for TRL's ``DPOTrainer`` and its subclasses, else None (TRL need not be installed)."""
    import sys

    if "trl" not in sys.modules and not any(c.__module__.split(".")[0] == "trl" for c in trainer_cls.__mro__):
        return None
    try:
        from trl import DPOTrainer
    except ImportError:
        return None
    return PreferencePairsMixin if issubclass(trainer_cls, DPOTrainer) else None
