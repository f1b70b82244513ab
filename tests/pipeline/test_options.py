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
