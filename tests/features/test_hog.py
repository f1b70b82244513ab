import cv2
import numpy as np
import pytest

from features.hog import HogConfig, HogExtractor, hog_descriptor
from features.registry import make_extractor


def test_dimension_formula_matches_opencv():
    for config in (HogConfig(), HogConfig(size=64, cell=8, block_cells=2, nbins=9), HogConfig(size=96, cell=16,
                                                                                              block_cells=3, nbins=6)):
        img = np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)
        assert hog_descriptor(img, config).shape == (config.dim(),)
    assert HogConfig().dim() == 1764


def test_descriptor_is_unit_length_and_deterministic():
    img = np.random.default_rng(1).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    v = HogExtractor().extract(img)
    assert v.dtype == np.float32 and abs(np.linalg.norm(v) - 1) < 1e-5
    np.testing.assert_array_equal(v, HogExtractor().extract(img))


def test_flat_image_has_no_gradients():
    v = HogExtractor().extract(np.full((64, 64, 3), 128, np.uint8))
    assert not np.any(v)  # zero vector stays zero, no NaN from the normalisation


def test_edge_orientation_lands_in_the_right_bin():
    """A vertical edge has a horizontal gradient (0 degrees): bin 0 of every cell along the edge."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[:, 64:] = 255
    config = HogConfig(power=1.0)
    v = hog_descriptor(img, config).reshape(-1, config.nbins)
    strongest_bins = v[v.sum(axis=1) > 0].argmax(axis=1)
    assert set(strongest_bins.tolist()) == {0}
    img_h = np.ascontiguousarray(np.transpose(img, (1, 0, 2)))  # horizontal edge -> 90 degrees
    v = hog_descriptor(img_h, config).reshape(-1, config.nbins)
    assert set(v[v.sum(axis=1) > 0].argmax(axis=1).tolist()) == {config.nbins // 2}


def test_power_normalisation_matches_the_raw_opencv_call():
    img = np.random.default_rng(2).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    config = HogConfig(power=0.5)
    raw = cv2.HOGDescriptor((128, 128), (32, 32), (16, 16), (16, 16), 9).compute(img).reshape(-1)
    expected = np.sqrt(raw) / np.linalg.norm(np.sqrt(raw))
    np.testing.assert_allclose(hog_descriptor(img, config), expected, rtol=1e-5, atol=1e-6)


def test_registry_builds_and_validates():
    e = make_extractor("hog", {"size": 64, "cell": 8})
    assert e.dim == HogConfig(size=64, cell=8).dim() and e.metadata()["config"]["size"] == 64
    with pytest.raises(ValueError, match="unknown hog parameters"):
        make_extractor("hog", {"bins": 3})
    with pytest.raises(KeyError):
        make_extractor("surf")
    with pytest.raises(ValueError, match="multiple"):
        make_extractor("hog", {"size": 100, "cell": 16})


@pytest.mark.parametrize("fields, message", [
    (dict(nbins=0), "nbins must be between 1 and 180"),  # OpenCV: a segmentation fault
    (dict(nbins=-3), "nbins must be between 1 and 180"),
    (dict(cell=0), "cell must be between 1 and size"),  # a ZeroDivisionError
    (dict(cell=256), "cell must be between 1 and size"),
    (dict(size=0), "size must be between 8 and 4096"),
    (dict(size=100), "size 100 must be a multiple of cell 16"),
    (dict(block_cells=0), "block_cells must be between 1 and size / cell = 8"),
    (dict(block_cells=9), "block_cells must be between 1 and size / cell = 8"),
    (dict(power=float("inf")), "finite"),  # |x| ** inf: every descriptor all zeros
    (dict(power=float("nan")), "finite"),
    (dict(power=0.0), "power must be in \\(0, 1\\]"),
    (dict(power=-1.0), "power must be in \\(0, 1\\]"),
])
def test_config_refuses_parameters_opencv_would_crash_on_or_that_erase_the_descriptor(fields, message):
    with pytest.raises(ValueError, match=message):
        HogConfig(**fields)


def test_smallest_and_largest_accepted_parameters_give_unit_descriptors():
    img = np.random.default_rng(3).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    for config in (HogConfig(size=8, cell=1), HogConfig(nbins=1), HogConfig(nbins=180, size=32),
                   HogConfig(block_cells=8), HogConfig(power=1e-3)):
        v = HogExtractor(config).extract(img)
        assert v.shape == (config.dim(),) and abs(np.linalg.norm(v) - 1) < 1e-5
