"""`load_codec`: a `GradientCodec` from what a user passes as ``codec=`` (an instance, a folder or a Hub id),
with errors that name the path and what is wrong with it.

``GradientCodec.from_pretrained`` on a local folder that does not exist falls through to the Hub and fails
with huggingface_hub's repo-id message, which does not say that the folder is missing; a half-written folder
fails deep inside safetensors. `load_codec` looks at the path first.
"""

from __future__ import annotations

import json
import os

from huggingface_hub.utils import HFValidationError, validate_repo_id

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

__all__ = ["CodecLoadError", "load_codec"]


class CodecLoadError(OSError):
    """A codec path or repository that does not hold a loadable `GradientCodec`; the message names it."""


def _looks_local(spec: str) -> bool:
    """A path (not a Hub id) by its form: absolute, relative with ./ or ../, ~, a file name, or not a valid id."""
    if os.path.isabs(spec) or spec.startswith((".", "~")) or spec.endswith((".json", ".safetensors")):
        return True
    if os.sep in spec.strip(os.sep) and spec.count("/") > 1:
        return True
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return True
    return False


def _check_folder(path: str, spec: str) -> None:
    if os.path.isfile(path):
        raise CodecLoadError(f"codec {spec!r} is a file, not a codec folder: pass the folder that holds "
                             f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(path, n))]
    if missing:
        present = sorted(os.listdir(path))
        raise CodecLoadError(
            f"codec folder {spec!r} has no {' and no '.join(missing)}: it is not a saved GradientCodec (it holds: "
            f"{', '.join(present) if present else 'nothing'}). Save one with codec.save_pretrained(folder) or "
            "hf-drencoder pretrain-codec --output_dir folder"
        )
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CodecLoadError(f"{config_path} is not valid JSON ({e}): the codec's config is corrupted") from e
    if not isinstance(config, dict) or "layout" not in config:
        keys = ", ".join(sorted(config)) if isinstance(config, dict) else type(config).__name__
        raise CodecLoadError(f"{config_path} is not a GradientCodec config: it has no 'layout' (keys: {keys})")


def _is_subspace(path: str) -> bool:
    """A folder written by `SubspaceCodec.save_pretrained` (its config has the subspace codec's own keys)."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        return {"history", "momentum", "head"} <= set(json.load(f))


def load_codec(spec, model=None, *, layout=None, **kwargs):
    """The `GradientCodec` that ``spec`` names, checked against ``model``'s LoRA layout.

    Args:
        spec: a `GradientCodec` or a baseline from `.baselines` (returned after the layout check), a local folder written by
            ``save_pretrained``, or a Hub repo id.
        model: the `PeftModel` the codec will encode gradients of (its trainable LoRA layout is checked), or None.
        layout: a `LoraLayout` to check against instead of ``model``'s.
        **kwargs: passed to ``GradientCodec.from_pretrained`` (``revision``, ``token``, ...).

    Raises:
        CodecLoadError: the folder does not exist, is a file, lacks ``config.json`` or ``model.safetensors``, or
            holds a corrupted one; ``spec`` is neither an existing folder nor a valid Hub repo id.
        LayoutMismatchError: the codec was made for another LoRA layout.
    """
    from .baselines import BaselineCodec
    from .codec import GradientCodec
    from .layout import LayoutMismatchError
    from .subspace import SubspaceCodec

    if isinstance(spec, (GradientCodec, BaselineCodec, SubspaceCodec)):
        if model is not None or layout is not None:
            spec.check_layout(layout if layout is not None else model)
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"codec must be a GradientCodec, a folder or a Hub repo id, got {type(spec).__name__}")
    spec = os.fspath(spec)
    path = os.path.expanduser(spec)
    if os.path.exists(path):
        _check_folder(path, spec)
    elif _looks_local(spec):
        parent = os.path.dirname(os.path.abspath(path))
        where = "" if os.path.isdir(parent) else f" (nor does its parent folder {parent})"
        raise CodecLoadError(f"codec path {spec!r} does not exist{where}; it is not a Hub repo id either")
    cls = SubspaceCodec if os.path.exists(path) and _is_subspace(path) else GradientCodec
    try:
        return cls.from_pretrained(path if os.path.exists(path) else spec, model=model, layout=layout, **kwargs)
    except (LayoutMismatchError, CodecLoadError):
        raise
    except HFValidationError as e:
        raise CodecLoadError(f"codec {spec!r} is not an existing folder, and not a valid Hub repo id: {e}") from e
    except (TypeError, KeyError) as e:
        if os.path.exists(path):
            raise CodecLoadError(f"{os.path.join(spec, CONFIG_NAME)} does not describe a GradientCodec: {e}") from e
        raise
    except OSError as e:
        if os.path.exists(path):
            raise CodecLoadError(f"codec folder {spec!r} cannot be read ({type(e).__name__}: {e})") from e
        raise CodecLoadError(
            f"codec {spec!r}: no such local folder ({os.path.abspath(path)} does not exist), and as a Hub repo id it "
            f"could not be fetched: {e}") from e
    except Exception as e:  # safetensors raises its own error types on a corrupted file
        if os.path.exists(path) and "safetensor" in (type(e).__module__ + type(e).__name__ + str(e)).lower():
            raise CodecLoadError(
                f"{os.path.join(spec, WEIGHTS_NAME)} is corrupted or truncated ({type(e).__name__}: {e})") from e
        if os.path.exists(path):
            raise CodecLoadError(f"codec folder {spec!r} cannot be loaded ({type(e).__name__}: {e})") from e
        raise
