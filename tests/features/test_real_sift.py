"""SIFT + spatial verification on real photos from ../shared/data/porto (skipped where it is absent)."""

import csv

import numpy as np
import pytest

from features.sift import SiftExtractor
from features.verify import VerifyConfig, verify
from pipeline.images import DecodeConfig, load_image
from tests.conftest import shared_path


@pytest.mark.shared
def test_sift_on_porto_photos_and_verification_prefers_the_same_landmark():
    root = shared_path("data", "porto")
    rows = list(csv.DictReader(open(root / "labels.csv")))
    by_label: dict[str, list[str]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r["image_path"])
    labels = sorted(by_label)
    extractor = SiftExtractor()
    # the first two photos of two landmarks
    feats = {(lab, i): extractor.extract(load_image(str(root / by_label[lab][i]), DecodeConfig()))
             for lab in labels[:2] for i in range(4)}
    for f in feats.values():
        assert 50 <= len(f) <= 1000  # capped by response at max_features
        assert np.all((f.keypoints >= 0) & (f.keypoints <= [f.width, f.height]))
    prepare = extractor.prepare
    config = VerifyConfig()

    def inliers(a, b):
        return verify(feats[a], feats[b], config, prepare(feats[a].descriptors), prepare(feats[b].descriptors)).inliers

    keys = sorted(feats)
    pairs = [(x, y) for i, x in enumerate(keys) for y in keys[i + 1:]]
    same = [inliers(x, y) for x, y in pairs if x[0] == y[0]]
    different = [inliers(x, y) for x, y in pairs if x[0] != y[0]]
    # photos of one landmark may show different sides, and RANSAC finds a few chance inliers between any two
    # photos, so compare the distributions. Observed on 2026-11-21 (4 photos each of arrabida and the next
    # landmark): same-landmark inliers 4..55 (mean 13), cross-landmark 4..11 (mean 5.4)
    assert max(same) > 2 * max(different) and np.mean(same) > 1.5 * np.mean(different), (same, different)
