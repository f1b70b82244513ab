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
