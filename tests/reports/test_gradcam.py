import numpy as np
import pytest

from features.backbones import BackboneConfig
from features.embedding import HeadConfig, build_embedding_model
from reports.gradcam import grad_cam, overlay, split_model


def toy_model():
    """A Cairn-shaped embedding model whose 'backbone' is an 8x8 average of the colour channels: the embedding is
    the GeM-pooled colour of the image, so which cells Grad-CAM must light is known."""
    import keras

    from features.layers import GeM, L2Normalize

    x = keras.Input((None, None, 3))
    backbone = keras.Model(x, keras.layers.AveragePooling2D(8)(keras.layers.Rescaling(1 / 255)(x)),
                           name="backbone_toy")
    image = keras.Input((None, None, 3), name="image")
    return keras.Model(image, L2Normalize(name="l2")(GeM(3.0, False, name="gem")(backbone(image))))


def test_grad_cam_lights_the_region_that_matches_the_target():
    image = np.zeros((1, 64, 64, 3), np.float32)
    image[0, :, :, 2] = 255  # blue...
    image[0, :32, :32] = (255, 0, 0)  # ...with a red top-left quadrant
    model = toy_model()
    red = grad_cam(model, image, np.array([[1.0, 0.0, 0.0]]))[0]
    assert red.shape == (8, 8) and red.dtype == np.float32 and red.max() == pytest.approx(1.0)
    assert np.all(red[:4, :4] > 0.99) and np.all(red[4:, :] == 0) and np.all(red[:, 4:] == 0)
    # the opposite target: the channel weights are negated, so ReLU keeps the complementary cells
    blue = grad_cam(model, image, np.array([[-1.0, 0.0, 0.0]]))[0]
    assert np.all(blue[:4, :4] == 0) and np.all(blue[4:, :] > 0.99) and np.all(blue[:, 4:] > 0.99)


def test_grad_cam_runs_on_a_real_backbone():
    import keras

    keras.utils.set_random_seed(0)
    model = build_embedding_model(BackboneConfig("mobilenet_v2"), HeadConfig(dim=16))
    images = np.random.default_rng(0).uniform(0, 255, (2, 96, 96, 3)).astype(np.float32)
    cams = grad_cam(model, images, np.random.default_rng(1).normal(size=(2, 16)))
    assert cams.shape == (2, 3, 3) and np.all(cams >= 0) and np.all(cams <= 1)


def test_split_model_refuses_a_model_without_backbone():
    import keras

    x = keras.Input((8,))
    plain = keras.Model(x, keras.layers.Dense(2)(x))
    with pytest.raises(ValueError, match="not a Cairn embedding model"):
        split_model(plain)


def test_overlay_keeps_the_image_size_and_colours_the_hot_region():
    image = np.full((40, 60, 3), 128, np.uint8)
    cam = np.zeros((2, 2), np.float32)
    cam[0, 0] = 1.0
    out = overlay(image, cam)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[2, 2, 0] > out[38, 58, 0]  # 'jet' is red where the map is 1, blue where it is 0
    assert out[38, 58, 2] > out[38, 58, 0]
