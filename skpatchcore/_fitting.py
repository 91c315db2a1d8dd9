"""Fitting and growing the three PatchCore steps chunk by chunk.

A streamed fit (:meth:`GreedyCoresetSampler` ``strategy="stream"``, or
``"auto"`` on a large set) and ``partial_fit`` never hold the features of the
whole training set: the good images are cut into chunks of whole images
(``chunk_size`` patch vectors), each chunk's features are computed, its
coreset chosen (or the selection continued over it) and its features
dropped. What stays is the bank, the chunk coresets not yet reduced and the
features of the few images that calibrate the threshold (16 images' worth at
most). :func:`chunk_result` is the work on one chunk: here, or on a Dask
worker (:func:`skpatchcore.parallel.fit_paths`), with the same result.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ._coreset import GreedyCoresetSampler
from ._coreset._stream import chunk_coreset
from ._detector import PatchCoreDetector, calibration_images
from ._features import PatchFeatureTransformer
from .utils._validation import check_labels


def chunkable_steps(pipeline) -> tuple | None:
    """The (features, coreset, detector) steps of ``pipeline``, or None if it has other steps."""
    steps = [step for _, step in pipeline.steps]
    kinds = (PatchFeatureTransformer, GreedyCoresetSampler, PatchCoreDetector)
    if len(steps) != 3 or not all(isinstance(step, kind) for step, kind in zip(steps, kinds)):
        return None
    return tuple(steps)


def subset(X, images: np.ndarray):
    """The images of ``X`` (an array or a sequence) at the positions ``images``."""
    if isinstance(X, np.ndarray) and X.dtype != object:
        return X[images]
    return [X[int(i)] for i in images]


def patch_grid(features: PatchFeatureTransformer, X) -> tuple[int, tuple[int, int, int]]:
    """The number of images of ``X`` and their features' shape ``(h, w, d)``, found by
    running the backbone on one blank image of the model input size."""
    _, input_size, n_images, _ = features._feature_batches(X)
    blank = torch.zeros((1, features.n_channels_, *input_size))
    return n_images, tuple(features._forward(blank).shape[1:])


class ChunkPlan:
    """The good images of ``X`` in chunks of whole images, and the calibration images.

    Candidates (the good images' patch vectors) are numbered image by image;
    chunk ``k`` holds the candidates ``bounds(k)``. ``picks`` are the good
    images whose out-of-fold scores calibrate the threshold.
    """

    def __init__(self, good_images: np.ndarray, per_image: int, chunk_size: int):
        self.per_image = per_image
        self.chunk_images = max(1, chunk_size // per_image)
        step = self.chunk_images
        self.chunks = [good_images[first : first + step] for first in range(0, len(good_images), step)]
        self.n_candidates = len(good_images) * per_image
        self.picks = calibration_images(good_images, per_image)

    def bounds(self, k: int) -> tuple[int, int]:
        start = k * self.chunk_images * self.per_image
        return start, start + len(self.chunks[k]) * self.per_image

    def positions(self, images: np.ndarray) -> np.ndarray:
        """The positions, among all vectors of ``X``, of the given images' vectors."""
        return (images[:, None] * self.per_image + np.arange(self.per_image)).ravel()


def chunk_result(features, images, image_numbers, n_select, select, index, picks):
    """The work on one chunk: its features, its coreset and its calibration images' features.

    Returns ``(kept vectors, their indices into the chunk's vectors, {image number:
    features})``; ``n_select`` vectors are kept (see :func:`chunk_coreset`).
    Runs where the images are read (this process, or a Dask worker).
    """
    chunk = features.transform(images)
    vectors = chunk.reshape(-1, chunk.shape[-1])
    chosen = chunk_coreset(select, vectors, n_select, index)
    calibration = {int(number): chunk[at] for at, number in enumerate(image_numbers) if number in picks}
    return vectors[chosen], chosen, calibration


def fit_in_chunks(features, sampler, detector, X, y, run_chunks=None, transform=None) -> None:
    """Fit ``sampler`` and ``detector`` on ``X`` chunk by chunk (``features`` is fitted).

    With the exact strategy (a set the sampler does not stream) the features
    of all of ``X`` are computed (``transform(X)``, by default the feature
    step's) and the steps fitted on them as in a
    :class:`~sklearn.pipeline.Pipeline`. ``run_chunks(plan, X, tasks)``, when
    given, runs the chunks elsewhere: ``tasks`` lists ``(k, n_select,
    selector)`` and it yields :func:`chunk_result` of each chunk, in order.
    """
    sampler._validate_params()
    detector._validate_params()
    n_images, (h, w, d) = patch_grid(features, X)
    good = check_labels(y, n_images)
    good_images = np.arange(n_images) if good is None else np.flatnonzero(good)
    if not sampler._streams(len(good_images) * h * w):
        detector.fit(sampler.fit_transform((transform or features.transform)(X), y), y)
        return
    plan = ChunkPlan(good_images, h * w, sampler.chunk_size)
    sampler.n_features_in_ = detector.n_features_in_ = d
    calibration = np.empty((len(plan.picks), h, w, d), dtype=np.float32)
    with tqdm(desc="Coreset", unit="pt", disable=not sampler.verbose) as progress:
        stream = sampler._open_stream(plan.n_candidates, plan.chunk_images * h * w, progress)
        tasks = [(k, stream.chunk_picks(*plan.bounds(k)), stream.selector) for k in range(len(plan.chunks))]
        if run_chunks is None:
            results = (
                chunk_result(
                    features, subset(X, plan.chunks[k]), plan.chunks[k], n, stream.select, k, plan.picks
                )
                for k, n, _ in tasks
            )
        else:
            results = run_chunks(plan, X, tasks)
        for k, (kept, chosen, chunk_calibration) in enumerate(results):
            stream.add(kept, plan.positions(plan.chunks[k])[chosen], plan.bounds(k)[1])
            for number, image in chunk_calibration.items():
                calibration[np.searchsorted(plan.picks, number)] = image
        sampler._close_stream(stream, plan.n_candidates, n_images * h * w)
    bank_image = np.sort(sampler.sample_indices_) // plan.per_image
    detector._fit_bank(sampler.coreset_, bank_image, calibration, plan.picks)


def grow_in_chunks(features, sampler, detector, X, y) -> None:
    """``partial_fit`` of the fitted ``sampler`` and ``detector`` on ``X``, chunk by chunk.

    The sampler continues its selection over each chunk's candidates; the
    detector's bank grows by the same vectors (it is the sampler's
    ``coreset_`` when the two share it) and its threshold is recalibrated on
    ``X``'s calibration images.
    """
    sampler._validate_params()
    detector._validate_params()
    n_images, (h, w, d) = patch_grid(features, X)
    if d != sampler.n_features_in_:
        raise ValueError(
            f"The feature step gives {d} features per patch, but the coreset step was fitted with "
            f"{sampler.n_features_in_}: grow a model with the feature settings it was fitted with."
        )
    good = check_labels(y, n_images)
    good_images = np.arange(n_images) if good is None else np.flatnonzero(good)
    plan = ChunkPlan(good_images, h * w, sampler.chunk_size)
    calibration = np.empty((len(plan.picks), h, w, d), dtype=np.float32)

    def chunks():
        for k, images in enumerate(plan.chunks):
            chunk = features.transform(subset(X, images))
            for at, number in enumerate(images):
                if number in plan.picks:
                    calibration[np.searchsorted(plan.picks, number)] = chunk[at]
            yield *plan.bounds(k), chunk.reshape(-1, d), plan.positions(images)

    shared = sampler.coreset_ is detector.memory_bank_
    n_bank, n_kept, n_indices = (
        len(detector.memory_bank_),
        len(sampler.coreset_),
        len(sampler.sample_indices_),
    )
    offset = sampler.n_vectors_seen_
    with tqdm(desc="Coreset", unit="pt", disable=not sampler.verbose) as progress:
        sampler._continue(chunks(), plan.n_candidates, progress)
    sampler.n_vectors_seen_ += n_images * h * w
    new_images = np.sort(sampler.sample_indices_[n_indices:] - offset) // plan.per_image
    added = sampler.coreset_[n_kept:]
    bank = sampler.coreset_ if shared else np.concatenate([detector.memory_bank_, added])
    bank_image = np.concatenate([np.full(n_bank, -1), new_images])
    detector._grow(bank, bank_image, calibration, plan.picks)
