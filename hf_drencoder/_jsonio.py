"""JSON that every parser reads: no ``Infinity`` or ``NaN`` (which ``json.dumps`` writes by default, and which is
not JSON). A non-finite number is written as ``null`` and listed, with what it stood for, under ``"non_finite"``,
e.g. ``{"epsilon": null, ..., "non_finite": {"epsilon": "inf"}}`` for a run without differential privacy."""

from __future__ import annotations

import json
import math

NON_FINITE_KEY = "non_finite"


def _clean(value, path: str, found: dict):
    if isinstance(value, float) and not math.isfinite(value):
        found[path or "."] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return None
    if isinstance(value, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), found) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", found) for i, v in enumerate(value)]
    return value


def json_safe(obj):
    """``obj`` with non-finite floats replaced by None; a dict gets ``"non_finite": {path: "inf" | "-inf" | "nan"}``
    when anything was replaced."""
    found: dict[str, str] = {}
    out = _clean(obj, "", found)
    if found and isinstance(out, dict):
        out[NON_FINITE_KEY] = found
    return out


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of `json_safe` (``allow_nan=False``: nothing non-standard can slip through)."""
    kwargs.setdefault("indent", 2)
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def dump(obj, path: str, **kwargs) -> None:
    with open(path, "w") as f:
        f.write(dumps(obj, **kwargs) + "\n")
