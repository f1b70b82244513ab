import numpy as np
import pytest

from features.delf import (
    AttentionPooling,
    DelfConfig,
    DelfExtractor,
    ReceptiveField,
    build_delf_model,
    receptive_field,
    resize_long_side,
    save_delf_model,
    select_top,
)
from features.local import LocalFeatures
from features.verify import VerifyConfig, verify


def _stack():
    """conv 3x3 stride 1 'same' -> conv 3x3 stride 2 'valid' -> average pool 2x2 stride 2, all-ones kernels."""
    import keras

    x = keras.Input((None, None, 1))
    y = keras.layers.Conv2D(1, 3, padding="same", use_bias=False, kernel_initializer="ones", name="c1")(x)
    y = keras.layers.Conv2D(1, 3, strides=2, use_bias=False, kernel_initializer="ones", name="c2")(y)
    y = keras.layers.AveragePooling2D(2, name="pool")(y)
    return keras.Model(x, y)


def test_receptive_field_of_a_known_stack_hand_computed():
    # by hand, per axis (size r, stride j, centre of cell 0 s), from the input (1, 1, 0):
    #   c1 (k 3, s 1, 'same' pads 1 before): r = 1 + 2 = 3, j = 1, s = 0 + (1 - 1) * 1 = 0
    #   c2 (k 3, s 2, 'valid'):              r = 3 + 2 = 5, j = 2, s = 0 + (1 - 0) * 1 = 1
    #   pool (k 2, s 2):                     r = 5 + 1 * 2 = 7, j = 4, s = 1 + 0.5 * 2 = 2
    ry, rx = receptive_field(_stack(), "pool")
    assert ry == rx == ReceptiveField(7.0, 4.0, 2.0)
    assert list(rx.centres(3)) == [2.0, 6.0, 10.0]


def test_receptive_field_matches_the_gradient_support_of_a_cell():
    import tensorflow as tf

    model = _stack()
    x = tf.Variable(np.zeros((1, 40, 40, 1), np.float32))
    with tf.GradientTape() as tape:
        y = model(x)[0, 4, 3, 0]  # an interior cell: row 4, column 3
    grad = np.abs(tape.gradient(y, x).numpy()[0, :, :, 0])
    rows, cols = np.nonzero(grad.sum(axis=1))[0], np.nonzero(grad.sum(axis=0))[0]
    ry, rx = receptive_field(model, "pool")
    assert (rows.min() + rows.max()) / 2 == ry.start + 4 * ry.stride and rows.max() - rows.min() + 1 == ry.size
    assert (cols.min() + cols.max()) / 2 == rx.start + 3 * rx.stride and cols.max() - cols.min() + 1 == rx.size


@pytest.mark.slow
def test_receptive_field_of_resnet50_conv4_is_the_papers():
    import keras

    net = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    ry, rx = receptive_field(net, "conv4_block6_out")
    # DELF's code for ResNet50 conv4: receptive field 291, stride 16, padding 145 (centre of cell x at 16 x)
    assert rx.size == 291 and rx.stride == 16 and rx.start == 0 and ry == rx


def test_select_top_keeps_the_highest_scores_above_the_threshold():
    scores = np.array([0.5, 2.0, 0.1, 2.0, 1.5, 0.3], np.float32)
    assert list(select_top(scores, 3)) == [1, 3, 4]  # ties keep the lower index first
    assert list(select_top(scores, 10, threshold=0.4)) == [1, 3, 4, 0]
    assert list(select_top(scores, 10, threshold=5.0)) == []


def test_resize_long_side_keeps_the_aspect_in_multiples_of_16():
    img = np.zeros((300, 500, 3), np.uint8)
    out = resize_long_side(img, 256)
    assert out.shape == (160, 256, 3)  # 300 * 256 / 500 = 153.6 -> 160
    assert resize_long_side(np.zeros((160, 256, 3), np.uint8), 256).shape == (160, 256, 3)


def test_attention_pooling_is_the_score_weighted_sum_normalised():
    pool = AttentionPooling(2)
    out = pool.transform([np.array([[1, 0], [0, 1]], np.float32), np.zeros((0, 2), np.float32)],
                         [np.array([3.0, 4.0]), np.zeros(0)])
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-6)  # (3, 4) / 5


