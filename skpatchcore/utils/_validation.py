"""Input checks shared by the coreset sampler and the detector."""

from __future__ import annotations

import numpy as np
from sklearn.utils.validation import check_array, column_or_1d, validate_data


def check_patch_features(estimator, X, *, reset: bool) -> np.ndarray:
    """Validate patch features and set or check ``n_features_in_``.

    Accepts ``(n_images, h, w, n_features)`` arrays from
    :class:`~skpatchcore.PatchFeatureTransformer` or ``(n_vectors, n_features)``
    arrays of plain vectors (each row is then an "image" of one patch).
    A masked array is validated on its data; the caller reads the mask.
    Returns a float32 array (no copy when ``X`` already is one).
    """
    data = X.data if isinstance(X, np.ma.MaskedArray) else X
    ndim = getattr(data, "ndim", None)
    if ndim is None:
        data = np.asarray(data) if not hasattr(data, "__array__") else data
    if getattr(data, "ndim", 2) == 4:
        data = check_array(
            data, allow_nd=True, dtype=np.float32, ensure_all_finite=True, input_name="X", order="C"
        )
        if data.shape[0] == 0 or data.shape[1] == 0 or data.shape[2] == 0:
            raise ValueError(f"X has no patches: shape {data.shape}.")
        n_features = data.shape[-1]
        if reset:
            estimator.n_features_in_ = n_features
        elif n_features != estimator.n_features_in_:
            raise ValueError(
                f"X has {n_features} features per patch, but {type(estimator).__name__} was fitted "
                f"with {estimator.n_features_in_}: use the same feature settings (backbone, layers, "
                "target_dim, aggregation) as at fit time."
            )
        return data
    if getattr(data, "ndim", 2) not in (1, 2):
        raise ValueError(
            "X must be patch features of shape (n_images, h, w, n_features) from "
            f"PatchFeatureTransformer, or vectors of shape (n_vectors, n_features); got "
            f"{data.ndim}-D shape {data.shape}."
        )
    return validate_data(estimator, data, reset=reset, dtype=np.float32, order="C")


def check_labels(y, n_images: int) -> np.ndarray | None:
    """Boolean mask of the good images, from outlier labels (+1 good, -1 defective)."""
    if y is None:
        return None
    y = column_or_1d(y, warn=True)
    if len(y) != n_images:
        raise ValueError(f"y has {len(y)} labels but X has {n_images} images.")
    values = np.unique(y)
    if not np.isin(values, (-1, 1)).all():
        raise ValueError(
            "y must hold outlier labels, +1 for good and -1 for defective images; got values "
            f"{values.tolist()[:10]}."
        )
    good = y == 1
    if not good.any():
        raise ValueError("y marks every image as defective (-1); at least one good image (+1) is needed.")
    return good
