"""Beam PipelineOptions for Cairn's jobs: the user's Beam flags pass through; the default is DirectRunner.

The default runner is set explicitly to DirectRunner. Beam 2.77's DirectRunner first tries the Prism runner,
which downloads a binary from the internet (and, offline, fails and falls back); :func:`make_pipeline`
therefore runs DirectRunner pipelines on Beam's FnApiRunner directly, which is what DirectRunner falls back to
for batch pipelines: same semantics, no download, and it honours ``direct_num_workers`` and
``direct_running_mode``. ``--workers N`` on DirectRunner runs N worker processes
(``direct_running_mode=multi_processing``), started as ``python -m pipeline.worker PID`` so that they end
when the job's process ends (pipeline/worker.py); other runners ignore it in favour of their own flags.

Only Beam's pipeline options (:func:`beam_flags`) pass through to Beam; the commands refuse any other flag.
"""

from __future__ import annotations

import contextlib
import os

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipeline import worker
from pipeline.errors import CairnError, DryRun
from pipeline.resources import cap_workers, max_workers

DEFAULT_RUNNER = "DirectRunner"
LOCAL_RUNNERS = ("DirectRunner", "direct", "SwitchingDirectRunner", "FnApiRunner")


AUTO_WORKERS_MIN_IMAGES = 1000  # below this, worker processes cost more to start than they save
_SIZE_FACTOR = [1.0]  # `cairn plan`'s samples decide as the whole run would (worker processes, whether to PCA)


def resolve_workers(workers: int, images: int) -> int:
    """0 = automatic: one process per core (as many as :func:`max_workers`) when there is enough work to pay for
    their start-up; a number is capped by :func:`cap_workers`."""
    if workers <= 0:
        return max_workers()[0] if images * size_factor() >= AUTO_WORKERS_MIN_IMAGES else 1
    return cap_workers(workers)


def size_factor() -> float:
    """How many times more images the run being sampled has than the job sees (1 outside `sized_as`)."""
    return _SIZE_FACTOR[-1]


@contextlib.contextmanager
def sized_as(factor: float):
    """Inside the block, the decisions that depend on the number of images are taken for ``factor`` times the
    images a job sees: a sample of a corpus then runs each stage in-process or on worker processes, and learns a
    PCA or keeps the raw descriptor (pipeline/stages/train.py, whitening_dim), as the whole corpus would."""
    _SIZE_FACTOR.append(float(factor))
    try:
        yield
    finally:
        _SIZE_FACTOR.pop()


def beam_flags() -> frozenset[str]:
    """Every flag Beam's registered PipelineOptions classes define (``--runner``, ``--direct_num_workers``,
    ``--project``, ...): the flags Beam itself parses. Any other flag Beam would drop with a warning."""
    flags: set[str] = set()

    def collect(parser) -> None:  # Beam's own parser, after every options class added its flags
        flags.update(s for action in parser._actions for s in action.option_strings if s.startswith("--"))

    PipelineOptions([]).get_all_options(add_extra_args_fn=collect)
    return frozenset(flags)


