"""Detection quality on real photographs (skips where the data sets are absent)."""

from __future__ import annotations

from skpatchcore import make_patchcore
from skpatchcore.datasets import load_masks, load_mvtec_category
from skpatchcore.metrics import image_auroc, pixel_auroc

from .conftest import MPDD, needs


@needs(MPDD)
def test_mpdd_metal_plate_reaches_the_reference_codes_quality():
    # The reference implementation with the same backbone and settings measured 0.973 / 0.982.
    data = load_mvtec_category(MPDD)
    model = make_patchcore(
        backbone="efficientnet_lite0",
        aggregation="reference",
        image_size=256,
        crop_size=224,
        resize_side="shorter",
        pretrain_dim=1024,
        target_dim=1024,
        projection_dim=128,
        n_neighbors=1,
        ratio=0.1,
        random_state=0,
        device="cpu",
    )
    model.fit(data.train_paths)
    maps, scores = model.predict_map(data.test_paths, return_scores=True)
    masks = load_masks(
        data.test_mask_paths, data.test_paths, image_size=256, crop_size=224, resize_side="shorter"
    )
    assert image_auroc(data.test_labels, scores) >= 0.965
    assert pixel_auroc(masks, maps) >= 0.975
