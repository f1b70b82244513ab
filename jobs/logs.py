"""Logging for the CLI: Cairn's steps at INFO, the libraries' chatter only when it matters.

Kept free of heavy imports so that it is configured before Beam or TensorFlow load (Beam warns about
optional Google Cloud clients at import time, which says nothing to a user running locally).
"""

from __future__ import annotations

import logging
import os

_IMPORT_NOISE = ("apitools not found",)
# Beam's workers forward their warnings to this process (logger apache_beam.runners.portability.
# local_job_service, "Worker: severity: WARN ... message: ..."); these two say nothing to a user:
_WORKER_NOISE = (
    # Beam 2.77's RunInference imports ``resource`` in one try block with its torch-based ModelManager, so
    # without torch it believes ``resource`` is missing (it only loses a memory metric), once per model load
    "Resource module is not available for current platform",
    # every DirectRunner worker process, once: it concerns cross-language schema registrations Cairn does not use
    "No semi_persistent_directory found",
)


class _DropImportNoise(logging.Filter):
    """Drops the libraries' known-harmless chatter (a handler filter: it also sees the records that loggers
    below the root pass up, which a filter on the root logger itself does not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_IMPORT_NOISE):
            return False
        message = record.getMessage()
        return not any(noise in message for noise in _WORKER_NOISE)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropImportNoise())
    for noisy in ("apache_beam", "absl", "tensorflow", "h5py", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
