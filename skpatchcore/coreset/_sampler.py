"""GreedyCoresetSampler: PatchCore's greedy (k-center) coreset of the patch features."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ..utils._buffers import empty_buffer
from ..utils._device import as_tensor, cpu_float32, float32_precision, resolve_device
from ..utils._pickling import VersionedPickleMixin
from ..utils._validation import check_labels, check_patch_features
from ._exact import greedy_indices_cpu
from ._plain import greedy_indices_torch


class GreedyCoresetSampler(VersionedPickleMixin, TransformerMixin, BaseEstimator):
    """Greedy coreset of patch features: the vectors that enter the memory bank.

    The greedy (minimax facility location, k-center) coreset of PatchCore
    (Roth et al. 2022, Algorithm 1): all patch vectors are projected once with
    a random Gaussian map to ``projection_dim`` dimensions; starting from each
    point's mean distance to ``n_starts`` random points, the point farthest from
    the current coreset is added and every point's distance to the coreset is
    lowered, until ``ratio`` of the points are kept. The kept vectors are the
    original, unprojected ones.

    In a :class:`~sklearn.pipeline.Pipeline`, :meth:`fit_transform` returns the
    features unchanged in shape as a :class:`numpy.ma.MaskedArray` whose mask
    hides the patches not kept, so the number of images (and ``y``) still
    matches; :meth:`transform` passes features through untouched (at test time
    every patch is scored). Alone, on an (n, d) array, use
    :attr:`sample_indices_`.

    Parameters
    ----------
    ratio : float, default=0.1
        Fraction of patch vectors kept, in (0, 1]. At least one is kept; 1.0
        keeps all without running the greedy loop.
    projection_dim : int, default=256
        Dimension of the random projection used only for choosing. When the
        features have at most this many dimensions they are used as they are.
        The reference code uses 128. Projecting the 152-dimensional default
        features of efficientnet_lite0 down to 128 lowered image AUROC on
        Magnetic Tile at 1 % (0.789 -> 0.768 at the earlier 288 px crop,
        0.888 -> 0.878 at the 320 px letterbox, where AUPRO rose 0.763 ->
        0.777); the default keeps small features whole, so their distances
        are exact.
    n_starts : int, default=10
        Number of random points whose mean distance starts the search.
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the start points (no global state is used).
    device : str or torch.device, default="auto"
        ``"cpu"`` runs the exact pruned loop in NumPy; a CUDA device runs the
        plain loop on the GPU. ``"auto"`` picks CUDA when available.
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    sample_indices_ : ndarray of shape (n_kept,)
        Indices of the kept vectors into ``X.reshape(-1, n_features_in_)``, in
        the order they were chosen.
    n_features_in_ : int
        Length of each feature vector.
    n_patches_seen_ : int
        Number of patch vectors the coreset was chosen from.

    See Also
    --------
    PatchFeatureTransformer : Computes the patch features.
    PatchCoreDetector : Builds the memory bank from the kept vectors.

    Notes
    -----
    When ``y`` is given (+1 good, -1 defective), only patches of good images are
    candidates, and defective images are fully masked.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import GreedyCoresetSampler
    >>> X = np.random.default_rng(0).normal(size=(1000, 16)).astype(np.float32)
    >>> sampler = GreedyCoresetSampler(ratio=0.05, random_state=0).fit(X)
    >>> sampler.sample_indices_.shape
    (50,)
    >>> X[sampler.sample_indices_].shape
    (50, 16)
    """

    _parameter_constraints: dict = {
        "ratio": [Interval(Real, 0.0, 1.0, closed="right")],
        "projection_dim": [Interval(Integral, 1, None, closed="left")],
        "n_starts": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "device": [str, torch.device, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self, ratio=0.1, *, projection_dim=256, n_starts=10, random_state=None, device="auto", verbose=0
    ):
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.n_starts = n_starts
        self.random_state = random_state
        self.device = device
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Choose the coreset.

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features (a 2-D array is a set of vectors, one "image" each).
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective; only good images' patches
            can be chosen.

        Returns
        -------
        self : GreedyCoresetSampler
            The fitted sampler.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> X = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32)
        >>> sampler = GreedyCoresetSampler(ratio=0.1, random_state=0).fit(X)
        >>> len(sampler.sample_indices_), sampler.n_patches_seen_
        (50, 500)
        """
        return self._fit(check_patch_features(self, X, reset=True), y)

    def _fit(self, X, y):
        """:meth:`fit` on features already validated."""
        good = check_labels(y, len(X))
        n_features = X.shape[-1]
        per_image = int(np.prod(X.shape[1:-1])) if X.ndim > 2 else 1
        candidates = np.arange(len(X)) if good is None else np.flatnonzero(good)
        # Without labels every patch is a candidate: a view, no copy of the features.
        vectors = X.reshape(-1, n_features) if good is None else X[candidates].reshape(-1, n_features)
        positions = (candidates[:, None] * per_image + np.arange(per_image)).ravel()

        n_select = max(1, int(len(vectors) * self.ratio))
        self.n_patches_seen_ = len(vectors)
        if n_select >= len(vectors):
            self.sample_indices_ = positions
            return self
        device = resolve_device(self.device)
        rng = check_random_state(self.random_state)
        with tqdm(total=n_select, desc="Coreset", unit="pt", disable=not self.verbose) as progress:
            chosen = _greedy(vectors, n_select, self.projection_dim, self.n_starts, rng, device, progress)
        self.sample_indices_ = positions[chosen]
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def fit_transform(self, X, y=None, **fit_params):
        """Choose the coreset and return ``X`` with the other patches masked.

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features.
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective.
        **fit_params : dict
            Ignored; accepted for pipeline compatibility.

        Returns
        -------
        X_masked : numpy.ma.MaskedArray, same shape as X
            The same values; the mask is True on every patch not in the coreset
            (it is a read-only broadcast view, costing no memory per feature).

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> features = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
        >>> masked = GreedyCoresetSampler(ratio=0.25, random_state=0).fit_transform(features)
        >>> masked.shape
        (2, 4, 4, 16)
        >>> int((~masked.mask[..., 0]).sum())  # patches kept: 25 % of 32
        8
        """
        # Validated once (float32 check and a pass over every value), for both steps.
        X = check_patch_features(self, X, reset=True)
        self._fit(X, y)
        kept = np.zeros(X.shape[:-1], dtype=bool).reshape(-1)
        kept[self.sample_indices_] = True
        mask = np.broadcast_to(~kept.reshape(*X.shape[:-1], 1), X.shape)
        return np.ma.MaskedArray(X, mask=mask, copy=False)

    def transform(self, X):
        """Pass features through unchanged (at test time every patch is scored).

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features.

        Returns
        -------
        X : ndarray
            The validated features, values unchanged.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> features = np.random.default_rng(0).normal(size=(2, 4, 4, 16)).astype(np.float32)
        >>> sampler = GreedyCoresetSampler(ratio=0.25, random_state=0).fit(features)
        >>> np.array_equal(sampler.transform(features), features)
        True
        """
        check_is_fitted(self)
        return check_patch_features(self, X, reset=False)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Features are float32 end to end (the bank and the faiss search are float32).
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags


