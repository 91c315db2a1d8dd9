"""Bad frames on a production line: each is converted (documented) or refused by name.

With ``on_error="skip"`` a bad image costs only its own result: the others keep
exactly the scores they get without it, and a warning lists what was skipped.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from skpatchcore import ImageReadError, SkippedImagesWarning, make_patchcore

from .conftest import textured_parts


@pytest.fixture(scope="module")
def model():
    return make_patchcore(
        backbone="efficientnet_lite0", image_size=64, crop_size=64, ratio=0.25, random_state=0, device="cpu"
    ).fit(textured_parts(8, seed=40))


def save(path, array, mode=None, **kwargs):
    Image.fromarray(array, mode=mode).save(path, **kwargs)
    return str(path)


def png_header_only(path, width, height):
    """A PNG whose header claims width x height, with no pixel data worth decoding."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return str(path)


def write_bytes(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def truncated(path, fmt):
    Image.fromarray(textured_parts(1, size=96, seed=41)[0]).save(path, format=fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


REFUSED = {
    "truncated PNG": (lambda tmp: truncated(tmp / "cut.png", "PNG"), "cut.png.*truncated"),
    "truncated JPEG": (lambda tmp: truncated(tmp / "cut.jpg", "JPEG"), "cut.jpg.*truncated"),
    "0-byte file": (lambda tmp: write_bytes(tmp / "empty.png", b""), "empty.png"),
    "float TIFF": (
        lambda tmp: save(tmp / "deep.tif", np.full((32, 32), 0.5, np.float32)),
        "deep.tif.*32-bit float",
    ),
    "transparent RGBA PNG": (
        lambda tmp: save(tmp / "alpha.png", np.zeros((32, 32, 4), np.uint8)),
        "alpha.png.*transparent",
    ),
    "20000 x 20000 PNG": (
        lambda tmp: png_header_only(tmp / "huge.png", 20000, 20000),
        "huge.png.*too many pixels",
    ),
    "text file": (
        lambda tmp: write_bytes(tmp / "notes.png", b"not a picture"),
        "notes.png.*not an image",
    ),
    "NaN array": (lambda tmp: np.full((32, 32, 3), np.nan, np.float32), r"X\[0\].*NaN"),
    "inf array": (lambda tmp: np.full((32, 32, 3), np.inf, np.float32), r"X\[0\].*NaN or infinity"),
}


@pytest.mark.parametrize("make", REFUSED.values(), ids=REFUSED.keys())
def test_bad_frames_are_refused_with_their_name(model, tmp_path, make):
    build, message = make
    with pytest.raises(ImageReadError if not message.startswith("X") else ValueError, match=message):
        model.anomaly_score([build(tmp_path)])


CONVERTED = {
    # palette -> RGB, CMYK -> RGB, 16-bit gray -> float gray, 1 x 1 -> upsampled (tests/test_messy_folders.py
    # checks each kind of file against its conversion)
    "palette PNG": lambda tmp: (
        Image.fromarray(textured_parts(1, size=80)[0]).quantize(32).save(tmp / "p.png") or str(tmp / "p.png")
    ),
    "CMYK JPEG": lambda tmp: (
        Image.fromarray(textured_parts(1, size=80)[0]).convert("CMYK").save(tmp / "c.jpg")
        or str(tmp / "c.jpg")
    ),
    "1 x 1 RGB": lambda tmp: save(tmp / "dot.png", np.full((1, 1, 3), 128, np.uint8)),
    "16-bit PNG": lambda tmp: save(tmp / "deep.png", np.full((32, 32), 4000, np.uint16)),
}


@pytest.mark.parametrize("make", CONVERTED.values(), ids=CONVERTED.keys())
def test_other_modes_and_sizes_are_converted_and_scored(model, tmp_path, make):
    scores = model.anomaly_score([make(tmp_path)])
    assert np.isfinite(scores).all()


def test_palette_image_scores_like_its_rgb_conversion(model, tmp_path):
    rgb = textured_parts(1, size=80, seed=42)[0]
    palette = Image.fromarray(rgb).quantize(64)
    palette.save(tmp_path / "p.png")
    as_rgb = np.asarray(palette.convert("RGB"))
    np.testing.assert_array_equal(
        model.anomaly_score([str(tmp_path / "p.png")]), model.anomaly_score([as_rgb])
    )


def test_one_bad_frame_does_not_lose_the_others_when_skipping(model, tmp_path):
    images = textured_parts(5, size=64, seed=43)
    paths = [save(tmp_path / f"ok{i}.png", im) for i, im in enumerate(images)]
    bad = truncated(tmp_path / "bad.png", "PNG")
    missing = str(tmp_path / "missing.png")
    batch = paths[:2] + [bad] + paths[2:4] + [missing] + paths[4:]
    expected_maps, expected_scores = model.predict_map(paths, return_scores=True)
    with pytest.warns(SkippedImagesWarning) as record:
        maps, scores = model.predict_map(batch, return_scores=True, on_error="skip")
    (warning,) = [w.message for w in record if isinstance(w.message, SkippedImagesWarning)]
    skipped = warning.skipped
    assert sorted(skipped) == [2, 5]
    assert "bad.png" in skipped[2] and "missing.png" in skipped[5]
    good = [0, 1, 3, 4, 6]
    np.testing.assert_allclose(scores[good], expected_scores, rtol=1e-5)
    np.testing.assert_allclose(maps[good], expected_maps, rtol=1e-5, atol=1e-4)
    assert np.isnan(scores[[2, 5]]).all() and np.isnan(maps[[2, 5]]).all()


def test_skipping_also_covers_wrong_channels_and_bad_arrays(model):
    images = list(textured_parts(2, size=64, seed=44))
    batch = [images[0], np.zeros((64, 64, 5), np.uint8), np.full((64, 64, 3), np.nan, np.float32), images[1]]
    with pytest.warns(SkippedImagesWarning, match="Skipped 2 image"):
        scores = model.anomaly_score(batch, on_error="skip")
    assert np.isnan(scores[[1, 2]]).all() and np.isfinite(scores[[0, 3]]).all()


def test_without_skipping_the_first_bad_frame_stops_the_call(model, tmp_path):
    paths = [save(tmp_path / "ok.png", textured_parts(1, size=64)[0]), truncated(tmp_path / "bad.png", "PNG")]
    with pytest.raises(ImageReadError, match="bad.png"):
        model.predict_map(paths)


def test_on_error_accepts_only_raise_or_skip(model):
    with pytest.raises(ValueError, match="'on_error' parameter"):
        model.anomaly_score(textured_parts(1, size=64), on_error="ignore")


def test_when_every_frame_is_bad_the_error_lists_them(model, tmp_path):
    with pytest.raises(ImageReadError, match="No image of X could be read.*a.png"):
        model.anomaly_score([str(tmp_path / "a.png"), str(tmp_path / "b.png")], on_error="skip")
