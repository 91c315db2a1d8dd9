"""Real folders are messy: every kind of file is read as a photo viewer shows it.

Each file kind is checked against the same picture converted by hand first, on
files the test writes itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from skpatchcore import ImageReadError, PatchFeatureTransformer, make_patchcore
from skpatchcore._report import read_rgb
from skpatchcore.datasets import load_image_folder
from skpatchcore.utils._images import check_images

from .conftest import textured_parts

# Upright pictures are 48 x 64 (height x width); the model keeps that size.
SMALL = {"backbone": "efficientnet_lite0", "image_size": 64, "crop_size": None, "device": "cpu"}
ORIENTATION = 0x0112


def parts(n: int, seed: int) -> np.ndarray:
    return textured_parts(n, size=64, seed=seed)[:, 8:56]  # (n, 48, 64, 3)


def rotated_jpeg(folder, upright: np.ndarray, name: str = "camera.jpg") -> tuple[str, np.ndarray]:
    """A JPEG stored a quarter turn off, tagged EXIF orientation 6, and the upright pixels it shows."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # 64 x 48, as a camera writes
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # "rotate 90 degrees clockwise to view"
    path = folder / name
    stored.save(path, quality=95, exif=exif)
    shown = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))  # the decoded pixels, upright
    return str(path), shown


@pytest.fixture(scope="module")
def rgb_model():
    return make_patchcore(ratio=0.25, random_state=0, **SMALL).fit(list(parts(8, seed=1)))


