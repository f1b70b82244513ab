import numpy as np
import pytest

from pipeline.errors import CairnError
from pipeline.submission import read_submission, write_submission


def test_round_trip_in_the_google_landmark_format(tmp_path):
    path = str(tmp_path / "p.csv")
    write_submission(path, ["q1", "q2", "q,3"], np.array([12, -1, 7]), np.array([0.5, 0.0, 0.25], np.float32))
    text = open(path).read()
    assert text.splitlines() == ["id,landmarks", "q1,12 0.500000", "q2,", '"q,3",7 0.250000']
    assert read_submission(path) == {"q1": (12, 0.5), "q2": None, "q,3": (7, 0.25)}


def test_bad_submissions_are_clear_errors(tmp_path):
    (tmp_path / "a.csv").write_text("id,label\nq,1\n")
    with pytest.raises(CairnError, match="id,landmarks"):
        read_submission(str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("id,landmarks\nq,abc\n")
    with pytest.raises(CairnError, match="bad landmarks cell"):
        read_submission(str(tmp_path / "b.csv"))
