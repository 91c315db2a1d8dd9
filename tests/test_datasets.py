"""Specification of skpatchcore.datasets, on synthetic MVTec AD trees and on the real data sets."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skpatchcore.datasets import MVTecCategory, load_image_folder, load_masks, load_mvtec_category
from skpatchcore.utils._images import ImageReadError

# The real data sets are read in place (they may not be redistributed) and the
# tests using them skip when they are absent.
DATA_DIR = Path(
    os.environ.get("SKPATCHCORE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
MPDD = DATA_DIR / "mpdd" / "metal_plate"
MAGNETIC_TILE = DATA_DIR / "magnetic_tile" / "magnetic_tile"


def write_image(path, height, width, value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width), value, dtype=np.uint8)).save(path)
    return path


def write_mask(path, height, width, box, on_value=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((height, width), dtype=np.uint8)
    top, bottom, left, right = box
    pixels[top:bottom, left:right] = on_value
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def category(tmp_path):
    """A small MVTec AD tree with images of varying sizes and one stray non-image file."""
    root = tmp_path / "widget"
    for name, (h, w) in {"002.png": (20, 24), "000.png": (22, 30), "001.jpg": (18, 18)}.items():
        write_image(root / "train" / "good" / name, h, w)
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    write_image(root / "test" / "good" / "000.png", 20, 24)
    write_image(root / "test" / "good" / "001.png", 16, 20)
    for defect_type, stem, (h, w) in [
        ("crack", "001", (20, 24)),
        ("crack", "000", (24, 20)),
        ("hole", "000", (30, 16)),
    ]:
        write_image(root / "test" / defect_type / f"{stem}.png", h, w)
        write_mask(root / "ground_truth" / defect_type / f"{stem}_mask.png", h, w, (2, 6, 3, 9))
    return root


# --------------------------------------------------------------------------
# load_mvtec_category
# --------------------------------------------------------------------------


def test_load_mvtec_category_pairs_images_labels_types_and_masks(category):
    data = load_mvtec_category(category)

    assert isinstance(data, MVTecCategory)
    assert data.name == "widget"
    assert data.path == str(category)
    assert data.train_paths == [
        str(category / "train" / "good" / n) for n in ("000.png", "001.jpg", "002.png")
    ]
    test = category / "test"
    assert data.test_paths == [
        str(test / "crack" / "000.png"),
        str(test / "crack" / "001.png"),
        str(test / "good" / "000.png"),
        str(test / "good" / "001.png"),
        str(test / "hole" / "000.png"),
    ]
    assert data.test_defect_types == ["crack", "crack", "good", "good", "hole"]
    np.testing.assert_array_equal(data.test_labels, [-1, -1, 1, 1, -1])
    assert np.issubdtype(data.test_labels.dtype, np.integer)
    truth = category / "ground_truth"
    assert data.test_mask_paths == [
        str(truth / "crack" / "000_mask.png"),
        str(truth / "crack" / "001_mask.png"),
        None,
        None,
        str(truth / "hole" / "000_mask.png"),
    ]


def test_mvtec_category_is_frozen_and_maps_every_image_to_its_mask(category):
    data = load_mvtec_category(category)
    with pytest.raises(AttributeError):
        data.train_paths = []
    with pytest.raises(ValueError, match="read-only"):
        data.test_labels[0] = 1

    mapping = data.mask_paths_by_image
    assert len(mapping) == len(data.train_paths) + len(data.test_paths)
    assert all(mapping[path] is None for path in data.train_paths)
    assert [mapping[path] for path in data.test_paths] == data.test_mask_paths


def test_load_mvtec_category_names_a_missing_or_non_directory_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(missing)))):
        load_mvtec_category(missing)
    a_file = write_image(tmp_path / "image.png", 4, 4)
    with pytest.raises(ValueError, match=re.escape(repr(str(a_file))) + ".*directory"):
        load_mvtec_category(a_file)
    with pytest.raises(TypeError, match="'path'.*int"):
        load_mvtec_category(3)


def test_load_mvtec_category_requires_train_good_with_images(category):
    empty_root = category.parent / "empty"
    empty_root.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty_root / "train" / "good")) + ".*missing"):
        load_mvtec_category(empty_root)

    for image in (category / "train" / "good").glob("*.*g"):
        image.unlink()
    with pytest.raises(ValueError, match=re.escape(str(category / "train" / "good")) + ".*no image"):
        load_mvtec_category(category)


def test_load_mvtec_category_names_a_defective_image_without_its_mask(category):
    (category / "ground_truth" / "hole" / "000_mask.png").unlink()
    expected = (
        re.escape(repr(str(category / "test" / "hole" / "000.png")))
        + ".*has no mask.*"
        + re.escape(repr(str(category / "ground_truth" / "hole" / "000_mask.png")))
    )
    with pytest.raises(FileNotFoundError, match=expected):
        load_mvtec_category(category)


def test_load_mvtec_category_names_both_files_when_a_mask_size_differs(category):
    mask = write_mask(category / "ground_truth" / "crack" / "001_mask.png", 21, 24, (0, 2, 0, 2))
    image = category / "test" / "crack" / "001.png"
    expected = re.escape(repr(str(mask))) + r" is 21x24.*" + re.escape(repr(str(image))) + r" is 20x24"
    with pytest.raises(ValueError, match=expected):
        load_mvtec_category(category)


def test_load_mvtec_category_names_an_unreadable_mask(category):
    mask = category / "ground_truth" / "crack" / "000_mask.png"
    mask.write_text("not a png")
    with pytest.raises(ImageReadError, match=r"The mask " + re.escape(repr(str(mask))) + ".*not an image"):
        load_mvtec_category(category)


# --------------------------------------------------------------------------
# load_image_folder
# --------------------------------------------------------------------------


def test_load_image_folder_lists_image_files_sorted_and_skips_other_files(category):
    folder = category / "train" / "good"
    (folder / "nested").mkdir()
    write_image(folder / "nested" / "inner.png", 4, 4)
    assert load_image_folder(folder) == [str(folder / n) for n in ("000.png", "001.jpg", "002.png")]
    assert load_image_folder(str(folder)) == load_image_folder(folder)


def test_load_image_folder_rejects_missing_file_and_imageless_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(repr(str(tmp_path / "missing")))):
        load_image_folder(tmp_path / "missing")
    a_file = write_image(tmp_path / "image.png", 4, 4)
    with pytest.raises(ValueError, match="is a file; a directory is expected"):
        load_image_folder(a_file)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match=re.escape(repr(str(empty))) + " holds no image files"):
        load_image_folder(empty)


# --------------------------------------------------------------------------
# load_masks
# --------------------------------------------------------------------------


def test_load_masks_resizes_masks_like_their_images(tmp_path):
    # 32 x 32 halved to 16 x 16: the block rows 8-15, columns 0-7 lands on rows 4-7, columns 0-3.
    image = write_image(tmp_path / "a.png", 32, 32)
    mask = write_mask(tmp_path / "a_mask.png", 32, 32, (8, 16, 0, 8))
    masks = load_masks([mask], [image], image_size=16, crop_size=None)
    expected = np.zeros((1, 16, 16), dtype=bool)
    expected[0, 4:8, 0:4] = True
    assert masks.dtype == bool
    np.testing.assert_array_equal(masks, expected)


def test_load_masks_centre_crops_masks_like_their_images(tmp_path):
    # 40 x 40 -> 20 x 20, then the centre 10 x 10 (offset 5): the block rows 10-29,
    # columns 10-19 becomes rows 5-14, columns 5-9, i.e. the crop's left half.
    image = write_image(tmp_path / "a.png", 40, 40)
    mask = write_mask(tmp_path / "a_mask.png", 40, 40, (10, 30, 10, 20))
    masks = load_masks([mask], [image], image_size=20, crop_size=10)
    expected = np.zeros((1, 10, 10), dtype=bool)
    expected[0, :, :5] = True
    np.testing.assert_array_equal(masks, expected)


def test_load_masks_takes_a_fitted_geometry_such_as_a_box_fitted_to_the_training_images(tmp_path):
    # 20 x 40 letterboxed into a 16 x 16 box: 8 x 16, padded by 4 rows above and below.
    from skpatchcore.utils._geometry import Geometry

    image = write_image(tmp_path / "a.png", 20, 40)
    mask = write_mask(tmp_path / "a_mask.png", 20, 40, (0, 20, 0, 20))
    masks = load_masks([mask], [image], geometry=Geometry(None, 16, "fit"))
    expected = np.zeros((1, 16, 16), dtype=bool)
    expected[0, 4:12, :8] = True
    np.testing.assert_array_equal(masks, expected)


def test_load_masks_gives_zeros_for_good_images_at_their_model_input_size(tmp_path):
    image = write_image(tmp_path / "good.png", 30, 40)
    # Shorter side 30 -> 20, longer side int(20 * 40 / 30) = 26.
    masks = load_masks([None], [image], image_size=20, crop_size=None, resize_side="shorter")
    assert masks.shape == (1, 20, 26)
    assert not masks.any()


@pytest.mark.parametrize("on_value, mode", [(255, "L"), (1, "L"), (255, "RGB"), (255, "1")])
def test_load_masks_reads_0_1_0_255_colour_and_bilevel_mask_files_alike(tmp_path, on_value, mode):
    image = write_image(tmp_path / "a.png", 24, 24)
    reference = write_mask(tmp_path / "reference.png", 24, 24, (4, 12, 6, 18))
    other = write_mask(tmp_path / "other.png", 24, 24, (4, 12, 6, 18), on_value=on_value)
    with Image.open(other) as mask:
        mask.convert(mode).save(other)
    expected = load_masks([reference], [image], image_size=12, crop_size=10)
    assert expected.any()
    np.testing.assert_array_equal(load_masks([other], [image], image_size=12, crop_size=10), expected)


def test_load_masks_stacks_masks_of_images_with_different_sizes_once_cropped(tmp_path):
    images = [write_image(tmp_path / "a.png", 30, 40), write_image(tmp_path / "b.png", 50, 20)]
    masks_files = [write_mask(tmp_path / "a_mask.png", 30, 40, (0, 30, 0, 40)), None]
    masks = load_masks(masks_files, images, image_size=16, crop_size=12)
    assert masks.shape == (2, 12, 12)
    assert masks[0].all() and not masks[1].any()
    assert load_masks(masks_files, images, image_size=(14, 18), crop_size=None).shape == (2, 14, 18)


def test_load_masks_follow_a_letterbox(tmp_path):
    # A 30 x 40 image whose mask is all defect: letterboxed to 16 x 16 it fills rows 2..13.
    images = [write_image(tmp_path / "a.png", 30, 40)]
    masks = load_masks(
        [write_mask(tmp_path / "a_mask.png", 30, 40, (0, 30, 0, 40))],
        images,
        image_size=16,
        crop_size=16,
        resize_side="longer",
    )
    expected = np.zeros((1, 16, 16), dtype=bool)
    expected[0, 2:14] = True
    np.testing.assert_array_equal(masks, expected)


def test_load_masks_names_crop_size_when_sizes_cannot_be_stacked(tmp_path):
    images = [write_image(tmp_path / "a.png", 30, 40), write_image(tmp_path / "b.png", 50, 20)]
    with pytest.raises(
        ValueError, match=r"different sizes \(16x21 for .*a\.png.*, 40x16 for .*b\.png.*'crop_size'"
    ):
        load_masks([None, None], images, image_size=16, crop_size=None, resize_side="shorter")


def test_load_masks_rejects_mismatched_lengths_sizes_and_parameters(tmp_path):
    image = write_image(tmp_path / "a.png", 20, 20)
    mask = write_mask(tmp_path / "a_mask.png", 20, 22, (0, 2, 0, 2))
    with pytest.raises(ValueError, match="same length.*got 2 and 1"):
        load_masks([None, None], [image])
    with pytest.raises(ValueError, match=r"a_mask\.png' is 20x22 but its image .*a\.png' is 20x20"):
        load_masks([mask], [image])
    with pytest.raises(ValueError, match=r"'crop_size'.*got -3"):
        load_masks([None], [image], crop_size=-3)
    with pytest.raises(ImageReadError, match=r"The image .*missing\.png.*no such file"):
        load_masks([None], [tmp_path / "missing.png"])


# --------------------------------------------------------------------------
# Real data sets (skipped when absent)
# --------------------------------------------------------------------------

needs_mpdd = pytest.mark.skipif(not MPDD.is_dir(), reason=f"MPDD metal_plate not found at {MPDD}")
needs_magnetic_tile = pytest.mark.skipif(
    not MAGNETIC_TILE.is_dir(), reason=f"Magnetic tile not found at {MAGNETIC_TILE}"
)


@needs_mpdd
def test_mpdd_metal_plate_loads_with_the_counts_of_its_source_file():
    data = load_mvtec_category(MPDD)
    assert data.name == "metal_plate"
    assert len(data.train_paths) == 54
    assert np.sum(data.test_labels == 1) == 26
    assert np.sum(data.test_labels == -1) == 71
    assert set(data.test_defect_types) == {"good", "defect"}
    assert sum(mask is not None for mask in data.test_mask_paths) == 71


@needs_mpdd
def test_mpdd_masks_at_the_reference_geometry_have_a_sensible_defect_fraction():
    data = load_mvtec_category(MPDD)
    masks = load_masks(
        data.test_mask_paths, data.test_paths, image_size=256, crop_size=224, resize_side="shorter"
    )
    defective = data.test_labels == -1
    assert masks.shape == (97, 224, 224)
    assert not masks[~defective].any()
    assert masks[defective].any(axis=(1, 2)).all()  # 512 -> 256 -> 224 keeps every defect here
    assert 0.01 < masks[defective].mean() < 0.5


@needs_magnetic_tile
def test_magnetic_tile_loads_with_the_counts_of_its_source_file():
    data = load_mvtec_category(MAGNETIC_TILE)
    assert len(data.train_paths) == 754
    assert np.sum(data.test_labels == 1) == 188
    assert np.sum(data.test_labels == -1) == 388
    counts = {t: data.test_defect_types.count(t) for t in set(data.test_defect_types)}
    assert counts == {"good": 188, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 99}


@needs_magnetic_tile
def test_magnetic_tile_centre_crop_cuts_whole_defects_out_of_163_images():
    # DESIGN.md section 4: the reference geometry removes the whole defect from 163 of 388 images.
    data = load_mvtec_category(MAGNETIC_TILE)
    masks = load_masks(
        data.test_mask_paths, data.test_paths, image_size=256, crop_size=224, resize_side="shorter"
    )
    defective = data.test_labels == -1
    assert masks.shape == (576, 224, 224)
    assert np.sum(~masks[defective].any(axis=(1, 2))) == 163
