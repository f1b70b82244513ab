"""Beam PipelineOptions for Cairn's jobs: the user's Beam flags pass through; the default is DirectRunner.

The default runner is set explicitly to DirectRunner: Beam's newer default (Prism) downloads a binary, which
machines without network cannot do. ``--workers N`` on DirectRunner runs N worker processes
(``direct_running_mode=multi_processing``); on other runners it is ignored in favour of the runner's flags.
"""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

DEFAULT_RUNNER = "DirectRunner"


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
    if runner in ("DirectRunner", "direct", "FnApiRunner", "BundleBasedDirectRunner"):
        direct = options.view_as(DirectOptions)
        if workers > 1 and not any(a.startswith("--direct_num_workers") for a in args):
            direct.direct_num_workers = workers
            direct.direct_running_mode = "multi_processing"
    return options


def runner_name(options: PipelineOptions) -> str:
    return options.view_as(StandardOptions).runner or DEFAULT_RUNNER


def default_threads_per_worker(workers: int) -> int:
    """CPU threads each worker process may use so that ``workers`` processes do not oversubscribe the CPU."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))
