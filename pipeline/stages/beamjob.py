"""The one setup every Cairn Beam job shares: options, workers, the pipeline, dry runs, old outputs cleared.

    job = beamjob.start(out, beam_args, workers, threads, images=n, test_pipeline=tp,
                        clear=["features-*"], clear_globs=[side + "/dead_letters.csv"])
    ... build the pipeline on job.pipeline, writing under job.out ...
    seconds = job.run()

The order matters and is kept here once: the runner's options are checked (by building the pipeline) before
anything is deleted; a Dataflow dry run writes under a temporary folder instead of OUT (or, with
``dry_run="refuse"``, stops before any work: a job whose later steps need this one's results); the previous
run's outputs and the temporary folders of a killed run are deleted before the new outputs are written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline import fs
from pipeline.errors import DryRun
from pipeline.options import (
    default_threads_per_worker,
    dry_run_output,
    is_dry_run,
    make_pipeline,
    pipeline_options,
    resolve_workers,
    run_and_wait,
    runner_name,
)


@dataclass
class BeamJob:
    """A Beam job being built: its pipeline and where it runs and writes."""

    pipeline: object  # apache_beam.Pipeline (a test pipeline when one was given)
    options: object  # its PipelineOptions
    runner: str  # the runner's name (DirectRunner, DataflowRunner, ...)
    workers: int  # DirectRunner worker processes
    threads: int  # CPU threads each worker gives the numeric libraries
    out: str  # the folder the job writes to (a temporary one for a dry run)
    created: float = field(default_factory=time.perf_counter)  # when start() set it up
    startup: dict = field(default_factory=dict)  # after run(): what the start-up cost (:meth:`run`)

    def run(self) -> float:
        """Run the pipeline to the end; returns its wall seconds. ``startup`` then holds the seconds spent
        building the pipeline before it ran (``build_seconds``: since :func:`start`) and, for a job with
        RunInference, the slowest model load of a worker (``model_load_seconds``, from Beam's
        ``load_model_latency_milli_secs``)."""
        started = time.perf_counter()
        result = run_and_wait(self.pipeline)
        seconds = time.perf_counter() - started
        self.startup = {"build_seconds": round(started - self.created, 3)}
        loads = _model_load_seconds(result)
        if loads is not None:
            self.startup["model_load_seconds"] = loads
        return seconds


def _model_load_seconds(result) -> float | None:
    """The longest model load RunInference reported in ``result``'s metrics (None: none, or a runner that
    reports no metrics)."""
    try:
        from apache_beam.metrics.metric import MetricsFilter

        found = result.metrics().query(MetricsFilter())["distributions"]
    except Exception:  # noqa: BLE001 - a runner without metrics: nothing to report
        return None
    loads = [d.committed.max for d in found if d.key.metric.name.endswith("load_model_latency_milli_secs")
             and d.committed is not None and d.committed.count]
    return round(max(loads) / 1000, 3) if loads else None


def start(out: str, beam_args: list[str] | None = None, workers: int = 0, threads: int = 0, images: int = 0,
          test_pipeline=None, clear: tuple[str, ...] | list[str] = (), clear_globs: tuple[str, ...] | list[str] = (),
          dry_run: str = "redirect", dry_run_message: str = "") -> BeamJob:
    """Set a Beam job up: ``workers`` 0 chooses DirectRunner worker processes for ``images`` inputs
    (pipeline.options.resolve_workers), ``threads`` 0 gives each cores / workers; the pipeline is
    ``test_pipeline`` or one built from ``beam_args``. ``clear``: glob patterns under OUT of the previous run's
    outputs, deleted (with the temporary folders of a killed run) once the options are known to be good;
    ``clear_globs``: whole glob patterns of outputs outside OUT (a features folder's OUT.cairn), deleted with
    their temporary folders only when the job writes to OUT (not on a dry run).
    ``dry_run``: "redirect" writes a dry run's outputs under a temporary folder; "refuse" raises DryRun with
    ``dry_run_message`` ({runner}: the runner's name)."""
    workers = resolve_workers(workers, images)
    threads = threads or default_threads_per_worker(workers)
    options = pipeline_options(list(beam_args or []), workers)
    p = test_pipeline or make_pipeline(options)  # the runner's options are checked before anything is deleted
    if dry_run == "refuse" and is_dry_run(options):
        raise DryRun((dry_run_message or "dry run: the options were validated for --runner={runner}").format(
            runner=runner_name(options)))
    redirected = dry_run_output(out, options)  # a dry run leaves the outputs alone
    clear_globs = clear_globs if redirected == out else ()
    out = redirected
    fs.makedirs(out)
    old = [p for pattern in clear for p in fs.glob(fs.join(fs.escape(out), pattern))]
    fs.delete(old + [p for pattern in clear_globs for p in fs.glob(pattern)])
    for folder in {out, *(fs.dirname(pattern) for pattern in clear_globs)}:
        fs.delete_temp_folders(folder)  # a killed run's unfinished shards
    return BeamJob(p, options, runner_name(options), workers, threads, out)