def pipeline_options(beam_args: list[str], workers: int = 1) -> PipelineOptions:
    """PipelineOptions from the leftover (non-Cairn) arguments of a job."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        # worker processes log every connection at INFO; keep the user's terminal readable
        args.append("--default_sdk_harness_log_level=WARNING")
    if not any(a.startswith("--sdk_harness_log_level_overrides") for a in args):
        # start-up chatter of the worker processes that says nothing to a user
        args.append('--sdk_harness_log_level_overrides={"__main__": "ERROR", '
                    '"apache_beam.options.pipeline_options": "ERROR"}')
    options = PipelineOptions(args)
    runner = options.view_as(StandardOptions).runner or DEFAULT_RUNNER
    _check_dry_run(options, runner)
    if runner not in LOCAL_RUNNERS:
        package_for_workers(options)
    else:
        direct = options.view_as(DirectOptions)
        if workers > 1 and not any(a.startswith("--direct_num_workers") for a in args):
            direct.direct_num_workers = workers
            direct.direct_running_mode = "multi_processing"
    return options


PACKAGING_FLAGS = ("setup_file", "extra_packages", "sdk_container_image")
SETUP_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def package_for_workers(options: PipelineOptions) -> None:
    """Make sure a cluster's workers get Cairn: unless the user packaged it (``--setup_file``,
    ``--extra_package`` (a wheel) or ``--sdk_container_image`` (an image with Cairn installed)), Cairn's own
    setup.py is staged (``--setup_file``): each worker builds and installs Cairn with its dependencies.

    LOOPBACK workers run in this process and an EXTERNAL worker pool has its own environment: neither gets
    anything staged. An installed Cairn without its source tree has no setup.py to stage: then the user must say
    how workers get it."""
    from apache_beam.options.pipeline_options import PortableOptions, SetupOptions

    given = options.get_all_options(drop_default=True)
    if any(given.get(flag) for flag in PACKAGING_FLAGS):
        return
    if (options.view_as(PortableOptions).environment_type or "").upper() in ("LOOPBACK", "EXTERNAL"):
        return  # LOOPBACK workers are this process; an EXTERNAL worker pool brings its own environment
    if not os.path.isfile(SETUP_FILE):
        raise CairnError("the workers need Cairn: build a wheel (`pip wheel --no-deps -w dist .` in Cairn's source "
                         "tree) and pass --extra_package=dist/cairn-0.1.0-py3-none-any.whl, or "
                         "--sdk_container_image=IMAGE with Cairn installed, or --setup_file=PATH/setup.py")
    options.view_as(SetupOptions).setup_file = SETUP_FILE


def runner_name(options: PipelineOptions) -> str:
    return options.view_as(StandardOptions).runner or DEFAULT_RUNNER


def default_threads_per_worker(workers: int) -> int:
    """CPU threads each worker process may use so that ``workers`` processes do not oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def make_pipeline(options: PipelineOptions) -> beam.Pipeline:
    """A Pipeline for ``options``; DirectRunner pipelines run on FnApiRunner (no Prism download)."""
    if runner_name(options) not in LOCAL_RUNNERS:
        try:
            return beam.Pipeline(options=options)
        except ValueError as e:  # an unknown runner name, or a runner's options incomplete

            if "validation" in str(e).lower():
                raise CairnError(f"--runner={runner_name(options)} needs more options: {e} (give them as Beam "
                                 "flags, e.g. --project=P --region=R --temp_location=gs://BUCKET/tmp)") from e
            raise CairnError(f"{e}; use --runner=DirectRunner (default), DataflowRunner, FlinkRunner or "
                             "SparkRunner") from e
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    # as DirectRunner does: worker processes receive the pipeline options through the provision info
    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    return beam.Pipeline(runner=_local_runner(fn_runner.FnApiRunner)(provision_info=info), options=options)


BEAM_WORKER_MODULE = b"-m apache_beam.runners.worker.sdk_worker_main"  # how FnApiRunner starts worker processes


def _local_runner(base):
    """FnApiRunner whose worker processes (``direct_running_mode=multi_processing``) end when this process
    ends (pipeline/worker.py): killed, Beam's own would wait for minutes."""
    from apache_beam.portability import python_urns

    class LocalRunner(base):
        def run_via_runner_api(self, pipeline_proto, options):
            for env in pipeline_proto.components.environments.values():
                if env.urn == python_urns.SUBPROCESS_SDK and env.payload.rstrip().endswith(BEAM_WORKER_MODULE):
                    env.payload = worker.command().encode()
            return super().run_via_runner_api(pipeline_proto, options)

    return LocalRunner


def _check_dry_run(options: PipelineOptions, runner: str) -> None:
    """Beam's --dry_run takes any string (so "false" would be true): read it as a yes/no, for DataflowRunner."""
    from apache_beam.options.pipeline_options import TestOptions

    test = options.view_as(TestOptions)
    value = test.dry_run
    if value in (None, False):
        return
    text = str(value).strip().lower()
    if text in ("false", "0", "no", "off", ""):
        test.dry_run = False
        return
    if text not in ("true", "1", "yes", "on"):
        raise CairnError(f"--dry_run={value}: use true or false")
    if runner != "DataflowRunner":
        raise CairnError(f"--dry_run is DataflowRunner's (it translates and validates a job without submitting it); "
                         f"--runner={runner} would run the job")
    test.dry_run = True


def is_dry_run(options: PipelineOptions) -> bool:
    from apache_beam.options.pipeline_options import TestOptions

    return options.view_as(TestOptions).dry_run is True


def dry_run_output(out: str, options: PipelineOptions) -> str:
    """Where a job writes: ``out``, or on a dry run a new local temporary folder, so that a dry run neither
    touches the user's outputs nor needs access to them."""
    if not is_dry_run(options):
        return out
    import tempfile

    return tempfile.mkdtemp(prefix="cairn-dry-run-")


def run_and_wait(p: beam.Pipeline):
    """Run ``p`` to the end; returns its result. After a dry run raises :class:`DryRun`."""
    result = p.run()
    if is_dry_run(p.options):
        raise DryRun(f"dry run: the pipeline was built and validated for --runner={runner_name(p.options)} and not "
                     "submitted; drop --dry_run to run it")
    result.wait_until_finish()
    return result
