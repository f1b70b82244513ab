import cv2
import faiss

from pipeline.resources import limit_threads


def test_limit_threads_caps_opencv_and_faiss():
    before = (cv2.getNumThreads(), faiss.omp_get_max_threads())
    try:
        limit_threads(1)
        assert cv2.getNumThreads() == 1 and faiss.omp_get_max_threads() == 1
        limit_threads(0)  # nonsense values are clamped to one thread, not "all cores"
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before[0])
        faiss.omp_set_num_threads(before[1])
