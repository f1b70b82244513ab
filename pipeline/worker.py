"""DirectRunner's worker processes (``--workers N``): Beam's SDK harness, ending when the process that started
it ends.

Beam starts each worker as ``python -m apache_beam.runners.worker.sdk_worker_main``; when the `cairn` process
is killed (kill -9, the OOM killer) such a worker waits on its gRPC channel for minutes. Cairn's pipelines
(pipeline.options.make_pipeline) start ``python -m pipeline.worker PID`` instead: the same harness, with a
watchdog thread that ends the worker once process PID is gone.
"""

from __future__ import annotations

import os
import sys
import threading
import time

POLL_SECONDS = 0.5  # how often a worker checks that its job's process is still there


def process_identity(pid: int) -> str | None:
    """Something that tells process ``pid`` from a later one given the same pid: its start time (Linux), or ""
    where /proc is missing; None when there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # there, but another user's
            return ""
        return ""
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (command name) "
    return None if fields[0] in ("Z", "X") else fields[19]  # state; starttime (stat's 22nd field)


def watch_parent(pid: int, poll: float = POLL_SECONDS) -> threading.Thread:
    """Start a daemon thread that ends this process (exit status 1) once process ``pid`` is gone."""
    identity = process_identity(pid)

    def watch() -> None:
        while identity is not None and process_identity(pid) == identity:
            time.sleep(poll)
        os._exit(1)  # the harness's gRPC threads would keep a normal exit waiting

    thread = threading.Thread(target=watch, name="cairn-parent-watchdog", daemon=True)
    thread.start()
    return thread


def command(pid: int | None = None) -> str:
    """The shell command line that starts a worker watching process ``pid`` (default: this one)."""
    import shlex

    return f"{shlex.quote(sys.executable)} -m pipeline.worker {os.getpid() if pid is None else int(pid)}"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        watch_parent(int(argv[1]))
    from apache_beam.runners.worker import sdk_worker_main

    sdk_worker_main.main(argv)


if __name__ == "__main__":
    main(sys.argv)
