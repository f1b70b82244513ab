import csv
import hashlib
from pathlib import Path

import numpy as np

from pipeline import synthetic
from pipeline.synthetic import ImageSpec, SynthConfig, generate, plan, render, views_per_class
from tests.conftest import TINY


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_whatever_the_worker_count(tmp_path):
    config = SynthConfig(seed=3, classes=6, views=12, width=96, height=72, non_landmark_queries=6)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate(str(a), config, workers=1, progress=False)
    generate(str(b), config, workers=2, progress=False)  # > 64 images: the process pool path
    assert _digest(a) == _digest(b)
    generate(str(c), SynthConfig(**{**config.__dict__, "seed": 4}), workers=1, progress=False)
    assert _digest(a)["train.csv"] != _digest(c)["train.csv"]


def test_manifests_follow_the_contract(tiny_synth):
    train = list(csv.DictReader(open(tiny_synth / "train.csv")))
    queries = list(csv.DictReader(open(tiny_synth / "queries.csv")))
    assert list(train[0]) == ["id", "path", "landmark_id"]
    assert len(train) == sum(views_per_class(TINY)) + TINY.non_landmark_train == 20
    assert sum(r["landmark_id"] == "" for r in train) == TINY.non_landmark_train
    assert len(queries) == TINY.classes * TINY.queries_per_class + TINY.non_landmark_queries
    assert sum(q["landmark_id"] == "" for q in queries) == TINY.non_landmark_queries
    assert len({r["id"] for r in train + queries}) == len(train) + len(queries)
    labels = {int(r["landmark_id"]) for r in train if r["landmark_id"]}
    assert len(labels) == TINY.classes and {int(q["landmark_id"]) for q in queries if q["landmark_id"]} == labels
    for r in train + queries:
        assert (tiny_synth / r["path"]).is_file()


def test_long_tail():
    counts = views_per_class(SynthConfig(classes=8, views=20, tail=1.0, min_views=2))
    assert counts == [20, 10, 7, 5, 4, 3, 3, 2]


def test_every_landmark_image_has_a_box_inside_the_image(tiny_synth):
    boxes = {r["id"]: r for r in csv.DictReader(open(tiny_synth / "boxes.csv"))}
    labelled = [r["id"] for f in ("train.csv", "queries.csv") for r in csv.DictReader(open(tiny_synth / f))
                if r["landmark_id"]]
    assert sorted(boxes) == sorted(labelled)
    for b in boxes.values():
        x0, y0, x1, y1, w, h = (int(b[k]) for k in ("xmin", "ymin", "xmax", "ymax", "width", "height"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h and (w, h) == (TINY.width, TINY.height)
        assert (x1 - x0) * (y1 - y0) >= 0.02 * w * h


def test_box_is_exactly_the_landmark_region(monkeypatch):
    """With a plain white square as the structure, no background and no photometric change,
    the box must equal the bounding box of the white pixels."""
    square = np.zeros((synthetic.CANVAS, synthetic.CANVAS, 4), np.uint8)
    square[64:192, 64:192] = 255
    monkeypatch.setattr(synthetic, "_structure", lambda seed, cls: square)
    monkeypatch.setattr(synthetic, "draw_background", lambda rng, w, h: np.zeros((h, w, 3), np.uint8))
    monkeypatch.setattr(synthetic, "_photometric", lambda rng, img: img)
    monkeypatch.setattr(synthetic, "_occlude", lambda rng, img, box: None)
    config = SynthConfig(width=200, height=150)
    for view in range(5):
        img, box = render(0, ImageSpec("train", 0, view), config)
        ys, xs = np.nonzero(img.max(axis=2) > 127)
        assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_non_landmark_queries_have_no_box_and_unknown_structures_are_drawn():
    config = SynthConfig(classes=3, non_landmark_queries=4)
    specs = [s for s in plan(config) if s.split == "queries" and (s.cls < 0 or s.cls >= config.classes)]
    assert len(specs) == 4 and any(s.cls < 0 for s in specs) and any(s.cls >= config.classes for s in specs)
    for s in specs:
        _, box = render(0, s, config)
        assert box is None


def test_views_of_a_class_differ_but_share_the_structure():
    config = SynthConfig()
    a, _ = render(1, ImageSpec("train", 0, 0), config)
    b, _ = render(1, ImageSpec("train", 0, 1), config)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 10
    np.testing.assert_array_equal(synthetic.draw_structure(1, 0), synthetic.draw_structure(1, 0))
    assert not np.array_equal(synthetic.draw_structure(1, 0), synthetic.draw_structure(1, 1))
