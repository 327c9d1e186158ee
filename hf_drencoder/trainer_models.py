"""What a private trainer is given: its arguments matched to the privatised class's ``__init__``, and a model
given by name (a Hub id or a local folder) loaded the way that class loads one, so that the LoRA adapter is set up
and checked on the loaded model before training.

TRL's trainers (``SFTTrainer``, ``DPOTrainer``, ...) accept a name and load it with
``trl.trainer.utils.create_model_from_path`` and ``args.model_init_kwargs`` (plus a ``quantization_config``);
transformers' ``Trainer`` does not take a name, and neither does a private one made from it.
"""

from __future__ import annotations

import inspect
import os

from transformers import Trainer


def privatised_class(cls: type) -> type:
    """The ``Trainer`` class a private trainer class privatises (the first one in its MRO that is not private)."""
    from .trainer import PrivateTrainerMixin

    return next(c for c in cls.__mro__ if issubclass(c, Trainer) and not issubclass(c, PrivateTrainerMixin))


def bind_trainer_arguments(cls: type, positional: tuple, kwargs: dict) -> dict:
    """The positional arguments after ``model`` given their names in the privatised class's ``__init__`` (TRL's
    ``DPOTrainer`` takes ``ref_model`` second, ``Trainer`` takes ``args``), merged into ``kwargs``."""
    if not positional:
        return dict(kwargs)
    params = [p for p in inspect.signature(privatised_class(cls).__init__).parameters.values()][2:]  # self, model
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) > len(names):
        raise TypeError(f"{cls.__name__} got {len(positional) + 1} positional arguments; it takes {len(names) + 1}")
    merged = dict(kwargs)
    for name, value in zip(names, positional):
        if name in merged:
            raise TypeError(f"{cls.__name__} got two values for argument {name!r}")
        merged[name] = value
    return merged


def _is_trl_trainer(cls: type) -> bool:
    return any(c.__module__.split(".")[0] == "trl" for c in cls.__mro__)


def accepts_model_name(cls: type) -> bool:
    """The privatised class's ``model`` argument is typed to take a string (TRL's: ``str | PreTrainedModel``)."""
    parameter = inspect.signature(privatised_class(cls).__init__).parameters.get("model")
    annotation = "" if parameter is None else parameter.annotation
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    return "str" in text.replace("|", " ").replace(",", " ").replace("[", " ").replace("]", " ").split()


def load_named_model(cls: type, name: str, args, kwargs: dict):
    """The model ``name`` loaded as the privatised class would load it, or a refusal that says what to do.

    For a TRL trainer: ``create_model_from_path(name, **args.model_init_kwargs)`` with the trainer's
    ``quantization_config`` (taken out of ``kwargs``: the loaded model carries it), ``device_map=None`` under
    multi-GPU / DeepSpeed and ``trust_remote_code`` from the arguments, as TRL does. ``args.model_init_kwargs`` is
    cleared afterwards (they have been used: the trainer would otherwise warn that they are ignored). Without a
    ``processing_class`` and with a ``revision``, the processor is loaded at that revision too."""
    base = privatised_class(cls)
    if not (accepts_model_name(cls) and _is_trl_trainer(cls)):
        if accepts_model_name(cls):
            why = (f"{base.__name__} loads names in its own way, which the private trainer would have to repeat "
                   "before setting up the adapter")
        else:
            why = f"{base.__name__} does not load a model from a name"
        raise ValueError(
            f"{cls.__name__} needs a model object, not the name {name!r}: {why}. Load it first (e.g. "
            "AutoModelForCausalLM.from_pretrained(name)) and pass the model; the LoRA adapter is then set up and "
            "checked on it before training"
        )
    from trl.trainer.utils import create_model_from_path

    init = dict(getattr(args, "model_init_kwargs", None) or {})
    quantization_config = kwargs.pop("quantization_config", None)
    if quantization_config is not None:
        if "quantization_config" in init:
            raise ValueError(
                "quantization_config is set both as a trainer argument and in args.model_init_kwargs: set it in one "
                "place"
            )
        init["quantization_config"] = quantization_config
    if str(getattr(args.distributed_state.distributed_type, "value", args.distributed_state.distributed_type)) in (
        "MULTI_GPU", "DEEPSPEED",
    ):
        init["device_map"] = None  # as TRL: "auto" fails under distributed training
    init.setdefault("trust_remote_code", args.trust_remote_code)
    model = create_model_from_path(os.fspath(name), **init)
    if init.get("revision") is not None and kwargs.get("processing_class") is None:
        from transformers import AutoProcessor

        kwargs["processing_class"] = AutoProcessor.from_pretrained(
            os.fspath(name), revision=init["revision"], trust_remote_code=init["trust_remote_code"]
        )
    args.model_init_kwargs = None
    return model
