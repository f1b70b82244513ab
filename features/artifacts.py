"""Learned artefacts (vocabularies, PCA-whitening, encoders, classifiers) in one safe, documented format.

An artefact is a single ``.npz`` file (numpy's zip of ``.npy`` arrays) read with ``allow_pickle=False``, so
loading one can never run code. Besides its arrays it holds one entry ``__cairn__``: a uint8 array of UTF-8
JSON with

    format     "cairn.artifact"
    version    the format version (1)
    kind       what the file holds, e.g. "vocabulary", "pca_whitening", "bovw", "vlad", "classifier"
    config     the estimator's hyperparameters (its ``__init__`` arguments)
    meta       anything else worth knowing (training sizes, fingerprints of what it was trained on)

so that ``python -c "import numpy; print(numpy.load('x.npz')['__cairn__'].tobytes())"`` tells a person what a
file is. :func:`load` checks the format, version and kind before handing the arrays back.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np

from pipeline import fs
from pipeline.errors import CairnError

FORMAT = "cairn.artifact"
VERSION = 1
_META = "__cairn__"


def save(path: str, kind: str, arrays: dict[str, np.ndarray], config: dict, meta: dict | None = None) -> None:
    """Write ``arrays`` (numeric numpy arrays, no objects) and the JSON header to ``path`` (any Beam filesystem)."""
    header = {"format": FORMAT, "version": VERSION, "kind": kind, "config": config, "meta": meta or {}}
    payload = {}
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype == object:
            raise TypeError(f"artefact array {name!r} has dtype object; only numeric arrays are stored")
        payload[name] = a
    if _META in payload:
        raise ValueError(f"{_META} is reserved")
    payload[_META] = np.frombuffer(json.dumps(header, sort_keys=True, default=str).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    fs.write_bytes(path, buf.getvalue())


def load(path: str, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, header) of an artefact of ``kind``; a clear CairnError for anything else."""
    if not fs.exists(path):
        raise CairnError(f"{path} does not exist; train it first (see `cairn train --help`)")
    try:
        with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # not a zip, truncated, or a pickle inside
        raise CairnError(f"{path} is not a Cairn artefact (.npz without pickles): {e}") from e
    raw = arrays.pop(_META, None)
    if raw is None:
        raise CairnError(f"{path} has no {_META} header; it was not written by Cairn")
    header = _parse_header(path, raw)
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise CairnError(f"{path} is format {header.get('format')} v{header.get('version')}; this Cairn reads "
                         f"{FORMAT} v{VERSION}. Retrain it with this version")
    if header.get("kind") != kind:
        raise CairnError(f"{path} holds a {header.get('kind')!r}, not a {kind!r}")
    return arrays, header


def trained_on(path: str) -> dict:
    """The features (method, config) an artefact was trained on, as its header records (the training jobs save
    it there, so that a copy of the file alone says which features it fits); {} when not recorded."""
    return header(path).get("meta", {}).get("trained_on") or {}


def header(path: str) -> dict:
    """The JSON header of an artefact (its kind, config and meta) without checking the kind."""
    if not fs.exists(path):
        raise CairnError(f"{path} does not exist; train it first (see `cairn train --help`)")
    try:
        with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as z:
            raw = z[_META] if _META in z.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise CairnError(f"{path} is not a Cairn artefact (.npz without pickles): {e}") from e
    if raw is None:
        raise CairnError(f"{path} has no {_META} header; it was not written by Cairn")
    return _parse_header(path, raw)


def _parse_header(path: str, raw: np.ndarray) -> dict:
    try:
        header = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as e:
        raise CairnError(f"{path} has a damaged {_META} header ({e}); retrain it") from e
    if not isinstance(header, dict):
        raise CairnError(f"{path} has a damaged {_META} header; retrain it")
    return header