def project(vectors: np.ndarray, projection: np.ndarray) -> np.ndarray:
    """``vectors @ projection`` on the CPU, in float32, into a new (n, k) array.

    The product runs in torch, like the loop's own products: NumPy's BLAS
    threads keep spinning for a while after a product, and that slowed the
    loop right after it by 30-50% on 2 cores.
    """
    points = empty_buffer((len(vectors), projection.shape[1]))
    with torch.inference_mode(), cpu_float32():
        torch.mm(as_tensor(vectors), torch.from_numpy(projection), out=torch.from_numpy(points))
    return points


def _greedy(vectors, n_select, projection_dim, n_starts, rng, device, progress) -> np.ndarray:
    """Project, draw the start points and run the greedy loop on ``device``."""
    n_features = vectors.shape[1]
    projection = None
    if n_features > projection_dim:
        projection = rng.standard_normal((n_features, projection_dim)).astype(np.float32)
        projection /= np.sqrt(projection_dim)
    starts = rng.choice(len(vectors), size=min(n_starts, len(vectors)), replace=False)
    if device.type == "cpu":
        points = np.ascontiguousarray(vectors) if projection is None else project(vectors, projection)
        return greedy_indices_cpu(points, n_select, starts, progress)
    with torch.inference_mode(), float32_precision():  # no TF32: the CPU's selection
        points = as_tensor(np.ascontiguousarray(vectors)).to(device)
        if projection is not None:
            points = points @ torch.from_numpy(projection).to(device)
        return greedy_indices_torch(points, n_select, torch.from_numpy(starts).to(device), progress)
