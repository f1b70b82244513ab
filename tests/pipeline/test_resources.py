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


def test_large_buffers_stay_in_the_heap_on_glibc():
    import platform

    from pipeline.resources import keep_large_buffers

    result = keep_large_buffers()
    assert isinstance(result, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert result  # mallopt accepted both settings
