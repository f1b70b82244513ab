import json

import cv2
import numpy as np
import pytest

from features.local import local_features_from_table, local_features_table
from features.sift import SiftConfig, SiftExtractor, prepare_descriptors, rootsift
from pipeline.schemas import cairn_metadata


def textured(width: int = 320, height: int = 240, seed: int = 0, shapes: int = 150) -> np.ndarray:
    """[height, width, 3] uint8 RGB: seeded random filled rectangles and circles on grey (corners, blobs)."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 128, np.uint8)
    for _ in range(shapes):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        if rng.random() < 0.5:
            w, h = (int(v) for v in rng.integers(8, width // 4, 2))
            cv2.rectangle(img, (x, y), (x + w, y + h), colour, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(4, height // 6)), colour, -1)
    return img


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return textured()


def unit(i: int, value: float = 1.0) -> np.ndarray:
    row = np.zeros(128, np.float32)
    row[i] = value
    return row


# --- RootSIFT on hand-built rows ---


def test_rootsift_known_rows():
    rows = np.zeros((4, 128), np.float32)
    rows[0, 0] = 4  # L1 -> [1, 0, ...], sqrt -> same
    rows[1, :4] = 1  # L1 -> 0.25 each, sqrt -> 0.5 each
    rows[2, [3, 7]] = [1, 3]  # L1 -> [0.25, 0.75], sqrt -> [0.5, sqrt(0.75)]
    out = rootsift(rows)
    assert out.dtype == np.float32 and out.shape == (4, 128)
    np.testing.assert_array_equal(out[0], unit(0))
    np.testing.assert_allclose(out[1, :4], 0.5, rtol=1e-6)
    assert not np.any(out[1, 4:])
    np.testing.assert_allclose(out[2, [3, 7]], [0.5, np.sqrt(0.75)], rtol=1e-6)
    assert not np.any(out[3]) and np.all(np.isfinite(out))  # the zero row stays zero, no NaN
    np.testing.assert_allclose(np.linalg.norm(out[:3], axis=1), 1.0, rtol=1e-6)


def test_rootsift_accepts_uint8_and_gives_the_same_as_float():
    rows = np.random.default_rng(0).integers(0, 256, (5, 128)).astype(np.uint8)
    np.testing.assert_array_equal(rootsift(rows), rootsift(rows.astype(np.float32)))


def test_rootsift_inner_product_is_the_hellinger_kernel():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 256, (2, 128)).astype(np.float32)
    a_l1, b_l1 = a / a.sum(), b / b.sum()
    expected = np.sum(np.sqrt(a_l1 * b_l1))
    ra, rb = rootsift(np.stack([a, b]))
    assert ra @ rb == pytest.approx(expected, rel=1e-5)
    assert ra @ ra == pytest.approx(1.0, rel=1e-6)


def test_rootsift_of_empty_is_empty():
    assert rootsift(np.zeros((0, 128), np.uint8)).shape == (0, 128)


# --- config ---


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"dtype": "float16"}, "dtype"),
        ({"max_features": 0}, "max_features"),
        ({"max_side": -1}, "max_side"),
        ({"sigma": 0.0}, "sigma"),
        ({"edge_threshold": 0.0}, "edge_threshold"),
        ({"contrast_threshold": -0.1}, "contrast_threshold"),
        ({"n_octave_layers": 0}, "n_octave_layers"),
        ({"max_features": 2**40}, "max_features must be between 1 and 100,000"),  # OpenCV: not a C int
        ({"max_side": 1}, "at least 32"),  # a 1-pixel image: no keypoints, silently
        ({"n_octave_layers": 1000}, "n_octave_layers must be between 1 and 10"),  # no keypoints, silently
        ({"sigma": float("nan")}, "finite"),
        ({"edge_threshold": float("inf")}, "finite"),
        ({"contrast_threshold": float("inf")}, "finite"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SiftConfig(**kwargs)


# --- extraction ---


def test_extract_shapes_and_types(image):
    f = SiftExtractor().extract(image)
    assert 50 < len(f) <= 1000  # 320x240, 150 shapes: 111 keypoints observed
    f.validate(128)
    assert (f.width, f.height) == (320, 240)
    assert f.keypoints.dtype == f.scales.dtype == f.orientations.dtype == f.scores.dtype == np.float32
    assert f.descriptors.dtype == np.uint8
    assert np.all(np.diff(f.scores) <= 0)  # strongest first
    assert np.all((f.orientations >= 0) & (f.orientations < 360))
    assert np.all(f.scales > 0)
    assert np.all((f.keypoints >= -0.5) & (f.keypoints <= [319.5, 239.5]))


def test_cap_keeps_the_strongest_responses(image):
    full = SiftExtractor(SiftConfig(max_features=100_000)).extract(image)
    # One location with several orientations gives equal responses; include a cap that cuts through such a tie
    # (OpenCV's own nfeatures keeps the whole tie, so its output would be one keypoint too long).
    tie = next(c for c in range(2, len(full)) if full.scores[c - 1] == full.scores[c])
    for cap in (10, 50, tie):
        capped = SiftExtractor(SiftConfig(max_features=cap)).extract(image)
        assert len(full) > cap and len(capped) == cap
        # the top-cap responses are kept; keypoints strictly above the boundary response are identical
        np.testing.assert_array_equal(capped.scores, full.scores[:cap])
        boundary = full.scores[cap - 1]

        def above(f, boundary=boundary):
            keep = f.scores > boundary
            rows = np.column_stack([f.keypoints[keep], f.orientations[keep], f.scores[keep]])
            order = np.lexsort(rows.T[::-1])
            return rows[order], f.descriptors[keep][order]

        (rows_c, desc_c), (rows_f, desc_f) = above(capped), above(full)
        assert len(rows_c) >= cap - 2
        np.testing.assert_array_equal(rows_c, rows_f)
        np.testing.assert_array_equal(desc_c, desc_f)


def test_max_side_maps_keypoints_back_to_the_input_image(image):
    """A 2x nearest-neighbour upscale shrunk back by INTER_AREA is the original image, so SIFT sees the same
    pixels; its keypoints must come back at x_big = 2 * x + 0.5 (pixel centres at integers)."""
    big = cv2.resize(image, (640, 480), interpolation=cv2.INTER_NEAREST)
    small_f = SiftExtractor(SiftConfig(max_side=320)).extract(image)
    big_f = SiftExtractor(SiftConfig(max_side=320)).extract(big)
    assert (big_f.width, big_f.height) == (640, 480) and len(big_f) == len(small_f) > 0
    np.testing.assert_allclose(big_f.keypoints, 2 * small_f.keypoints + 0.5, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(big_f.scales, 2 * small_f.scales, rtol=1e-6)
    np.testing.assert_array_equal(big_f.descriptors, small_f.descriptors)
    np.testing.assert_array_equal(big_f.orientations, small_f.orientations)


def test_max_side_zero_keeps_the_size(image):
    big = cv2.resize(image, (640, 480), interpolation=cv2.INTER_NEAREST)
    kept = SiftExtractor(SiftConfig(max_side=0)).extract(big)
    shrunk = SiftExtractor(SiftConfig(max_side=320)).extract(big)
    assert len(kept) != len(shrunk)  # detection really ran on another image
    assert kept.keypoints[:, 0].max() > 320


def test_uint8_storage_is_lossless(image):
    raw8 = SiftExtractor(SiftConfig(root=False, dtype="uint8")).extract(image)
    raw32 = SiftExtractor(SiftConfig(root=False, dtype="float32")).extract(image)
    assert raw8.descriptors.dtype == np.uint8 and raw32.descriptors.dtype == np.float32
    np.testing.assert_array_equal(raw8.descriptors.astype(np.float32), raw32.descriptors)
    np.testing.assert_array_equal(raw8.keypoints, raw32.keypoints)
    # ... and RootSIFT applied on use equals RootSIFT stored as float32
    root32 = SiftExtractor(SiftConfig(dtype="float32")).extract(image)
    ext8 = SiftExtractor(SiftConfig(dtype="uint8"))
    np.testing.assert_array_equal(ext8.prepare(ext8.extract(image).descriptors), root32.descriptors)


def test_flat_image_gives_a_valid_empty_result():
    for img in (np.full((120, 160, 3), 77, np.uint8), np.zeros((1, 1, 3), np.uint8)):
        for dtype in ("uint8", "float32"):
            f = SiftExtractor(SiftConfig(dtype=dtype)).extract(img)
            assert len(f) == 0 and (f.width, f.height) == img.shape[1::-1]
            assert f.descriptors.shape == (0, 128) and f.descriptors.dtype == np.dtype(dtype)
            f.validate(128)


def test_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        SiftExtractor().extract(np.zeros((10, 10, 4), np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        SiftExtractor().extract(np.zeros((10, 10, 3), np.float32))


def test_prepare_gives_unit_norm_float32(image):
    for config in (SiftConfig(), SiftConfig(dtype="float32")):
        ext = SiftExtractor(config)
        x = ext.prepare(ext.extract(image).descriptors)
        assert x.dtype == np.float32 and x.shape[1] == 128 and len(x) > 0
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)


def test_prepare_descriptors_follows_the_metadata():
    stored = np.stack([unit(0, 4.0), unit(1, 9.0)]).astype(np.uint8)
    rooted = prepare_descriptors(stored, {"postprocess": "rootsift"})
    np.testing.assert_array_equal(rooted, [unit(0), unit(1)])
    as_is = prepare_descriptors(stored, {"postprocess": "none"})
    assert as_is.dtype == np.float32
    np.testing.assert_array_equal(as_is, stored)
    np.testing.assert_array_equal(prepare_descriptors(stored, {}), stored)


def test_metadata_and_postprocess():
    for config, post in [
        (SiftConfig(), "rootsift"),
        (SiftConfig(root=False), "none"),
        (SiftConfig(dtype="float32"), "none"),
        (SiftConfig(dtype="float32", root=False), "none"),
    ]:
        meta = SiftExtractor(config).metadata()
        assert json.loads(json.dumps(meta)) == meta
        assert meta["method"] == "sift" and meta["dim"] == 128 and meta["dtype"] == config.dtype
        assert meta["postprocess"] == post and meta["config"]["max_features"] == config.max_features
        assert SiftConfig(**meta["config"]) == config


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_round_trip_through_the_local_features_table(image, dtype):
    ext = SiftExtractor(SiftConfig(dtype=dtype, max_features=200))
    flat = np.full((50, 60, 3), 9, np.uint8)
    feats = [ext.extract(image), ext.extract(flat), ext.extract(textured(seed=3))]
    schema = ext.schema()
    meta = cairn_metadata(schema)
    assert meta["postprocess"] == ext.metadata()["postprocess"] and meta["dim"] == 128
    table = local_features_table(["a", "flat", "c"], [1, None, 2], feats, schema)
    assert table.schema.equals(schema, check_metadata=True)
    back = local_features_from_table(table)
    assert [len(f) for f in back] == [len(f) for f in feats] and len(back[1]) == 0
    for got, want in zip(back, feats, strict=True):
        for name in ("keypoints", "scales", "orientations", "scores", "descriptors"):
            assert getattr(got, name).dtype == getattr(want, name).dtype
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
        assert (got.width, got.height) == (want.width, want.height)
    # a reader that only has the file's metadata prepares the same descriptors as the extractor
    from_file = prepare_descriptors(back[0].descriptors, meta)
    np.testing.assert_array_equal(from_file, ext.prepare(feats[0].descriptors))
