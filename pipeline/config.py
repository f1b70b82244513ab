"""Typed job configuration: frozen dataclasses, saved as JSON next to every output.

Reuse of a cached artefact is keyed by its config (``check_reusable``): work is skipped only when the stored
config equals the requested one; a different config is reported, never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from pipeline import fs
from pipeline.errors import CairnError


def _finite(value: Any) -> bool:
    """False for a NaN or infinite number, or a tuple holding one (at any depth)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, tuple):
        return all(_finite(v) for v in value)
    return True


MAX_SEED = 2**31  # seeds are in [0, MAX_SEED): what NumPy, FAISS (a C int) and TensorFlow all take


def check_numbers(config: Any) -> None:
    """ValueError naming the first field of dataclass ``config`` that holds a NaN or an infinite number (itself or in
    a tuple), or a ``seed`` outside [0, 2**31). Every config's ``__post_init__`` calls it first: a configured number
    is finite, and the config's own range checks then compare real numbers (a NaN fails no ``<`` test). Nested
    configs check themselves."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _finite(value):
            raise ValueError(f"{f.name} must be finite (no nan or inf), not {value!r}")
        if f.name == "seed" and isinstance(value, int) and not 0 <= value < MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2**31 - 1, not {value}")


def to_dict(config: Any) -> dict:
    """A dataclass (possibly nested) as a JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str, allow_nan=False))


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-ready object or a dataclass."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """sha256 (first 16 hex digits) of a file's bytes, e.g. a manifest's."""
    return fs.sha256(path)[:16]


def save_json(path: str, obj: dict) -> None:
    """Write ``obj`` as JSON. A NaN or infinite number is refused (ValueError naming the file), not written as
    ``NaN``/``Infinity``, which are not JSON: a metric or record that is not a number is a bug to catch here."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, default=str, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: not written, it would hold a number that is not finite ({e})") from e
    fs.write_text(path, text + "\n")


def load_json(path: str) -> dict:
    return json.loads(fs.read_text(path))


def check_reusable(record_path: str, requested: dict) -> bool:
    """True when ``record_path`` exists and its ``config`` equals ``requested``.

    False when there is no record (nothing to reuse) or when it was made with another config (the caller
    recomputes); the caller logs which.
    """
    if not fs.exists(record_path):
        return False
    try:
        stored = load_json(record_path).get("config")
    except (ValueError, OSError):
        return False
    return stored == requested


def _coerce(text: str, current, where: str):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise CairnError(f"{where}: {text!r} is not a boolean (true/false)")
    for typ in (int, float):
        if isinstance(current, typ):
            try:
                value = typ(text)
            except ValueError:
                raise CairnError(f"{where}: {text!r} is not {'an integer' if typ is int else 'a number'}") \
                    from None
            if not _finite(value):
                raise CairnError(f"{where}: {text!r} is not a finite number")
            return value
    if isinstance(current, str):
        return text
    if isinstance(current, tuple) and current and isinstance(current[0], tuple):  # groups: 0.2,0.35;0.55,0.8
        try:
            groups = tuple(tuple(float(t) for t in group.split(",") if t.strip()) for group in text.split(";"))
        except ValueError:
            raise CairnError(f"{where}: {text!r} is not groups of numbers, e.g. 0.2,0.35;0.55,0.8") from None
        if not _finite(groups):
            raise CairnError(f"{where}: {text!r} holds a number that is not finite")
        return groups
    if isinstance(current, tuple):  # comma-separated numbers, e.g. scales=0.707,1,1.414
        try:
            numbers = tuple(float(t) for t in text.split(",") if t.strip())
        except ValueError:
            raise CairnError(f"{where}: {text!r} is not a comma-separated list of numbers") from None
        if not _finite(numbers):
            raise CairnError(f"{where}: {text!r} holds a number that is not finite")
        return numbers
    raise CairnError(f"{where}: this field cannot be set from the command line")


def override(config, path: str, text: str, where: str = ""):
    """``config`` with the field at dotted ``path`` set to ``text`` converted to the field's type."""
    where = where or f"--set {path}"
    head, _, rest = path.partition(".")
    names = [f.name for f in dataclasses.fields(config)]
    if head not in names:
        raise CairnError(f"{where}: {type(config).__name__} has no field {head!r}; fields: {', '.join(names)}")
    current = getattr(config, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise CairnError(f"{where}: {head} is a value, not a group")
        value = override(current, rest, text, where)
    elif dataclasses.is_dataclass(current):
        raise CairnError(f"{where}: {head} is a group; give one of its fields, e.g. {path}."
                         f"{dataclasses.fields(current)[0].name}=...")
    else:
        value = _coerce(text, current, where)
    try:
        return dataclasses.replace(config, **{head: value})
    except (ValueError, TypeError) as e:
        raise CairnError(f"{where}: {e}") from e


def apply_settings(config, items: list[str] | None, flag: str, example: str, form: str = "FIELD"):
    """``config`` with each ``FIELD=VALUE`` item of a repeatable ``flag`` (--set, --param, --detect) applied in
    order, each value converted to its field's type (dotted paths reach nested configs); ``form`` and
    ``example`` show what an item looks like in the error for a malformed one."""
    for item in items or []:
        path, eq, text = item.partition("=")
        if not eq or not path.strip():
            raise CairnError(f"{flag} {item!r}: expected {form}=VALUE, e.g. {example}")
        path = path.strip()
        config = override(config, path, text.strip(), where=f"{flag} {path}")
    return config


def describe_fields(config, prefix: str = "") -> list[str]:
    """Every settable field as ``name=default`` lines (for --help)."""
    lines = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, tuple) and value and isinstance(value[0], tuple):
            lines.append(f"{prefix}{f.name}={';'.join(','.join(str(v) for v in g) for g in value)}")
        elif isinstance(value, tuple):
            lines.append(f"{prefix}{f.name}={','.join(str(v) for v in value)}")
        else:
            lines.append(f"{prefix}{f.name}={value}")
    return lines
