"""Typed job configuration: frozen dataclasses, saved as JSON next to every output.

Reuse of a cached artefact is keyed by its config (``check_reusable``): work is skipped only when the stored
config equals the requested one; a different config is reported, never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline import fs


def to_dict(config: Any) -> dict:
    """A dataclass (possibly nested) as a JSON-ready dict."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def fingerprint(obj: Any) -> str:
    """A short, stable hash of a JSON-ready object or a dataclass."""
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """sha256 (first 16 hex digits) of a file's bytes, e.g. a manifest's."""
    return hashlib.sha256(fs.read_bytes(path)).hexdigest()[:16]


def save_json(path: str, obj: dict) -> None:
    fs.write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


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
