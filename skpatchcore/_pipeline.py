"""PatchCorePipeline and make_patchcore: images in, scores and heat maps out."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._coreset import GreedyCoresetSampler
from ._detector import PatchCoreDetector
from ._features import PatchFeatureTransformer
from ._fitting import chunkable_steps, fit_in_chunks, grow_in_chunks
from .utils._images import ImageReadError, SkippedImagesWarning

_STEPS = (
    ("features", PatchFeatureTransformer),
    ("coreset", GreedyCoresetSampler),
    ("detector", PatchCoreDetector),
)


class PatchCorePipeline(Pipeline):
    """A :class:`~sklearn.pipeline.Pipeline` that also returns heat maps.

    A plain Pipeline cannot route ``predict_map``: the detector needs the model
    input size, which only the feature step knows. This subclass adds
    :meth:`predict_map` and :meth:`anomaly_score` and is otherwise a Pipeline
    (``clone``, ``set_params(coreset__ratio=...)``, ``GridSearchCV``,
    ``memory=`` caching, pickling all work as usual). Its first step must be a
    :class:`PatchFeatureTransformer` and its last a :class:`PatchCoreDetector`;
    :func:`make_patchcore` builds one.

    Parameters
    ----------
    steps : list of (str, estimator) tuples
        As for :class:`~sklearn.pipeline.Pipeline`.
    transform_input : list of str, default=None
        As for :class:`~sklearn.pipeline.Pipeline`.
    memory : str or object with the joblib.Memory interface, default=None
        Caches the fitted transformers (e.g. the CNN features).
    verbose : bool, default=False
        Print the time of each step.

    See Also
    --------
    make_patchcore : Build this pipeline from the steps' parameters.

    Notes
    -----
    **Memory.** With the three skpatchcore steps (and no ``memory``, fit
    parameters or ``verbose``), :meth:`fit` of a set that the coreset step
    streams (``strategy="stream"``, or ``"auto"`` beyond 2,097,152 patch
    vectors) computes the features one chunk of images at a time
    (``chunk_size`` patch vectors) and keeps only the bank, the chunk coresets
    not yet reduced and the features of the images that calibrate the
    threshold: its memory stops growing with the training set beyond the
    bank. :meth:`partial_fit` works the same way on any number of new images.
    The coreset step's ``coreset_`` and the detector's ``memory_bank_`` are
    then one array, held, pickled and saved once.
    """

    def fit(self, X, y=None, **params):
        """Fit the steps; a streamed coreset reads the features chunk by chunk (see Notes).

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Good images (and defective ones, when ``y`` says which), as for
            :class:`PatchFeatureTransformer`.
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective.
        **params : dict
            Fit parameters of the steps, as for :class:`~sklearn.pipeline.Pipeline`.

        Returns
        -------
        self : PatchCorePipeline
            The fitted pipeline.
        """
        steps = chunkable_steps(self)
        if steps is None or params or self.memory is not None or self.verbose or self.transform_input:
            super().fit(X, y, **params)
            self._share_bank()
            return self
        self._validate_params()
        self._validate_steps()
        features, sampler, detector = steps
        features.fit(X, y)
        fit_in_chunks(features, sampler, detector, X, y)
        self._share_bank()
        return self

    def partial_fit(self, X, y=None):
        """Add good images to the fitted model without refitting it.

        The coreset step continues its greedy selection over the new images'
        patches with the current bank as centres already chosen, until the
        bank holds its size (``ratio``) of all patches seen (see
        :meth:`GreedyCoresetSampler.partial_fit`); the detector adds the new
        kept patches to its bank and recalibrates the threshold on up to 16
        of the new images (see :meth:`PatchCoreDetector.partial_fit`). The
        features are computed a chunk of images at a time. On an unfitted
        pipeline this is :meth:`fit`.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            The new images, as for :meth:`fit`.
        y : array of shape (n_images,), default=None
            Optional labels, +1 good / -1 defective; only good images are added.

        Returns
        -------
        self : PatchCorePipeline
            The grown pipeline.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import make_patchcore
        >>> images = np.random.default_rng(0).integers(96, 160, (5, 64, 64, 3), dtype=np.uint8)
        >>> model = make_patchcore(backbone="efficientnet_lite0", image_size=64, crop_size=None,
        ...                        ratio=0.25, random_state=0, device="cpu").fit(images[:3])
        >>> len(model.named_steps["detector"].memory_bank_)  # 25 % of 3 x 64 patches
        48
        >>> len(model.partial_fit(images[3:]).named_steps["detector"].memory_bank_)  # of 5 x 64
        80
        """
        steps = chunkable_steps(self)
        if steps is None:
            raise TypeError(
                "partial_fit needs a PatchFeatureTransformer, GreedyCoresetSampler and PatchCoreDetector "
                f"pipeline; this one has steps {[type(step).__name__ for _, step in self.steps]}."
            )
        features, sampler, detector = steps
        if not hasattr(detector, "memory_bank_"):
            return self.fit(X, y)
        self._share_bank()
        if not hasattr(sampler, "coreset_"):
            raise ValueError(
                "The coreset step does not know which vectors it kept (its coreset_ is missing and the "
                "detector's memory bank does not hold the same number of vectors), so partial_fit cannot "
                "continue its selection; fit the pipeline again."
            )
        grow_in_chunks(features, sampler, detector, X, y)
        return self

    def _share_bank(self) -> None:
        """Make the coreset step's ``coreset_`` and the detector's ``memory_bank_`` one array.

        They hold the same vectors after any fit; one array halves the memory
        and the model file. A coreset step from skpatchcore 0.1 (no
        ``coreset_``) takes the detector's bank.
        """
        steps = chunkable_steps(self)
        if steps is None or not hasattr(steps[2], "memory_bank_") or not hasattr(steps[1], "sample_indices_"):
            return
        _, sampler, detector = steps
        bank, coreset = detector.memory_bank_, getattr(sampler, "coreset_", None)
        if coreset is bank:
            return
        if coreset is None:
            if len(bank) == len(sampler.sample_indices_):
                sampler.coreset_ = bank
        elif coreset.shape == bank.shape and np.array_equal(coreset, bank):
            sampler.coreset_ = bank

    # Pickles (joblib) store the shared bank once: the coreset step goes without
    # its coreset_ and takes the detector's bank again when loaded.
    def __getstate__(self):
        state = super().__getstate__()
        steps = chunkable_steps(self)
        if steps is not None and getattr(steps[1], "coreset_", None) is getattr(
            steps[2], "memory_bank_", False
        ):
            sampler = object.__new__(type(steps[1]))
            sampler.__dict__.update(steps[1].__dict__)
            del sampler.coreset_
            state = dict(state)
            state["steps"] = [(name, sampler if step is steps[1] else step) for name, step in self.steps]
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._share_bank()

    def _streamed(self, X, output_size_wanted: bool, on_error: str = "raise"):
        """Image scores and (optionally) maps, batch by batch from the feature step.

        The middle steps must pass features through at predict time (the
        coreset sampler does), so each batch of features goes straight from the
        backbone to the search on the same device: no host round trip on a GPU,
        and the features of the whole set are never held at once.
        """
        check_is_fitted(self)
        features_step, detector = self.steps[0][1], self.steps[-1][1]
        if not isinstance(features_step, PatchFeatureTransformer):
            raise TypeError(
                "predict_map needs a PatchFeatureTransformer as the first step to know the model "
                f"input size; got {type(features_step).__name__}."
            )
        for name, step in self.steps[1:-1]:
            if not (step == "passthrough" or step is None or isinstance(step, GreedyCoresetSampler)):
                raise TypeError(
                    f"predict_map streams features from the first step to the detector; step {name!r} "
                    f"({type(step).__name__}) would change them. Use a PatchFeatureTransformer, "
                    "GreedyCoresetSampler and PatchCoreDetector pipeline."
                )
        if on_error not in ("raise", "skip"):
            raise ValueError(f"The 'on_error' parameter must be 'raise' or 'skip'; got {on_error!r}.")
        batches, input_size, n_images, failed = features_step._feature_batches(X, on_error)
        maps = scores = None
        for rows, features in batches:
            if features.shape[-1] != detector.n_features_in_:
                detector._validated(features[:1].cpu().numpy())  # raises the usual message
            batch_maps, batch_scores = detector._map_tensors(
                features, input_size if output_size_wanted else None
            )
            if scores is None:
                scores = np.full(n_images, np.nan, dtype=np.float32)
                maps = (
                    np.full((n_images, *batch_maps.shape[1:]), np.nan, dtype=np.float32)
                    if output_size_wanted
                    else None
                )
            scores[rows] = batch_scores.cpu().numpy()
            if output_size_wanted:
                maps[rows] = batch_maps.cpu().numpy()
        if failed:
            warnings.warn(SkippedImagesWarning(failed), stacklevel=3)
            if scores is None:  # every image failed while decoding
                raise ImageReadError("No image of X could be read: " + "; ".join(failed.values())[:2000])
        return maps, scores

    def predict_map(self, X, *, return_scores: bool = False, on_error: str = "raise"):
        """Anomaly heat maps of images at the model input size.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images, as for :class:`PatchFeatureTransformer`.
        return_scores : bool, default=False
            Also return the image anomaly scores (same pass, no extra cost).
        on_error : {"raise", "skip"}, default="raise"
            ``"skip"``: an image that cannot be read (missing, truncated, not an
            image, 16-bit, alpha channel, ...) gets NaN map and score instead of
            stopping the whole call; a :class:`~skpatchcore.SkippedImagesWarning`
            lists each skipped position and why.

        Returns
        -------
        maps : ndarray of shape (n_images, H, W), float32
            Higher = more anomalous; (H, W) is the model input size, after the
            resize and crop or letterbox (with the defaults, the box fitted to
            the training images: 320 x 320 for square images).
        scores : ndarray of shape (n_images,)
            Only when ``return_scores=True``.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import make_patchcore
        >>> images = np.random.default_rng(0).integers(96, 160, (4, 64, 64, 3), dtype=np.uint8)
        >>> model = make_patchcore(backbone="efficientnet_lite0", image_size=64, crop_size=None,
        ...                        random_state=0, device="cpu").fit(images[:3])
        >>> maps, scores = model.predict_map(images[3:], return_scores=True)
        >>> maps.shape, scores.shape
        ((1, 64, 64), (1,))
        """
        maps, scores = self._streamed(X, output_size_wanted=True, on_error=on_error)
        return (maps, scores) if return_scores else maps

    def anomaly_score(self, X, *, on_error: str = "raise"):
        """Image anomaly scores, higher = more anomalous.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images.
        on_error : {"raise", "skip"}, default="raise"
            As in :meth:`predict_map`: skipped images score NaN.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            The paper's image scores.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import make_patchcore
        >>> images = np.random.default_rng(0).integers(96, 160, (4, 64, 64, 3), dtype=np.uint8)
        >>> model = make_patchcore(backbone="efficientnet_lite0", image_size=64, crop_size=None,
        ...                        random_state=0, device="cpu").fit(images[:3])
        >>> scores = model.anomaly_score(images[3:])
        >>> bool(np.allclose(scores, -model.score_samples(images[3:])))
        True
        """
        return self._streamed(X, output_size_wanted=False, on_error=on_error)[1]


def make_patchcore(*, memory=None, **params) -> PatchCorePipeline:
    """Build a PatchCore pipeline from the three steps' parameters.

    Each keyword goes to every step that has a parameter of that name
    (``device`` and ``verbose`` reach all steps that have them), so
    ``make_patchcore(backbone="efficientnet_lite0", ratio=0.01, random_state=0)``
    needs no ``step__`` prefixes.

    Parameters
    ----------
    memory : str or object with the joblib.Memory interface, default=None
        Passed to the pipeline to cache fitted transformers.
    **params : dict
        Parameters of :class:`PatchFeatureTransformer` (``backbone``,
        ``layers``, ``weights``, ``image_size``, ``crop_size``, ...),
        :class:`GreedyCoresetSampler` (``ratio``, ``random_state``, ...) and
        :class:`PatchCoreDetector` (``n_neighbors``, ``contamination``, ...).

    Returns
    -------
    pipeline : PatchCorePipeline
        Steps named ``"features"``, ``"coreset"`` and ``"detector"``.

    Examples
    --------
    >>> from skpatchcore import make_patchcore
    >>> model = make_patchcore(backbone="efficientnet_lite0", ratio=0.1, random_state=0)
    >>> [name for name, _ in model.steps]
    ['features', 'coreset', 'detector']
    >>> model.get_params()["coreset__ratio"]
    0.1
    """
    accepted = {name: set(inspect.signature(cls.__init__).parameters) - {"self"} for name, cls in _STEPS}
    unknown = sorted(set(params) - set().union(*accepted.values()))
    if unknown:
        raise TypeError(
            f"make_patchcore() got unknown parameter(s) {unknown}. Accepted: "
            + "; ".join(f"{name}: {sorted(names)}" for name, names in accepted.items())
        )
    steps = [
        (name, cls(**{key: value for key, value in params.items() if key in accepted[name]}))
        for name, cls in _STEPS
    ]
    return PatchCorePipeline(steps, memory=memory)
