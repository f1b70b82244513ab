"""Exported Keras models with Cairn's metadata: one ``.keras`` file (Keras' own zip format) with ``cairn.json``
added to the archive, loaded in Keras' safe mode (no Python code is deserialised, only Cairn's registered
layers: ``import features.layers`` registers them as ``cairn>Preprocess``, ``cairn>GeM`` and
``cairn>L2Normalize``, and plain ``keras.saving.load_model`` then opens every exported model; models are exported
without their training's loss and optimizer). Embedding models (features/embedding.py), DELF models (features/delf.py) and detectors
(features/detect.py) differ only in their format name and metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile

from pipeline.fs import local_path
from pipeline.resources import quiet_native_start_up

METADATA_MEMBER = "cairn.json"


def save_with_metadata(model, path: str, metadata: dict, what: str = "a model") -> None:
    """Write ``model`` to ``path`` (.keras) with ``metadata`` inside the archive; atomically (temp + rename)."""
    if not path.endswith(".keras"):
        raise ValueError(f"{what} is saved as a .keras file, not {path!r}")
    tmp = path + ".tmp.keras"
    if getattr(model, "compiled", False):  # a trained model's loss (a closure) and optimizer stay behind: plain
        import keras  # keras.saving.load_model could not rebuild them

        model = keras.Model(model.inputs, model.outputs, name=model.name)
    try:
        model.save(tmp)
        with zipfile.ZipFile(tmp, "a") as z:
            z.writestr(METADATA_MEMBER, json.dumps(metadata, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:  # a save that failed part-way (a full disk) leaves nothing that looks like a model
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def read_metadata(path: str, fmt: str, version: int, what: str, hint: str) -> dict:
    """The cairn.json of an exported model of format ``fmt`` (<= ``version``); ValueError naming ``what`` the
    file should be and ``hint`` (how to make one) otherwise."""
    try:
        with zipfile.ZipFile(path) as z:
            metadata = json.loads(z.read(METADATA_MEMBER))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ValueError(f"{path} is not {what} ({type(e).__name__}: {e}); {hint}") from None
    if metadata.get("format") != fmt or int(metadata.get("version", 0)) > version:
        raise ValueError(f"{path}: unsupported model format {metadata.get('format')!r} "
                         f"version {metadata.get('version')} (this Cairn reads {fmt} <= {version})")
    return metadata


def load_with_metadata(path: str, fmt: str, version: int, what: str, hint: str):
    """(keras.Model, metadata) of an exported model, loaded in Keras' safe mode."""
    path = local_path(path)  # a model on gs:// etc.: downloaded once per worker process
    metadata = read_metadata(path, fmt, version, what, hint)
    with quiet_native_start_up():  # TensorFlow's start-up lines
        import keras

        import features.layers  # noqa: F401 - registers Cairn's layers for deserialisation

        return keras.saving.load_model(path, compile=False, safe_mode=True), metadata
