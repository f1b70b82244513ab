import subprocess
import sys
import textwrap

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


def test_native_start_up_lines_are_dropped_and_every_other_line_is_kept():
    """TensorFlow's C++ writes its start-up notices to file descriptor 2 (not through Python's logging), once per
    process; the block's other stderr output still reaches the terminal."""
    code = textwrap.dedent("""
        import os, sys
        from pipeline.resources import quiet_native_start_up
        with quiet_native_start_up():
            os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
            os.write(2, b"I0000 00:00:1 port.cc:153] oneDNN custom operations are on. You may see ...\\n")
            os.write(2, b"a real problem\\n")
            print("python's own stderr", file=sys.stderr)
        os.write(2, b"after\\n")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["a real problem", "python's own stderr", "after"]
