from apache_beam.options.pipeline_options import DirectOptions, StandardOptions

from pipeline.options import pipeline_options


def test_default_runner_is_direct_never_prism():
    options = pipeline_options([])
    assert options.view_as(StandardOptions).runner == "DirectRunner"


def test_workers_turn_on_multi_processing_and_user_flags_win():
    options = pipeline_options([], workers=3)
    direct = options.view_as(DirectOptions)
    assert direct.direct_num_workers == 3 and direct.direct_running_mode == "multi_processing"
    options = pipeline_options(["--direct_num_workers=1", "--runner=DirectRunner"], workers=3)
    assert options.view_as(DirectOptions).direct_num_workers == 1
    assert pipeline_options(["--runner=DataflowRunner"]).view_as(StandardOptions).runner == "DataflowRunner"


def test_direct_runner_pipelines_never_try_prism():
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    from pipeline.options import make_pipeline

    p = make_pipeline(pipeline_options([], workers=2))
    assert isinstance(p.runner, FnApiRunner)
    assert "direct_num_workers" in str(p.runner._provision_info.provision_info.pipeline_options)


def test_workers_are_capped_by_cores_and_memory_with_a_log_line(monkeypatch, caplog):
    """`--workers 1000` started 550 processes: a request above the cores (or the memory) runs that many, and
    says so; the automatic choice is capped the same way."""
    from pipeline import options, resources

    monkeypatch.setattr(resources.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(resources, "available_memory", lambda: 64 << 30)
    with caplog.at_level("WARNING", logger="pipeline.resources"):
        assert options.resolve_workers(1000, images=10) == 4
    assert "--workers 1000: running 4 worker processes" in caplog.text and "4 cores" in caplog.text
    assert options.resolve_workers(3, images=10) == 3
    assert options.resolve_workers(0, images=10**6) == 4
    monkeypatch.setattr(resources, "available_memory", lambda: int(2.5 * (1 << 30)))  # 2 workers of 1 GiB fit
    assert options.resolve_workers(4, images=10) == 2 and options.resolve_workers(0, images=10**6) == 2
    monkeypatch.setattr(resources, "available_memory", lambda: 100 << 20)
    assert options.resolve_workers(8, images=10) == 1
