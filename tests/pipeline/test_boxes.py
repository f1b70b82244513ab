"""Box files (pipeline/boxes.py): CSV by id, CSV by image path, PASCAL VOC XML, and what cannot be used."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.boxes import read_boxes, scale_boxes, voc_xml
from pipeline.errors import CairnError
from pipeline.manifest import read_manifest


@pytest.fixture()
def manifest(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "m.csv").write_text("id,path,landmark_id\na,img/a.jpg,1\nb,img/b.jpg,2\nc,img/c.jpg,\n")
    return read_manifest(str(tmp_path / "m.csv"))


def test_csv_by_id_scales_to_the_decoded_image_and_lists_unusable_rows(tmp_path, manifest):
    (tmp_path / "boxes.csv").write_text("id,xmin,ymin,xmax,ymax,width,height\n"
                                        "a,10,20,110,220,200,400\n"   # drawn on a 200x400 image
                                        "a,0,0,50,50,200,400\n"       # a second box of the same image
                                        "b,5,5,1,9,,\n"               # inverted: xmax < xmin
                                        "zz,1,1,2,2,10,10\n"          # no such image
                                        "b,x,1,2,2,10,10\n")          # not a number
    found = read_boxes(str(tmp_path / "boxes.csv"), manifest)
    assert set(found.boxes) == {"a"} and len(found.boxes["a"]) == 2
    np.testing.assert_allclose(found.for_image("a", 100, 200), [[5, 10, 55, 110], [0, 0, 25, 25]])
    assert found.for_image("c", 10, 10).shape == (0, 4)
    reasons = [r for _, r in found.problems]
    assert len(reasons) == 3 and any("inverted" in r for r in reasons) and any("'zz'" in r for r in reasons)
    assert any("not a number" in r for r in reasons) and found.problems[0][0].endswith(":4")


def test_csv_by_image_path_relative_to_the_box_file(tmp_path, manifest):
    (tmp_path / "boxes.csv").write_text("image_path,label,xmin,ymin,xmax,ymax,width,height\n"
                                        "img/b.jpg,x,1,2,3,4,10,10\n")
    found = read_boxes(str(tmp_path / "boxes.csv"), manifest)
    np.testing.assert_allclose(found.for_image("b", 20, 10), [[2, 2, 6, 4]])


def test_pascal_voc_folder_one_based_pixels_and_class_filter(tmp_path, manifest):
    voc = tmp_path / "voc"
    voc.mkdir()
    (voc / "a.xml").write_text(voc_xml("a.jpg", 100, 50, [[0, 0, 10, 20]], name="landmark"))
    text = voc_xml("b.jpg", 100, 50, [[5, 5, 15, 25]], name="person")
    (voc / "b.xml").write_text(text)
    (voc / "broken.xml").write_text("<annotation><filename>")
    found = read_boxes(str(voc), manifest, classes=("landmark",))
    assert set(found.boxes) == {"a"}
    np.testing.assert_allclose(found.boxes["a"], [[0, 0, 10, 20]])  # VOC's 1..10 is pixels 0..10
    assert found.sizes["a"] == (100, 50) and any("not XML" in r for _, r in found.problems)
    assert set(read_boxes(str(voc), manifest).boxes) == {"a", "b"}  # no filter: every object


def test_wrong_columns_and_no_match_are_clear_errors(tmp_path, manifest):
    (tmp_path / "bad.csv").write_text("name,x0,y0\na,1,2\n")
    with pytest.raises(CairnError, match="needs id"):
        read_boxes(str(tmp_path / "bad.csv"), manifest)
    (tmp_path / "none.csv").write_text("id,xmin,ymin,xmax,ymax\nq,1,1,2,2\n")
    with pytest.raises(CairnError, match="no box matches"):
        read_boxes(str(tmp_path / "none.csv"), manifest)
    with pytest.raises(CairnError, match="does not exist"):
        read_boxes(str(tmp_path / "missing.csv"), manifest)


def test_scale_boxes_without_a_size_keeps_them():
    np.testing.assert_allclose(scale_boxes([[1, 2, 3, 4]], None, (9, 9)), [[1, 2, 3, 4]])