@pytest.fixture(scope="module")
def tiny_delf(tmp_path_factory):
    """A random-weight DELF model on MobileNetV2 (exported with its metadata) and a PCA of its features."""
    import dataclasses

    import keras

    from features.backbones import BackboneConfig
    from features.pca import PCAWhitening

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("delf")
    model, app, layer = build_delf_model(BackboneConfig("mobilenet_v2"), attention_dim=16)
    rf = receptive_field(app, layer)
    path = str(folder / "model.keras")
    save_delf_model(model, path, {"dim": 576, "layer": layer, "receptive_field": [dataclasses.asdict(r) for r in rf],
                                  "input_size": 96})
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (120, 160, 3), dtype=np.uint8) for _ in range(3)]
    raw = DelfExtractor(DelfConfig(model=path, max_side=128, max_features=50))
    X = np.concatenate([raw.extract(img).descriptors for img in images])
    pca_path = str(folder / "pca.npz")
    fitted = PCAWhitening(dim=8, whiten=False).fit(X)
    fitted.save(pca_path)
    return path, pca_path, images, fitted


def test_extraction_selects_normalises_and_projects(tiny_delf):
    path, pca_path, images, _ = tiny_delf
    ex = DelfExtractor(DelfConfig(model=path, pca=pca_path, max_side=128, max_features=50))
    f = ex.extract(images[0])
    assert ex.dim == 8 and f.descriptors.shape == (50, 8) and (f.width, f.height) == (160, 120)
    np.testing.assert_allclose(np.linalg.norm(f.descriptors, axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(f.scores) <= 0)  # best attention first
    assert np.all(f.keypoints[:, 0] >= -8) and np.all(f.keypoints[:, 0] <= 168)  # cell centres on the image
    assert np.all(f.keypoints[:, 1] >= -8) and np.all(f.keypoints[:, 1] <= 128)
    assert len(set(map(tuple, np.round(f.keypoints, 2)))) > 10


def test_batched_extraction_equals_one_image_at_a_time(tiny_delf):
    path, pca_path, images, _ = tiny_delf
    ex = DelfExtractor(DelfConfig(model=path, pca=pca_path, max_side=128, max_features=50, batch_size=2))
    odd = np.zeros((90, 60, 3), np.uint8) + 100  # another shape: its own group
    batch = [*images, odd]
    prepared = [ex.prepare(img) for img in batch]
    together = ex.extract_batch(prepared, [(img.shape[1], img.shape[0]) for img in batch])
    for img, f in zip(batch, together, strict=True):
        alone = ex.extract(img)
        np.testing.assert_allclose(f.keypoints, alone.keypoints, atol=1e-4)
        np.testing.assert_allclose(f.descriptors, alone.descriptors, atol=1e-4)


def test_pca_saved_and_loaded_projects_as_the_fitted_one(tiny_delf):
    from features.pca import PCAWhitening

    _, pca_path, _, fitted = tiny_delf
    pca = PCAWhitening.load(pca_path)
    X = np.random.default_rng(1).normal(size=(20, 576)).astype(np.float32)
    np.testing.assert_array_equal(pca.transform(X), fitted.transform(X))
    np.testing.assert_array_equal(pca.mean_, fitted.mean_)
    np.testing.assert_array_equal(pca.components_, fitted.components_)
    assert pca.dim_out == 8 and not pca.whiten


def test_keypoints_are_receptive_field_centres_in_decoded_pixels_and_top_k_spans_the_scales(tiny_delf, monkeypatch):
    path, _, _, _ = tiny_delf
    ex = DelfExtractor(DelfConfig(model=path, scales=(0.5, 1.0), max_side=128, max_features=3))
    ex.rf = (ReceptiveField(35.0, 16.0, 7.0), ReceptiveField(35.0, 16.0, 7.0))
    seen = []

    def dense(xb):  # planted maps: one strong cell per scale, scores by scale
        n, h, w = xb.shape[0], xb.shape[1] // 16, xb.shape[2] // 16
        att = np.zeros((n, h, w), np.float32)
        feats = np.random.default_rng(len(seen)).normal(size=(n, h, w, 4)).astype(np.float32)
        if h == 8:  # scale 1.0 (128 x 128): cell (row 2, col 5) the best
            att[:, 2, 5] = 9.0
            att[:, 0, 0] = 1.0
        else:  # scale 0.5 (64 x 64): cell (row 1, col 3) second best
            att[:, 1, 3] = 5.0
        seen.append((h, w))
        return feats, att

    monkeypatch.setattr(ex, "_dense", dense)
    ex.dim = 4
    image = np.zeros((200, 200, 3), np.uint8)  # decoded 200 x 200; scale 1.0 works at 128 x 128
    f = ex.extract(image)
    assert sorted(seen) == [(4, 4), (8, 8)]
    # scale 1.0: cell centre x = 7 + 5 * 16 = 87 in the 128-px image -> (87 + 0.5) * 200 / 128 - 0.5 in pixels
    np.testing.assert_allclose(f.keypoints[0], [(87.5 * 200 / 128) - 0.5, ((7 + 2 * 16) + 0.5) * 200 / 128 - 0.5])
    # scale 0.5: x = 7 + 3 * 16 = 55 in the 64-px image -> (55.5) * 200 / 64 - 0.5
    np.testing.assert_allclose(f.keypoints[1], [55.5 * 200 / 64 - 0.5, (7 + 16 + 0.5) * 200 / 64 - 0.5])
    np.testing.assert_allclose(f.scores, [9.0, 5.0, 1.0])  # the top 3 over both scales
    np.testing.assert_allclose(f.scales[:2], [35 * 200 / 128, 35 * 200 / 64])  # the receptive field in pixels


@pytest.mark.parametrize("matcher", ["ratio", "mutual"])
def test_matching_and_ransac_recover_a_known_homography(matcher):
    rng = np.random.default_rng(0)
    n, outliers = 120, 60
    H = np.array([[0.9, 0.1, 20.0], [-0.08, 1.05, 10.0], [1e-4, 5e-5, 1.0]])
    pts = rng.uniform(20, 300, (n, 2)).astype(np.float32)
    proj = np.c_[pts, np.ones(n)] @ H.T
    moved = (proj[:, :2] / proj[:, 2:]).astype(np.float32)
    desc = rng.normal(size=(n, 40)).astype(np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    noisy = desc + 0.05 * rng.normal(size=desc.shape).astype(np.float32)  # the same features, seen again
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    extra = rng.normal(size=(outliers, 40)).astype(np.float32)  # features only the database image has
    extra /= np.linalg.norm(extra, axis=1, keepdims=True)

    def lf(points, descriptors):
        k = len(points)
        return LocalFeatures(points, np.full(k, 32, np.float32), np.zeros(k, np.float32), np.ones(k, np.float32),
                             descriptors, 320, 320)

    q = lf(pts, desc)
    d = lf(np.r_[moved, rng.uniform(0, 320, (outliers, 2)).astype(np.float32)], np.r_[noisy, extra])
    result = verify(q, d, VerifyConfig(matcher=matcher, threshold=3.0, reference_side=0))
    assert result.verified and result.inliers >= 0.95 * n
    assert np.all(result.inlier_pairs[:, 0] == result.inlier_pairs[:, 1])  # every inlier is a true pair
    est = result.model / result.model[2, 2]
    np.testing.assert_allclose(est, H, rtol=0.02, atol=0.5)


def test_the_beam_job_extracts_delf_features_and_dead_letters_bad_images(tiny_delf, tmp_path):
    from PIL import Image

    from pipeline.featuresets import features_prefix
    from pipeline.parquet_io import read_shards
    from pipeline.stages.extract import extract
    from tests.conftest import write_manifest

    path, pca_path, images, _ = tiny_delf
    rows = []
    for k, img in enumerate(images):
        Image.fromarray(img).save(tmp_path / f"i{k}.jpg")
        rows.append((f"i{k}", f"i{k}.jpg", k))
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    rows.append(("broken", "broken.jpg", ""))
    manifest = write_manifest(tmp_path / "m.csv", rows)
    record = extract(str(manifest), str(tmp_path / "out"), "delf",
                     {"model": path, "pca": pca_path, "max_side": 128, "max_features": 50, "batch_size": 2},
                     workers=1)
    assert record["counts"]["inputs"] == 4 and record["counts"]["outputs"] == 3
    assert record["counts"]["dead_by_stage"] == {"decode": 1} and record["dim"] == 8
    table, meta = read_shards(features_prefix(str(tmp_path / "out"), "local"))
    assert sorted(table.column("id").to_pylist()) == ["i0", "i1", "i2"] and meta["method"] == "delf"
    assert all(len(d) == 50 for d in table.column("descriptors").to_pylist())
