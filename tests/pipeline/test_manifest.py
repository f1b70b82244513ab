import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ManifestError
from pipeline.manifest import class_id, parse_landmark_id, read_manifest
from tests.conftest import write_manifest


def test_csv_paths_resolve_against_the_manifest_folder(tmp_path):
    m = read_manifest(str(write_manifest(tmp_path / "m.csv", [("a", "img/a.jpg", 5), ("b", "/abs/b.jpg", "")])))
    assert m.ids == ["a", "b"]
    assert m.paths == [str(tmp_path / "img" / "a.jpg"), "/abs/b.jpg"]
    assert m.labels == [5, None]
    assert m.dead_letters == [] and m.total_rows == 2


def test_url_column_and_missing_landmark_column(tmp_path):
    m = read_manifest(str(write_manifest(tmp_path / "t.csv", [("q1", "x.jpg")], header="id,url")))
    assert m.labels == [None] and m.paths == [str(tmp_path / "x.jpg")]


def test_bom_crlf_quotes_and_extra_columns(tmp_path):
    text = '\ufeffid,path,landmark_id,extra\r\n"a,1","dir with space/ü.jpg",3,x\r\nb,b.jpg, 4 ,"y,z"\r\n'
    path = tmp_path / "m.csv"
    path.write_bytes(text.encode("utf-8"))
    m = read_manifest(str(path))
    assert m.ids == ["a,1", "b"]
    assert m.paths[0].endswith("dir with space/ü.jpg")
    assert m.labels == [3, 4]


def test_row_problems_become_dead_letters_and_first_id_wins(tmp_path):
    rows = [("a", "a.jpg", 1), ("a", "a2.jpg", 2), ("", "c.jpg", 3), ("d", "", 3), ("e", "e.jpg", "x7"),
            ("f", "f.jpg", -2), ("g", "g.jpg", "2.5"), ("h", "h.jpg", "")]
    m = read_manifest(str(write_manifest(tmp_path / "m.csv", rows)))
    assert m.ids == ["a", "h"] and m.labels == [1, None]
    reasons = {(d.id, d.stage): d.reason for d in m.dead_letters}
    assert len(m.dead_letters) == 6 and m.total_rows == len(rows)
    assert "duplicate id" in reasons[("a", "manifest")] and "m.csv:2" in reasons[("a", "manifest")]
    assert reasons[("", "manifest")] == "empty id"
    assert reasons[("d", "manifest")] == "empty path"
    assert "not an integer" in reasons[("e", "manifest")]
    assert "negative" in reasons[("f", "manifest")]
    assert "not an integer" in reasons[("g", "manifest")]
    assert all(d.path.startswith(str(tmp_path / "m.csv") + ":") for d in m.dead_letters)


@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"), ("id,landmark_id\na,1\n", "needs 'id' and 'path'"), ("path,landmark_id\na.jpg,1\n", "needs 'id'"),
     ("id,path,landmark_id\n", "has no rows")],
)
def test_whole_file_problems_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "m.csv"
    path.write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(str(path))


