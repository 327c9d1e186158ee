"""LoRA wrapping and the check that only adapters train: under DP only LoRA gradients are clipped and noised,
so any other trainable tensor would be released without protection."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from .losses import base_model_of, infer_task

_PEFT_TASK = {
    "causal_lm": TaskType.CAUSAL_LM,
    "seq2seq_lm": TaskType.SEQ_2_SEQ_LM,
    "sequence_classification": TaskType.SEQ_CLS,
    "token_classification": TaskType.TOKEN_CLS,
}


def default_lora_config(model, r: int = 8, alpha: int = 16, dropout: float = 0.0, target_modules=None) -> LoraConfig:
    """A LoRA config for ``model``: the task type from its head (a classification head becomes
    ``modules_to_save``, as peft does for SEQ_CLS) and, unless given, peft's own default target modules for the
    architecture (``target_modules=None`` lets peft choose when it wraps the model)."""
    task = _PEFT_TASK[infer_task(model)]
    return LoraConfig(task_type=task, r=r, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=list(target_modules) if target_modules else None)


def wrap_with_lora(model, peft_config=None, **defaults):
    """Return a PeftModel: ``model`` itself if it already is one (``peft_config`` must then be None),
    ``model`` wrapped with ``peft_config``, or wrapped with `default_lora_config`."""
    if isinstance(model, PeftModel):
        if peft_config is not None:
            raise ValueError("the model is already a PeftModel: pass either a PeftModel or peft_config, not both")
        return model
    if peft_config is None:
        peft_config = default_lora_config(model, **defaults)
    try:
        return get_peft_model(model, peft_config)
    except ValueError as err:
        if "target_modules" not in str(err):
            raise
        import torch

        base = base_model_of(model)
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(
            f"peft has no default LoRA target modules for model_type={model_type!r}. Name the layers to adapt, "
            "usually the attention query and value projections: DRTrainer(peft_config=LoraConfig(target_modules=[...])) "
            f"or --default_lora_target_modules .... This model's Linear layers are: {', '.join(linear)}"
        ) from None


def is_adapter_parameter(name: str) -> bool:
    """LoRA factors and ``modules_to_save`` copies (e.g. a classification head) are adapter parameters."""
    return "lora_" in name or ".modules_to_save." in name


def trainable_adapter_parameters(model) -> list[tuple[str, object]]:
    """The trainable parameters, after checking that all of them belong to the adapter."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    foreign = [n for n, _ in trainable if not is_adapter_parameter(n)]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(
            f"trainable parameters outside the LoRA adapter: {shown}. Under DP only adapter gradients are "
            "clipped and noised; freeze these (requires_grad=False) or list their modules in "
            "LoraConfig(modules_to_save=[...])"
        )
    if not trainable:
        raise ValueError("the model has no trainable parameters: check the LoRA config's target_modules")
    return trainable


def is_lora_a_factor(name: str) -> bool:
    """A LoRA A factor (of a linear or an embedding layer): what FFA-LoRA freezes."""
    return "lora_A." in name or "lora_embedding_A." in name


def freeze_lora_a(model) -> int:
    """FFA-LoRA (Sun et al., 2024): freeze every LoRA A factor at its current value (its initialisation for a fresh
    adapter), so that only B and ``modules_to_save`` train. Returns how many tensors were frozen; refuses a model
    with none (the setting would otherwise do nothing)."""
    frozen = 0
    for name, p in model.named_parameters():
        if is_lora_a_factor(name) and p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    if not frozen and not any(is_lora_a_factor(n) for n, _ in model.named_parameters()):
        raise ValueError("lora_freeze_a=True, but the model has no LoRA A factors to freeze: it needs a LoRA adapter "
                         "(a peft LoraConfig), or unset lora_freeze_a")
    return frozen
