import pytest

from jobs import common, compare, extract

COMPARE = ["--train", "t.csv", "--queries", "q.csv", "--out", "o"]
EXTRACT = ["--manifest", "m.csv", "--out", "o"]


@pytest.mark.parametrize("build, argv, suggestion", [
    (compare.build_parser, [*COMPARE, "--methd=hog"], "did you mean --methods?"),
    (compare.build_parser, [*COMPARE, "--workrs=2"], "did you mean --workers?"),
    (extract.build_parser, [*EXTRACT, "--methd=hog"], "did you mean --method?"),
    (extract.build_parser, [*EXTRACT, "--direct_num_workrs=2"], "did you mean --direct_num_workers?"),
])
def test_a_mistyped_flag_with_equals_is_an_error_not_a_beam_option(build, argv, suggestion, capsys):
    """--methd=hog used to go to Beam, which dropped it: every method ran."""
    with pytest.raises(SystemExit) as e:
        common.parse_beam_job(build(), argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "neither a flag of this command nor a Beam pipeline option" in err and suggestion in err


def test_beam_pipeline_options_still_go_to_beam():
    beam = ["--runner=DataflowRunner", "--project=p", "--direct_num_workers=2", "--environment_type=LOOPBACK",
            "--experiments=a", "--save_main_session", "--flink_master=flink:8081"]
    args, beam_args = common.parse_beam_job(compare.build_parser(), [*COMPARE, "--workers", "2", *beam])
    assert args.workers == 2 and beam_args == beam


@pytest.mark.parametrize("argv", [["--methods", "hog,sift-bovw"], ["--methods", "hog", "sift-bovw"],
                                  ["--methods", "hog, sift-bovw,"], ["--methods", "hog,", "sift-bovw", "hog"]])
def test_methods_take_commas_as_well_as_spaces(argv):
    """`--methods hog,sift-bovw` failed with "unknown method 'hog,sift-bovw'"."""
    args, _ = common.parse_beam_job(compare.build_parser(), [*COMPARE, *argv])
    assert common.compare_kwargs(args, [])["method_names"] == ["hog", "sift-bovw"]


def test_methods_without_a_name_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_beam_job(compare.build_parser(), [*COMPARE, "--methods", ","])
    assert e.value.code == 2 and "no method name in ','" in capsys.readouterr().err
