"""PatchCorePipeline and make_patchcore: images in, scores and heat maps out."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._detector import PatchCoreDetector
from ._features import PatchFeatureTransformer
from .coreset import GreedyCoresetSampler
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
    """

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
            Higher = more anomalous; (H, W) is the resized and cropped input size
            (320 x 320 with the defaults).
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
