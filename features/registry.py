"""Extractors by name (global descriptors and local features), built from a JSON-ready parameter dict.

Beam DoFns carry (name, params) and build the extractor once per worker with :func:`make_extractor`, so
nothing heavier than a dict is pickled into the pipeline.
"""

from __future__ import annotations

import dataclasses

from features.base import GlobalExtractor
from features.cnn import CnnConfig, CnnExtractor
from features.delf import DelfConfig, DelfExtractor
from features.hog import HogConfig, HogExtractor
from features.sift import SiftConfig, SiftExtractor

# name -> (extractor class, its frozen config class); extractor.kind is "global" or "local"
EXTRACTORS = {
    "hog": (HogExtractor, HogConfig),
    "sift": (SiftExtractor, SiftConfig),
    "cnn": (CnnExtractor, CnnConfig),  # batched: runs through Beam RunInference
    "delf": (DelfExtractor, DelfConfig),  # batched local features (same-shaped images together)
}


def make_extractor(name: str, params: dict | None = None) -> GlobalExtractor:
    """Build the extractor ``name`` with config fields from ``params`` (unknown fields are an error)."""
    if name not in EXTRACTORS:
        raise KeyError(f"no extractor named {name!r}; known: {sorted(EXTRACTORS)}")
    cls, config_cls = EXTRACTORS[name]
    params = dict(params or {})
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown {name} parameters {unknown}; known: {sorted(known)}")
    return cls(config_cls(**params))