def test_missing_and_non_utf8_manifests(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.csv"))
    path = tmp_path / "latin1.csv"
    path.write_bytes("id,path\né,a.jpg\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="UTF-8"):
        read_manifest(str(path))


def test_parquet_manifest(tmp_path):
    table = pa.table({"id": ["a", "b", "a"], "path": ["a.jpg", "b.jpg", "c.jpg"], "landmark_id": [1, None, 2]})
    pq.write_table(table, tmp_path / "m.parquet")
    m = read_manifest(str(tmp_path / "m.parquet"))
    assert m.ids == ["a", "b"] and m.labels == [1, None] and len(m.dead_letters) == 1
    assert m.paths[0] == str(tmp_path / "a.jpg")
    pq.write_table(pa.table({"name": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="needs 'id'"):
        read_manifest(str(tmp_path / "bad.parquet"))


def test_folder_tree_with_names_and_with_integer_classes(tmp_path):
    for cls, files in {"tower": ["1.jpg", "2.PNG", "notes.txt"], "bridge": ["3.jpeg"]}.items():
        (tmp_path / "named" / cls).mkdir(parents=True)
        for f in files:
            (tmp_path / "named" / cls / f).write_bytes(b"x")
    m = read_manifest(str(tmp_path / "named"))
    assert sorted(m.ids) == ["bridge/3", "tower/1", "tower/2"]
    assert sorted(m.label_names.values()) == ["bridge", "tower"]
    assert dict(zip(m.ids, m.labels, strict=True))["tower/2"] == class_id("tower")
    for cls in ("17", "4"):
        (tmp_path / "ints" / cls).mkdir(parents=True)
        (tmp_path / "ints" / cls / "a.jpg").write_bytes(b"x")
    m = read_manifest(str(tmp_path / "ints"))
    assert sorted(m.labels) == [4, 17] and m.label_names == {}
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no images found"):
        read_manifest(str(tmp_path / "empty"))


@pytest.mark.parametrize("value, expected", [(None, (None, "")), ("", (None, "")), (" 12 ", (12, "")), (7, (7, "")),
                                             (7.0, (7, "")), (float("nan"), (None, ""))])
def test_parse_landmark_id(value, expected):
    assert parse_landmark_id(value) == expected


def test_named_class_folders_get_the_same_ids_in_every_manifest(tmp_path):
    for tree, classes in (("train", ["alpha", "beta", "gamma"]), ("queries", ["beta", "gamma"])):
        for cls in classes:
            (tmp_path / tree / cls).mkdir(parents=True)
            (tmp_path / tree / cls / "x.jpg").write_bytes(b"x")
    train, queries = read_manifest(str(tmp_path / "train")), read_manifest(str(tmp_path / "queries"))
    by_name = {v: k for k, v in train.label_names.items()}
    assert {v: k for k, v in queries.label_names.items()} == {n: by_name[n] for n in ("beta", "gamma")}
    assert dict(zip(queries.ids, queries.labels, strict=True))["beta/x"] == by_name["beta"]


def test_unbalanced_quote_is_an_error_not_lost_rows(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('id,path,landmark_id\na,"bad/ok.jpg,1\nb,b.jpg,2\nc,c.jpg,3\n')
    with pytest.raises(ManifestError, match="unbalanced double quote"):
        read_manifest(str(path))
    path.write_text("id,path,landmark_id\n\na,a.jpg,1\n\n\nb,b.jpg,2\n\n")  # blank lines are fine
    assert read_manifest(str(path)).ids == ["a", "b"]


def test_odd_cells_do_not_crash(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,path,landmark_id\na,a.jpg,99999999999999999999\nb," + "x" * 200_000 + ",1\n")
    with pytest.raises(ManifestError, match="cannot be parsed"):
        read_manifest(str(path))
    path.write_text("id,path,landmark_id\na,a.jpg,99999999999999999999\n")
    assert "64 bits" in read_manifest(str(path)).dead_letters[0].reason
    pq.write_table(pa.table({"id": ["a"], "path": [7], "landmark_id": ["3"]}), tmp_path / "m.parquet")
    m = read_manifest(str(tmp_path / "m.parquet"))
    assert m.paths == [str(tmp_path / "7")] and m.labels == [3]


def test_folder_names_with_glob_characters(tmp_path):
    (tmp_path / "tree [v1]" / "7").mkdir(parents=True)
    (tmp_path / "tree [v1]" / "7" / "a.jpg").write_bytes(b"x")
    assert read_manifest(str(tmp_path / "tree [v1]")).labels == [7]


def test_changed_images_compares_each_file_with_its_recorded_size_and_mtime(tmp_path):
    """Issue 23 item 2: the stats a job records of its images tell which changed since, one stat per file."""
    import os

    from pipeline.manifest import changed_images

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jpg").write_bytes(b"jpeg" + name.encode())
    manifest = read_manifest(str(write_manifest(tmp_path / "m.csv", [(n, f"{n}.jpg", 1) for n in "abcd"])))
    table = manifest.to_table_with_stats()
    assert table.column("size").to_pylist() == [5, 5, 5, None]  # d.jpg is not there
    assert changed_images(table) == [] and changed_images(manifest.to_table()) is None
    (tmp_path / "a.jpg").write_bytes(b"another jpeg")
    os.utime(tmp_path / "b.jpg", ns=(0, 10**18))
    (tmp_path / "c.jpg").unlink()
    (tmp_path / "d.jpg").write_bytes(b"new")
    assert [i for i, _ in changed_images(table)] == ["a", "b", "c", "d"]


@pytest.mark.parametrize("text", ["6_970", "\u0663", "12\u0663", "\uff17", "+5", "0x1f", "1e3", "\u00b2"])
def test_landmark_ids_are_ascii_digits_only(text):
    """Python's int() reads "6_970" as 6970 and "\u0663" (Arabic-Indic three) as 3: a typo or another script's digit
    must not silently become a landmark; it is a dead letter that says why."""
    label, problem = parse_landmark_id(text)
    assert label is None and "digits 0-9" in problem


def test_landmark_ids_in_other_scripts_are_dead_letters_in_csv_and_parquet(tmp_path):
    rows = [("a", "a.jpg", "6_970"), ("b", "b.jpg", "\u0663"), ("c", "c.jpg", "0042"), ("d", "d.jpg", "-3")]
    m = read_manifest(str(write_manifest(tmp_path / "m.csv", rows)))
    assert m.ids == ["c"] and m.labels == [42]
    reasons = {d.id: d.reason for d in m.dead_letters}
    assert "'6_970' is not an integer" in reasons["a"] and "digits 0-9" in reasons["b"] and "negative" in reasons["d"]
    pq.write_table(pa.table({"id": [r[0] for r in rows], "path": [r[1] for r in rows],
                             "landmark_id": [r[2] for r in rows]}), tmp_path / "m.parquet")
    m = read_manifest(str(tmp_path / "m.parquet"))
    assert m.ids == ["c"] and len(m.dead_letters) == 3


def test_class_folders_named_with_other_digits_are_names_not_ids(tmp_path):
    for cls in ("\u0663", "\u00b2", "7"):  # int("\u00b2") raises although "\u00b2".isdigit() is true
        (tmp_path / "tree" / cls).mkdir(parents=True)
        (tmp_path / "tree" / cls / "a.jpg").write_bytes(b"x")
    m = read_manifest(str(tmp_path / "tree"))
    assert dict(zip(m.ids, m.labels, strict=True))["\u0663/a"] == class_id("\u0663")
    assert m.label_names[class_id("7")] == "7"


@pytest.mark.parametrize("header", ["id,path,landmark_id,landmark_id", "id,path,id", "id,path,Path",
                                    "id,path,notes, notes "])
def test_a_column_named_twice_is_refused(tmp_path, header):
    """csv.DictReader keeps the last of two same-named columns: which landmark_id a row gets would be a guess."""
    n = header.count(",") + 1
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + ",".join(["a", "a.jpg", "1", "2"][:n]) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match="has two columns named"):
        read_manifest(str(path))
    table = pa.table([pa.array(["a"]), pa.array(["a.jpg"]), pa.array([1]), pa.array([2])][:n],
                     names=[c for c in header.split(",")])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="has two columns named"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_empty_extra_header_cells_are_not_duplicates(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("id,path,landmark_id,,\na,a.jpg,1,,\n", encoding="utf-8")  # a spreadsheet's trailing commas
    assert read_manifest(str(path)).labels == [1]
