"""Per-worker resources: thread limits for OpenCV, FAISS and TensorFlow.

Called from DoFn.setup() (once per worker process), never at import time. Limits apply to the libraries
already imported or importable without cost; TensorFlow is only configured if the worker has imported it,
because importing it just to set threads costs seconds.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def limit_threads(threads: int) -> None:
    """Cap the CPU threads of OpenCV, FAISS (OpenMP), BLAS and TensorFlow in this process."""
    threads = max(1, int(threads))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)  # read by libraries loaded after this point
    import cv2

    cv2.setNumThreads(threads)
    if "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(threads)
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, threads // 2))
        except RuntimeError:  # TF already initialised its thread pools in this process
            log.debug("TensorFlow threads already fixed in this process")
