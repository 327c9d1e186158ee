"""Privacy settings from the environment: ``HF_DRENCODER_<FIELD>`` variables and a JSON or YAML file named in
``HF_DRENCODER_CONFIG``, so that a script that parses a plain ``TrainingArguments`` needs no edit to choose epsilon.
Values are parsed by the field's declared type; unknown names are refused."""

from __future__ import annotations

import dataclasses
import json
import os

ENV_PREFIX = "HF_DRENCODER_"
CONFIG_ENV = "HF_DRENCODER_CONFIG"
# variables of that prefix that are not privacy settings
_OTHER_ENV = {"HF_DRENCODER_CONFIG", "HF_DRENCODER_DEBUG"}
# alternatives: the environment naming one drops the script's value of the other
ALTERNATIVES = {"target_epsilon": "noise_multiplier", "noise_multiplier": "target_epsilon"}


def settings_default(settings, name: str):
    """The default of field ``name`` of the dataclass ``settings``."""
    f = {f.name: f for f in dataclasses.fields(settings)}[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _annotation(settings, name: str) -> str:
    """The field's declared type as written (``"float | None"``). Not ``Field.type``: HfArgumentParser rewrites
    that in place (``float``), which would lose what an environment value must be parsed as."""
    return str(settings.__annotations__[name])


def _parse_env_value(name: str, text, annotation: str):
    if not isinstance(text, str):
        return text  # from a JSON/YAML file: already typed
    optional = "None" in annotation
    kind = annotation.replace("| None", "").replace("None |", "").strip()
    if optional and text.strip().lower() in ("", "none", "null"):
        return None
    try:
        if kind == "bool":
            low = text.strip().lower()
            if low not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return low in ("1", "true", "yes")
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind.startswith("list"):
            return [t for t in text.replace(",", " ").split() if t]
        return text
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={text!r} is not a valid {kind}") from None


def environment_overrides(settings) -> dict:
    """Privacy settings given by the environment: ``HF_DRENCODER_CONFIG`` (a JSON or YAML file of
    ``{field: value}``), then ``HF_DRENCODER_<FIELD>`` variables, which win. Unknown names are refused (a typo must
    not be silently ignored). ``settings``: the dataclass whose fields may be set (`DRArgumentsMixin`)."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    out: dict = {}
    path = os.environ.get(CONFIG_ENV)
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"{CONFIG_ENV}={path!r}: no such file")
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                values = yaml.safe_load(f) or {}
            else:
                values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{CONFIG_ENV}={path!r} must hold a mapping of privacy settings")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{path}: unknown privacy settings {', '.join(unknown)}; known: {', '.join(fields)}")
        out.update({k: _parse_env_value(k, v, _annotation(settings, k)) for k, v in values.items()})
    for var, text in os.environ.items():
        if not var.startswith(ENV_PREFIX) or var in _OTHER_ENV:
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in fields:
            raise ValueError(
                f"{var} is not a privacy setting. Known: {', '.join(ENV_PREFIX + n.upper() for n in fields)} (and "
                f"{CONFIG_ENV}); Trainer's own settings come from your script's arguments"
            )
        out[name] = _parse_env_value(name, text, _annotation(settings, name))
    return out
