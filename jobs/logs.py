"""Logging for the CLI: Cairn's steps at INFO, the libraries' chatter only when it matters.

Kept free of heavy imports so that it is configured before Beam or TensorFlow load (Beam warns about
optional Google Cloud clients at import time, which says nothing to a user running locally).
"""

from __future__ import annotations

import logging
import os

_IMPORT_NOISE = ("apitools not found",)


class _DropImportNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_IMPORT_NOISE)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropImportNoise())
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
