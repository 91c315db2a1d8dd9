"""GreedyCoresetSampler: PatchCore's greedy (k-center) coreset of the patch features."""

from __future__ import annotations

import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, RealNotInt, StrOptions
from sklearn.utils.validation import check_is_fitted
from tqdm.auto import tqdm

from ..utils._buffers import empty_buffer
from ..utils._device import resolve_device
from ..utils._pickling import VersionedPickleMixin
from ..utils._validation import check_labels, check_patch_features
from ._selection import Candidates, Selector, draw_projection, select
from ._stream import MergeReduce, Shares, bank_size

# With strategy="auto", training sets of up to this many candidate patch vectors
# get the exact selection (about 1,300 images of 40 x 40 patches, the defaults for
# square images; 1.2 GB of 152-value features); larger ones are streamed.
AUTO_EXACT_PATCHES = 1 << 21


class GreedyCoresetSampler(VersionedPickleMixin, TransformerMixin, BaseEstimator):
    """Greedy coreset of patch features: the vectors that enter the memory bank.

    The greedy (minimax facility location, k-center) coreset of PatchCore
    (Roth et al. 2022, Algorithm 1): all patch vectors are projected once with
    a random Gaussian map to ``projection_dim`` dimensions; starting from each
    point's mean distance to ``n_starts`` random points, the point farthest from
    the current coreset is added and every point's distance to the coreset is
    lowered, until the bank holds its size (``ratio``). The kept vectors are
    the original, unprojected ones.

    In a :class:`~sklearn.pipeline.Pipeline`, :meth:`fit_transform` returns the
    features unchanged in shape as a :class:`numpy.ma.MaskedArray` whose mask
    hides the patches not kept, so the number of images (and ``y``) still
    matches; :meth:`transform` passes features through untouched (at test time
    every patch is scored). Alone, on an (n, d) array, use
    :attr:`sample_indices_` or :attr:`coreset_`.

    Parameters
    ----------
    ratio : float or int, default=0.1
        Size of the bank. A float in (0, 1] is the fraction of the patch
        vectors kept (at least one; 1.0 keeps all without running the greedy
        loop). An int >= 1 is a number of vectors (at most all), as
        ``max_samples`` of :class:`~sklearn.ensemble.IsolationForest`: on large
        training sets a fixed fraction makes the bank, and every prediction,
        grow with the set. Note ``1`` keeps one vector and ``1.0`` all.
    projection_dim : int, default=256
        Dimension of the random projection used only for choosing. When the
        features have at most this many dimensions they are used as they are.
        The reference code uses 128. Projecting the 152-dimensional default
        features of efficientnet_lite0 down to 128 lowered image AUROC on
        Magnetic Tile at 1 % (measured in 0.1: 0.789 -> 0.768 with the
        shorter side at 320 px and a 288 px centre crop, 0.888 -> 0.878 at
        the 320 px square letterbox); the default keeps small features whole,
        so their distances are exact.
    n_starts : int, default=10
        Number of random points whose mean distance starts the search.
    strategy : {"auto", "exact", "stream"}, default="auto"
        ``"exact"``: one greedy selection over all candidates (time grows with
        patches x picks: with the square of the training set at a fixed
        ratio). ``"stream"``: merge and reduce over chunks of ``chunk_size``
        vectors (see Notes): time and memory grow linearly. ``"auto"``: exact
        up to 2,097,152 candidate vectors (about 1,300 images at the default
        320 px and efficientnet_lite0), streamed beyond.
    chunk_size : int, default=65536
        Patch vectors per chunk (rounded down to whole images, at least one)
        for streaming and for :meth:`partial_fit`: with the default 152-value
        features 40 MB, 40 images of 40 x 40 patches. What a streamed fit or
        a ``partial_fit`` holds at a time is one chunk, the chunk coresets not
        yet reduced (less than two chunks) and the bank. Every greedy call of
        a streamed fit sees at most two chunks, so its time per image grows
        with ``chunk_size x ratio``; larger chunks come closer to the exact
        selection (262,144 took about 1 CPU second per image at ratio 0.1 on
        a 2-core machine).
    random_state : int, RandomState instance or None, default=None
        Seeds the projection and the start points.
    device : str or torch.device, default="auto"
        ``"cpu"`` runs the exact pruned loop in NumPy; a CUDA device runs the
        plain loop on the GPU. ``"auto"`` picks CUDA when available.
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    sample_indices_ : ndarray of shape (n_kept,)
        Indices of the kept vectors into ``X.reshape(-1, n_features_in_)``, in
        the order they were chosen (streamed: pool by pool). After
        :meth:`partial_fit`, into the vectors of every ``X`` seen, one after
        the other (``fit``'s, then each ``partial_fit``'s).
    coreset_ : ndarray of shape (n_kept, n_features)
        The kept vectors, unprojected, in the order of their positions
        (``np.sort(sample_indices_)``): the centres :meth:`partial_fit`
        continues from.
    projection_ : ndarray of shape (n_features, projection_dim) or None
        The random projection used for choosing (None: the vectors as they are).
    n_features_in_ : int
        Length of each feature vector.
    n_patches_seen_ : int
        Number of candidate patch vectors (those of good images) seen: the
        bank's size is ``ratio`` of it.
    n_vectors_seen_ : int
        Number of vectors of every ``X`` seen (defective images' too).

    See Also
    --------
    PatchFeatureTransformer : Computes the patch features.
    PatchCoreDetector : Builds the memory bank from the kept vectors.

    Notes
    -----
    When ``y`` is given (+1 good, -1 defective), only patches of good images are
    candidates, and defective images are fully masked.

    **Streaming** (merge and reduce): the candidates are cut into chunks of
    whole images; each chunk gets its own greedy coreset, four times its share
    of the bank; the chunk coresets are pooled in order, and whenever the pool
    holds a chunk's worth of vectors (and at the end) a greedy coreset of the
    pool, of exactly its share of the bank, enters the bank. Every greedy call
    sees at most two chunks of vectors, so time grows linearly with the
    training set; the bank has the exact selection's size. Each chunk's and
    each pool's start points are drawn from their own seed, derived from
    ``random_state``.

    **partial_fit** continues the selection over new patches with the current
    bank as centres already chosen. Precisely, for each chunk of the new
    candidates (``chunk_size`` vectors of whole images, in order): with ``n``
    the candidates seen so far including this chunk, and ``bank_size(n)`` =
    ``max(1, int(ratio * n))`` (float ratio) or ``min(ratio, n)`` (int), the
    greedy loop picks ``min(len(chunk), bank_size(n) - len(coreset_))`` of
    the chunk's vectors (none when that is not positive), where each new
    vector's running distance starts as its distance to the nearest vector of
    ``coreset_``; both are projected with ``projection_``, the projection of
    the first fit. The picks join ``coreset_`` before the next chunk. No
    random number is drawn. So after the call the bank holds ``bank_size`` of
    all candidates seen; an int ``ratio`` is a cap (raise it with
    ``set_params`` to let new images in); the ``ratio`` in force at each call
    applies. ``partial_fit`` on an unfitted sampler is :meth:`fit`.

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
    >>> sampler.partial_fit(X[:200]).coreset_.shape  # 5 % of 1,200 vectors
    (60, 16)
    """

    _parameter_constraints: dict = {
        "ratio": [Interval(RealNotInt, 0.0, 1.0, closed="right"), Interval(Integral, 1, None, closed="left")],
        "projection_dim": [Interval(Integral, 1, None, closed="left")],
        "n_starts": [Interval(Integral, 1, None, closed="left")],
        "strategy": [StrOptions({"auto", "exact", "stream"})],
        "chunk_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "device": [str, torch.device, None],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        ratio=0.1,
        *,
        projection_dim=256,
        n_starts=10,
        strategy="auto",
        chunk_size=65536,
        random_state=None,
        device="auto",
        verbose=0,
    ):
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.n_starts = n_starts
        self.strategy = strategy
        self.chunk_size = chunk_size
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

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Add patches to the coreset, continuing the selection from it (see Notes).

        Parameters
        ----------
        X : array of shape (n_images, h, w, n_features) or (n_vectors, n_features)
            Patch features of new images, with as many features as at fit.
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective; only good images' patches
            can be chosen.

        Returns
        -------
        self : GreedyCoresetSampler
            The sampler, its bank grown to ``ratio`` of all candidates seen.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import GreedyCoresetSampler
        >>> rng = np.random.default_rng(0)
        >>> sampler = GreedyCoresetSampler(ratio=0.1, random_state=0)
        >>> sampler.partial_fit(rng.normal(size=(300, 8)).astype(np.float32))  # a first fit
        GreedyCoresetSampler(random_state=0)
        >>> far = rng.normal(loc=20.0, size=(200, 8)).astype(np.float32)
        >>> sampler.partial_fit(far).sample_indices_.shape  # 10 % of 500
        (50,)
        >>> int((sampler.sample_indices_ >= 300).sum())  # the 20 new picks come from the new vectors
        20
        """
        if not hasattr(self, "sample_indices_"):
            return self._fit(check_patch_features(self, X, reset=True), y)
        X = check_patch_features(self, X, reset=False)
        candidates = Candidates(X, check_labels(y, len(X)))
        with tqdm(desc="Coreset", unit="pt", disable=not self.verbose) as progress:
            self._continue(candidates.chunks(self.chunk_size), candidates.n, progress)
        self.n_vectors_seen_ += candidates.n_vectors
        return self

    def _fit(self, X, y):
        """:meth:`fit` on features already validated."""
        candidates = Candidates(X, check_labels(y, len(X)))
        with tqdm(desc="Coreset", unit="pt", disable=not self.verbose) as progress:
            if self._streams(candidates.n):
                chunk_vectors = candidates.chunk_images(self.chunk_size) * candidates.per_image
                stream = self._open_stream(candidates.n, chunk_vectors, progress)
                for index, (start, stop, vectors, positions) in enumerate(candidates.chunks(self.chunk_size)):
                    chosen = stream.select_chunk(vectors, start, index)
                    stream.add(vectors[chosen], positions[chosen], stop)
                self._close_stream(stream, candidates.n, candidates.n_vectors)
                return self
            rng = check_random_state(self.random_state)
            projection = draw_projection(rng, candidates.n_features, self.projection_dim)
            vectors, positions = candidates.take(0, len(candidates.images))
            n_select = bank_size(self.ratio, len(vectors))
            progress.total = n_select
            if n_select < len(vectors):
                starts = rng.choice(len(vectors), size=min(self.n_starts, len(vectors)), replace=False)
                device = resolve_device(self.device)
                positions = positions[select(vectors, n_select, projection, device, progress, starts=starts)]
        bank = X.reshape(-1, candidates.n_features)[np.sort(positions)]
        self._set_fitted(positions, bank, projection, candidates.n, candidates.n_vectors)
        return self

    def _streams(self, n_candidates: int) -> bool:
        """Whether a fit on ``n_candidates`` patch vectors is streamed (``strategy``)."""
        return self.strategy == "stream" or (self.strategy == "auto" and n_candidates > AUTO_EXACT_PATCHES)

    def _open_stream(self, n_candidates: int, chunk_vectors: int, progress=None) -> MergeReduce:
        """The merge-and-reduce state of a streamed fit of ``n_candidates`` vectors of
        ``n_features_in_`` values, in chunks of at most ``chunk_vectors``. Its ``selector``
        runs the chunks' selections (here, or shipped to Dask workers)."""
        rng = check_random_state(self.random_state)
        projection = draw_projection(rng, self.n_features_in_, self.projection_dim)
        selector = Selector(projection, self.n_starts, int(rng.randint(2**31 - 1)), self.device)
        stream = MergeReduce(
            Shares(self.ratio, n_candidates),
            chunk_vectors,
            self.n_features_in_,
            lambda vectors, n_select, key: selector(vectors, n_select, key, progress),
        )
        stream.selector = selector
        return stream

    def _close_stream(self, stream: MergeReduce, n_candidates: int, n_vectors: int) -> None:
        positions, bank = stream.finish()
        self._set_fitted(positions, bank, stream.selector.projection, n_candidates, n_vectors)

    def _set_fitted(self, positions, bank, projection, n_patches: int, n_vectors: int) -> None:
        self.sample_indices_ = positions
        self.coreset_ = bank
        self.projection_ = projection
        self.n_patches_seen_ = n_patches
        self.n_vectors_seen_ = n_vectors

    def _continue(self, chunks, n_new: int, progress=None) -> None:
        """The selection continued over ``chunks`` of ``n_new`` new candidates (see Notes).

        ``chunks`` yields ``(start, stop, vectors, positions)`` as
        :meth:`Candidates.chunks`, positions relative to the new ``X``. The
        bank grows in a buffer made once for its final size.
        """
        projection = self._growth_projection()
        kept, seen, offset = len(self.coreset_), self.n_patches_seen_, self.n_vectors_seen_
        capacity = max(kept, bank_size(self.ratio, seen + n_new))
        bank = self.coreset_
        if capacity > kept:
            bank = empty_buffer((capacity, self.n_features_in_), populate=False)
            bank[:kept] = self.coreset_
        device = resolve_device(self.device)
        picked = [self.sample_indices_]
        for start, stop, vectors, positions in chunks:
            n_select = min(stop - start, bank_size(self.ratio, seen + stop) - kept)
            if n_select <= 0:
                continue
            chosen = select(vectors, n_select, projection, device, progress, centres=bank[:kept])
            bank[kept : kept + n_select] = vectors[np.sort(chosen)]  # positions grow with the index
            picked.append(positions[chosen] + offset)
            kept += n_select
        self.sample_indices_ = np.concatenate(picked)
        self.coreset_ = bank[:kept]
        self.n_patches_seen_ = seen + n_new

    def _growth_projection(self):
        """The first fit's projection (models saved before it was stored: drawn again)."""
        if hasattr(self, "projection_"):
            return self.projection_
        if not hasattr(self, "coreset_"):
            raise AttributeError(
                "This GreedyCoresetSampler was fitted by an earlier skpatchcore that did not keep the "
                "coreset's vectors (coreset_), so partial_fit cannot continue its selection. Fit it again, "
                "or call partial_fit on the PatchCorePipeline it belongs to (which takes them from the "
                "detector's memory bank)."
            )
        if self.n_features_in_ > self.projection_dim and not isinstance(self.random_state, Integral):
            warnings.warn(
                "This GreedyCoresetSampler was fitted by an earlier skpatchcore that did not store its "
                "random projection, and random_state is not an int: partial_fit draws a new one.",
                UserWarning,
                stacklevel=3,
            )
        rng = check_random_state(self.random_state if isinstance(self.random_state, Integral) else None)
        self.projection_ = draw_projection(rng, self.n_features_in_, self.projection_dim)
        return self.projection_

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

    def _after_unpickle(self):
        # Pickled before streaming and partial_fit existed: their defaults, and the
        # count of vectors seen (only sample_indices_' numbering of later batches
        # depends on it; with labels the old count of all vectors is not known).
        self.__dict__.setdefault("strategy", "auto")
        self.__dict__.setdefault("chunk_size", 65536)
        if "sample_indices_" in self.__dict__ and "n_vectors_seen_" not in self.__dict__:
            self.n_vectors_seen_ = max(self.n_patches_seen_, int(self.sample_indices_.max()) + 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Features are float32 end to end (the bank and the faiss search are float32).
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags
