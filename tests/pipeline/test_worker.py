import os
import subprocess
import sys
import time

from pipeline.worker import command, process_identity

# a job whose two worker processes sleep in their first element for ten minutes
JOB = """
import time
import apache_beam as beam
from pipeline.options import make_pipeline, pipeline_options

p = make_pipeline(pipeline_options([], workers=2))
_ = p | beam.Create(range(8)) | beam.Reshuffle() | beam.Map(lambda x: time.sleep(600))
p.run().wait_until_finish()
"""


def _workers_of(pid: int) -> list[int]:
    """The Beam worker processes among the descendants of process ``pid``."""
    parent, cmdline = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline[int(entry)] = f.read()
            except OSError:
                continue
            parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])

    def descends(p: int) -> bool:
        while p > 1:
            p = parent.get(p, 0)
            if p == pid:
                return True
        return False

    return [p for p, argv in cmdline.items() if descends(p) and
            (b"pipeline.worker" in argv or b"sdk_worker_main" in argv) and not argv.startswith(b"/bin/sh")]


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_workers_end_when_the_job_process_is_killed():
    """kill -9 of the `cairn` process used to leave its DirectRunner worker processes waiting for minutes."""
    job = subprocess.Popen([sys.executable, "-c", JOB], env={**os.environ, "PYTHONPATH": os.getcwd()},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for(lambda: len(_workers_of(job.pid)) == 2, 120), "the job started no worker processes"
        workers = _workers_of(job.pid)
    finally:
        job.kill()
        job.wait()
    # generous: a worker checks twice a second (Beam's own waited minutes)
    assert _wait_for(lambda: all(process_identity(w) is None for w in workers), 60), workers


def test_process_identity_tells_the_living_from_the_gone():
    assert process_identity(os.getpid()) is not None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_identity(child.pid) is None
    assert command(123).endswith("-m pipeline.worker 123")
