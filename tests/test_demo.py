"""Specification of the synthetic demo data (skpatchcore._demo.make_demo_dataset)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from skpatchcore._demo import _DEFECTS, DEFECT_TYPES, _plate, _rng, make_demo_dataset
from skpatchcore.datasets import load_masks, load_mvtec_category

SMALL = {"n_train": 4, "n_test_good": 2, "n_test_defect": 2, "size": 96}


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "plates", **SMALL)


def test_layout_is_an_mvtec_category_with_the_requested_counts(small_set):
    data = load_mvtec_category(small_set)
    assert len(data.train_paths) == 4
    assert data.test_defect_types == ["crack"] * 2 + ["good"] * 2 + ["scratch"] * 2 + ["spot"] * 2
    assert list(data.test_labels) == [-1, -1, 1, 1, -1, -1, -1, -1]
    assert (small_set / "SYNTHETIC_DATA.txt").read_text().startswith("Synthetic images")
    for path in data.train_paths + data.test_paths:
        image = Image.open(path)
        assert (image.mode, image.size) == ("RGB", (96, 96))


def test_masks_are_0_255_and_mark_one_defect_away_from_the_border(small_set):
    data = load_mvtec_category(small_set)
    margin = 96 // 8
    for mask_path in filter(None, data.test_mask_paths):
        mask = pixels(mask_path)
        assert mask.shape == (96, 96)
        assert set(np.unique(mask)) == {0, 255}
        rows, cols = np.nonzero(mask)
        assert rows.min() >= margin - 3 and rows.max() < 96 - margin + 3
        assert cols.min() >= margin - 3 and cols.max() < 96 - margin + 3
    # The default model geometry (the whole image letterboxed into 320 x 320) keeps every defect.
    masks = load_masks(data.test_mask_paths, data.test_paths)
    assert all(masks[i].any() == (label == -1) for i, label in enumerate(data.test_labels))


@pytest.mark.parametrize("defect_type", DEFECT_TYPES)
def test_a_defect_changes_the_pixels_under_its_mask_and_nowhere_else(defect_type):
    size = 128
    for index in range(3):
        rng = _rng(0, defect_type, index)
        clean = _plate(rng, size)
        damaged, mask = _DEFECTS[defect_type](clean.copy(), rng)
        mask = mask > 0.5
        change = np.abs(damaged - clean).max(axis=2)
        assert change[mask].mean() > 0.1, "the defect must be clearly visible"
        near = ndimage.binary_dilation(mask, iterations=3)
        assert np.all(change[~near] == 0.0), "the defect must be local and covered by its mask"


def test_same_seed_gives_the_same_pixels_and_another_seed_other_pixels(tmp_path):
    first = make_demo_dataset(tmp_path / "a", **SMALL, seed=3)
    again = make_demo_dataset(tmp_path / "b", **SMALL, seed=3)
    other = make_demo_dataset(tmp_path / "c", **SMALL, seed=4)
    names = sorted(p.relative_to(first) for p in first.rglob("*.png"))
    assert names == sorted(p.relative_to(again) for p in again.rglob("*.png"))
    for name in names:
        assert np.array_equal(pixels(first / name), pixels(again / name))
    assert not np.array_equal(pixels(first / "train/good/000.png"), pixels(other / "train/good/000.png"))


def test_good_parts_vary_from_image_to_image(small_set):
    train = [pixels(small_set / "train" / "good" / f"{i:03d}.png").astype(float) for i in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(train[a] - train[b]).mean() > 5.0


def test_asking_for_more_test_images_keeps_the_training_images(tmp_path):
    few = make_demo_dataset(tmp_path / "few", **SMALL)
    more = make_demo_dataset(tmp_path / "more", **{**SMALL, "n_test_good": 5, "n_test_defect": 3})
    for i in range(SMALL["n_train"]):
        name = f"train/good/{i:03d}.png"
        assert np.array_equal(pixels(few / name), pixels(more / name))


def test_rerun_replaces_its_own_folder_but_refuses_a_foreign_one(tmp_path):
    root = make_demo_dataset(tmp_path / "plates", **SMALL)
    make_demo_dataset(root, **{**SMALL, "n_train": 2})
    assert len(list((root / "train" / "good").iterdir())) == 2

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.jpg").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo_dataset(foreign, **SMALL)
    assert (foreign / "keep.jpg").read_bytes() == b"mine"


@pytest.mark.parametrize(
    "bad, message",
    [({"n_train": 0}, "n_train"), ({"size": 32}, "size"), ({"n_test_good": -1}, "n_test_good")],
)
def test_invalid_arguments_are_named(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        make_demo_dataset(tmp_path / "x", **{**SMALL, **bad})
