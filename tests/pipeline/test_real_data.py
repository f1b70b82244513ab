"""Real photos from ../shared/data/porto: every one decodes."""

import csv

import pytest

from pipeline.images import DecodeConfig, load_image
from pipeline.manifest import read_manifest
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def porto_manifest(tmp_path_factory):
    root = shared_path("data", "porto")
    rows = list(csv.DictReader(open(root / "labels.csv")))
    classes = sorted({r["label"] for r in rows})
    path = tmp_path_factory.mktemp("porto") / "porto.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("id", "path", "landmark_id"))
        for r in rows:
            w.writerow((r["image_path"], root / r["image_path"], classes.index(r["label"])))
    return read_manifest(str(path))


@pytest.mark.shared
def test_every_porto_photo_decodes(porto_manifest):
    assert len(porto_manifest) == 484 and not porto_manifest.dead_letters
    for _, path, _ in porto_manifest.records():
        img = load_image(path, DecodeConfig(max_side=256))
        assert img.ndim == 3 and max(img.shape[:2]) <= 256