def test_an_exif_rotated_jpeg_scores_like_its_upright_twin_and_its_map_is_upright(rgb_model, tmp_path):
    path, shown = rotated_jpeg(tmp_path, parts(1, seed=5)[0])
    assert Image.open(path).size == (48, 64)  # stored portrait
    Image.fromarray(shown).save(tmp_path / "twin.png")
    maps, scores = rgb_model.predict_map([path, str(tmp_path / "twin.png")], return_scores=True)
    assert maps.shape == (2, 48, 64)
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4)
    np.testing.assert_allclose(maps[0], maps[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(read_rgb(path), shown)  # overlays and reports are upright too


def test_every_exif_orientation_is_shown_upright(tmp_path):
    upright = parts(1, seed=6)[0]
    for tag in range(1, 9):
        # Store the picture so that applying `tag` shows it upright: invert the viewer's transposition.
        stored = Image.fromarray(upright)
        for step in {
            2: [Image.Transpose.FLIP_LEFT_RIGHT],
            3: [Image.Transpose.ROTATE_180],
            4: [Image.Transpose.FLIP_TOP_BOTTOM],
            5: [Image.Transpose.TRANSPOSE],
            6: [Image.Transpose.ROTATE_90],
            7: [Image.Transpose.TRANSVERSE],
            8: [Image.Transpose.ROTATE_270],
        }.get(tag, []):
            stored = stored.transpose(step)
        exif = Image.Exif()
        exif[ORIENTATION] = tag
        stored.save(tmp_path / f"o{tag}.png", exif=exif)  # lossless, so the pixels must match exactly
        images = check_images([str(tmp_path / f"o{tag}.png")])
        assert images.sizes == [(48, 64)], tag
        np.testing.assert_array_equal(np.asarray(images.load(0)), upright, err_msg=f"orientation {tag}")


def test_opaque_alpha_is_dropped_and_scores_like_the_opaque_picture(rgb_model, tmp_path):
    picture = parts(1, seed=7)[0]
    rgba = np.dstack([picture, np.full(picture.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    scores = rgb_model.anomaly_score([str(tmp_path / "rgba.png"), picture, str(tmp_path / "la.png")])
    expected_gray = rgb_model.anomaly_score([np.repeat(picture[..., :1], 3, axis=2)])[0]
    # Batches of other sizes may round differently in the last bit: same pictures, 1e-6.
    np.testing.assert_allclose(scores, [scores[1], scores[1], expected_gray], rtol=1e-6)
    np.testing.assert_allclose(rgb_model.anomaly_score([rgba]), scores[1], rtol=1e-6)  # an RGBA array


def test_transparent_alpha_is_refused_naming_the_file(rgb_model, tmp_path):
    rgba = np.dstack([parts(1, seed=8)[0], np.full((48, 64), 255, np.uint8)])
    rgba[10, 10, 3] = 254
    Image.fromarray(rgba, "RGBA").save(tmp_path / "glass.png")
    with pytest.raises(ImageReadError, match="glass.png.*transparent pixels"):
        rgb_model.anomaly_score([str(tmp_path / "glass.png")])


def sixteen_bit(seed: int, top: int) -> np.ndarray:
    gray = parts(1, seed=seed)[0, :, :, 0].astype(np.int64)
    return (gray * top // 255).astype(np.uint16)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_16_bit_grayscale_files_keep_their_16_bits(tmp_path, suffix):
    values = sixteen_bit(9, 65535) + np.arange(64, dtype=np.uint16)  # low bits an 8-bit read would lose
    Image.fromarray(values).save(tmp_path / f"deep.{suffix}")
    model = PatchFeatureTransformer(**SMALL).fit([str(tmp_path / f"deep.{suffix}")])
    assert model.n_channels_ == 1
    expected = (values.astype(np.float32) / np.float32(65535))[None]
    np.testing.assert_array_equal(
        model.transform([str(tmp_path / f"deep.{suffix}")]), model.transform(expected)
    )
    np.testing.assert_array_equal(model.transform(values[None]), model.transform(expected))  # uint16 array


def test_uint16_rgb_arrays_are_scaled_like_gray_ones():
    values = np.stack([sixteen_bit(s, 65535) for s in (21, 22, 23)], axis=-1)  # (48, 64, 3)
    model = PatchFeatureTransformer(**SMALL).fit(values[None])
    assert model.n_channels_ == 3
    expected = values.astype(np.float32) / np.float32(65535)
    np.testing.assert_array_equal(model.transform(values[None]), model.transform(expected[None]))


def test_12_bit_camera_data_needs_its_bit_depth_and_then_reads_in_full_range(tmp_path):
    values = sixteen_bit(10, 4095)
    Image.fromarray(values).save(tmp_path / "camera.png")
    path = [str(tmp_path / "camera.png")]
    full = PatchFeatureTransformer(bit_depth=12, **SMALL).fit(path)
    expected = (values.astype(np.float32) / np.float32(4095))[None]
    np.testing.assert_array_equal(full.transform(path), full.transform(expected))
    assert float(expected.max()) > 0.6  # read as 16 bits it would top out at 0.0625: "nearly black"
    with pytest.raises(ImageReadError, match="camera.png.*bit_depth=8"):
        PatchFeatureTransformer(bit_depth=8, **SMALL).fit(path).transform(path)


def test_a_folder_mixing_gray_rgb_rotated_alpha_and_16_bit_files_fits_and_predicts(tmp_path):
    folder = tmp_path / "good"
    folder.mkdir()
    pictures = parts(6, seed=11)
    Image.fromarray(pictures[0]).save(folder / "a_rgb.png")
    Image.fromarray(pictures[1][..., 0]).save(folder / "b_gray.png")
    rotated_jpeg(folder, pictures[2], "c_camera.jpg")
    Image.fromarray(np.dstack([pictures[3], np.full((48, 64), 255, np.uint8)]), "RGBA").save(folder / "d.png")
    Image.fromarray(pictures[4][..., 0].astype(np.uint16) * 257).save(folder / "e_16bit.png")
    Image.fromarray(pictures[5]).convert("P").save(folder / "f_palette.png")
    paths = load_image_folder(folder)
    assert len(paths) == 6
    model = make_patchcore(ratio=0.5, random_state=0, **SMALL).fit(paths)
    assert model.named_steps["features"].n_channels_ == 3
    maps, scores = model.predict_map(paths, return_scores=True)
    assert maps.shape == (6, 48, 64) and np.isfinite(scores).all()
    # A gray file in an RGB model reads exactly as the file converted to RGB first.
    Image.open(folder / "b_gray.png").convert("RGB").save(tmp_path / "b_as_rgb.png")
    gray_score, rgb_score = model.anomaly_score([str(folder / "b_gray.png"), str(tmp_path / "b_as_rgb.png")])
    np.testing.assert_allclose(gray_score, rgb_score, rtol=1e-6)
    # 16-bit x 257 is 8-bit data: it reads as the same picture's 8-bit file.
    np.testing.assert_allclose(
        model.anomaly_score([str(folder / "e_16bit.png")]),
        model.anomaly_score([np.repeat(pictures[4][..., :1], 3, axis=2)]),
        rtol=1e-4,
    )


def test_a_colour_image_for_a_grayscale_model_reads_as_its_luma(tmp_path):
    gray_model = make_patchcore(ratio=0.5, random_state=0, **SMALL).fit(list(parts(4, seed=12)[..., 0]))
    assert gray_model.named_steps["features"].n_channels_ == 1
    colour = parts(1, seed=13)[0].copy()
    colour[..., 1] //= 2  # not gray: the channels differ
    Image.fromarray(colour).save(tmp_path / "colour.png")
    Image.fromarray(colour).convert("L").save(tmp_path / "luma.png")
    scores = gray_model.anomaly_score([str(tmp_path / "colour.png"), str(tmp_path / "luma.png")])
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-6)
