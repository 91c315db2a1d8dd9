"""The model input geometry: letterboxing into a box, and a box fitted to the training images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skpatchcore import PatchFeatureTransformer, load, make_patchcore, save
from skpatchcore.utils._geometry import Geometry, fitted_box

from .conftest import textured_parts

SMALL = {"backbone": "efficientnet_lite0", "device": "cpu"}


@pytest.mark.parametrize(
    "sizes, expected",
    [
        ([(512, 512)] * 3, (320, 320)),
        ([(230, 565)], (208, 496)),  # BSData: wide
        ([(946, 375), (926, 375), (964, 375)], (512, 208)),  # KolektorSDD: tall, heights vary
        ([(100, 200), (200, 100), (100, 100)], (320, 320)),  # as many wide as tall: square
        ([(100, 300), (100, 290), (300, 100)], (192, 544)),  # the median shape (2.9:1) wins
    ],
)
def test_the_fitted_box_has_the_median_shape_and_about_the_pixels_asked_for(sizes, expected):
    box = fitted_box(sizes, 320)
    assert box == expected
    assert 0.9 < box[0] * box[1] / 320**2 < 1.1
    assert box[0] % 16 == 0 and box[1] % 16 == 0


def test_fit_in_a_square_box_is_the_square_letterbox():
    letterbox, fit = Geometry(320, 320, "longer"), Geometry(None, 320, "fit")
    for size in [(230, 565), (946, 375), (512, 512), (3, 700)]:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8))
        np.testing.assert_array_equal(fit.apply_8bit(image), letterbox.apply_8bit(image))


def test_fit_letterboxes_into_a_rectangle_and_its_inverse_sees_the_whole_image():
    geometry = Geometry(None, (208, 496), "fit")
    assert geometry.resized_size(230, 565) == (201, 496)  # wider than the box: width fills it
    assert geometry.resized_size(300, 300) == (208, 208)  # taller than the box: height fills it
    pixels = geometry.apply(np.ones((230, 565, 1), np.float32))
    assert pixels.shape == (208, 496, 1)
    assert pixels[:3].max() == 0 and pixels[3:204].min() == 1 and pixels[204:].max() == 0  # 3 + 4 rows padded
    heat, inspected = geometry.to_original(pixels[:, :, 0], (230, 565))
    assert heat.shape == (230, 565) and inspected.all() and heat.min() > 0.99


@pytest.mark.parametrize(
    "params, message",
    [
        ({"image_size": 320, "crop_size": 320, "resize_side": "fit"}, "image_size=None"),
        ({"image_size": None, "crop_size": None, "resize_side": "fit"}, "needs a crop_size"),
        (
            {"image_size": 10, "crop_size": 10, "resize_side": "middle"},
            r"one of \['shorter', 'longer', 'fit'\]",
        ),
    ],
)
def test_geometry_refuses_inconsistent_settings(params, message):
    with pytest.raises(ValueError, match=message):
        Geometry(**params)


def test_auto_crop_needs_an_image_size_and_takes_a_pair_as_the_box():
    with pytest.raises(ValueError, match="crop_size='auto'.*image_size must then be an int"):
        PatchFeatureTransformer(image_size=None, crop_size="auto", **SMALL).fit(textured_parts(1))
    with pytest.raises(ValueError, match="'image_size' parameter must be"):
        PatchFeatureTransformer(image_size=(0, 3), crop_size="auto", **SMALL).fit(textured_parts(1))
    # a (height, width) image_size is the box itself: every image letterboxed into it
    features = PatchFeatureTransformer(image_size=(64, 96), crop_size="auto", **SMALL)
    features.fit(textured_parts(2, size=80))
    assert features.geometry_ == Geometry(None, (64, 96), "fit")
    explicit = PatchFeatureTransformer(image_size=None, crop_size=(64, 96), resize_side="fit", **SMALL)
    images = textured_parts(2, size=80)
    np.testing.assert_array_equal(features.transform(images), explicit.fit(images).transform(images))


def test_images_of_nearly_equal_sizes_fit_and_predict_in_a_box_of_their_shape():
    # Tall parts whose heights vary by a few pixels, as KolektorSDD's: no common size without a box.
    rng = np.random.default_rng(3)
    images = [rng.integers(90, 160, (h, 40), dtype=np.uint8) for h in (100, 96, 103, 98)]
    model = make_patchcore(image_size=64, crop_size="auto", ratio=0.5, random_state=0, **SMALL).fit(images)
    geometry = model.named_steps["features"].geometry_
    assert geometry == Geometry(None, (96, 48), "fit")
    maps = model.predict_map(images[:2])
    assert maps.shape == (2, 96, 48)
    for anomaly_map, image in zip(maps, images):
        heat, inspected = geometry.to_original(anomaly_map, image.shape)
        assert heat.shape == image.shape and inspected.all()


def test_an_auto_box_model_round_trips_through_a_model_file(tmp_path):
    images = [textured_parts(1, size=96, seed=s)[0, :48] for s in range(3)]  # 48 x 96
    model = make_patchcore(image_size=64, crop_size="auto", ratio=0.5, random_state=0, **SMALL).fit(images)
    save(model, tmp_path / "wide.skpatchcore")
    loaded = load(tmp_path / "wide.skpatchcore")
    assert (
        loaded.named_steps["features"].geometry_
        == model.named_steps["features"].geometry_
        == Geometry(None, (48, 96), "fit")
    )
    np.testing.assert_array_equal(loaded.predict_map(images), model.predict_map(images))
