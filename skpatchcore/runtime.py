"""Scoring with an exported ONNX file, without torch: :class:`OnnxPatchCore`.

:func:`skpatchcore.export_onnx` (or ``skpatchcore export``) writes a fitted
pipeline as one ONNX file that holds its whole predict path. This module
runs such a file with onnxruntime. It imports NumPy, PIL and onnxruntime
only, never torch, so a deployment needs neither torch nor faiss nor
scikit-learn::

    pip install --no-deps skpatchcore
    pip install onnxruntime numpy pillow

Images are read exactly as the torch path reads them, by the same code
(:func:`skpatchcore.utils._images.check_images` and
``ImageSet.model_input`` at the model's fitted geometry), then handed to the
graph as a batch: uint8 pixels as they are, 16-bit images and float arrays
as float32 in ``[0, 1]``.

**The file format.** An ONNX model (opset 18 or later) with

- inputs ``images``, uint8 of shape ``(batch, H, W, C)``, and ``pixels``,
  float32 of the same shape with values in ``[0, 1]``. Both are optional:
  each defaults to an empty batch, so feed one of them (or both: the results
  come in the order ``images`` then ``pixels``). ``(H, W)`` is the model
  input size, ``C`` the model's channels (1 or 3). In the graph ``images``
  becomes ``value / 255``, exactly the package's ``to_unit_float``.
- outputs ``anomaly_score`` of shape ``(batch,)`` (the image anomaly
  scores) and ``anomaly_map`` of shape ``(batch, H, W)``.
- metadata: ``skpatchcore``, a JSON object with the threshold, the fitted
  geometry, the channels and bit depth, the backbone and its layers, the
  aggregation, the scoring settings, the bank size and the package version;
  and ``skpatchcore.sha256``, the SHA-256 of the file's bytes with that
  value's 64 characters replaced by zeros. :class:`OnnxPatchCore` checks it
  before handing the bytes to onnxruntime and refuses a modified file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .utils._errors import ModelFileError
from .utils._geometry import Geometry, to_unit_float
from .utils._images import ImageReadError, SkippedImagesWarning, check_images

__all__ = ["OnnxPatchCore"]

FORMAT_NAME = "skpatchcore-onnx"
FORMAT_VERSION = 1
METADATA_KEY = "skpatchcore"
DIGEST_KEY = "skpatchcore.sha256"
UINT8_INPUT = "images"
FLOAT_INPUT = "pixels"
SCORES_OUTPUT = "anomaly_score"
MAPS_OUTPUT = "anomaly_map"
# How the digest sits in the serialised file: a metadata_props entry is a
# StringStringEntryProto, key (field 1) then value (field 2), both short strings.
_DIGEST_LENGTH = 64
_DIGEST_PREFIX = b"\x0a" + bytes([len(DIGEST_KEY)]) + DIGEST_KEY.encode() + b"\x12" + bytes([_DIGEST_LENGTH])
DIGEST_PLACEHOLDER = "0" * _DIGEST_LENGTH
_ONNXRUNTIME_HELP = "pip install onnxruntime (or onnxruntime-gpu, onnxruntime-openvino)"
# Sizes the geometry is probed with to see whether it brings every image to one size.
_PROBE_SIZES = ((100, 100), (100, 300), (300, 100), (37, 1000), (2000, 1500))


def _digest_span(data: bytes) -> slice | None:
    """Where the 64 hex characters of the checksum lie in a serialised file (None: absent).

    The metadata is serialised after the graph, so the last occurrence counts.
    """
    at = data.rfind(_DIGEST_PREFIX)
    if at < 0:
        return None
    start = at + len(_DIGEST_PREFIX)
    return slice(start, start + _DIGEST_LENGTH)


def _file_digest(data: bytes, span: slice) -> str:
    """SHA-256 of the file's bytes with the checksum's characters set to zeros."""
    digest = hashlib.sha256()
    digest.update(data[: span.start])
    digest.update(DIGEST_PLACEHOLDER.encode())
    digest.update(data[span.stop :])
    return digest.hexdigest()


def _fixed_input_size(geometry: Geometry) -> tuple[int, int] | None:
    """The model input size every image reaches under ``geometry``, or None if it varies.

    A crop or an exact ``(height, width)`` resize gives one size whatever the
    image; resizing one side only (no crop) gives a size that follows the
    aspect ratio.
    """
    sizes = {tuple(geometry.output_size(height, width)) for height, width in _PROBE_SIZES}
    return sizes.pop() if len(sizes) == 1 else None


def _usable_cpus() -> int:
    """CPUs this process may use: its affinity where the system tells it, and
    no more than a container's CPU quota (cgroup v2 ``cpu.max``) allows."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, -(-int(quota) // int(period)))
    except (OSError, ValueError):  # no cgroup v2 file, or not one we understand
        pass
    return max(1, count)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(
            f"skpatchcore.runtime needs onnxruntime to run an exported model: {_ONNXRUNTIME_HELP}."
        ) from None
    return onnxruntime


class OnnxPatchCore:
    """A fitted PatchCore model exported to ONNX, run by onnxruntime without torch.

    The file, written by :func:`skpatchcore.export_onnx`, holds the whole
    predict path of the pipeline it was exported from: normalisation,
    backbone stages, aggregation, nearest-neighbour distances to the memory
    bank, upsampling and Gaussian smoothing. Scores and maps equal the
    pipeline's (``PatchCorePipeline.predict_map``) to float32 rounding, and
    images are read by the same code at the same fitted geometry. The
    methods follow the pipeline's conventions: :meth:`anomaly_score` higher =
    more anomalous, :meth:`decision_function` negative = anomalous,
    :meth:`predict` in {-1, +1}.

    Parameters
    ----------
    path : str or path-like
        The ``.onnx`` file. Its checksum is verified before it is loaded; a
        modified, truncated or foreign file raises
        :class:`~skpatchcore.ModelFileError`.
    providers : list of str or None, default=None
        onnxruntime execution providers, in order of preference, e.g.
        ``["CUDAExecutionProvider", "CPUExecutionProvider"]`` (with
        ``onnxruntime-gpu``) or ``["OpenVINOExecutionProvider"]`` (with
        ``onnxruntime-openvino``). None runs on the CPU.
    batch_size : int or "auto", default="auto"
        Images per run of the graph (at most). ``"auto"``: 1 on the CPU (as
        fast per image as larger batches, with the least memory), 8 when the
        first provider is another device (a GPU).
    n_threads : int or None, default=None
        CPU threads. With ``parallel="images"``: batches read and scored at
        once, None: one per CPU this process may use (its affinity, within a
        container's CPU quota). With ``parallel="operators"``: the threads of
        onnxruntime's intra-op pool, None: onnxruntime's choice (one per
        physical core).
    parallel : {"auto", "images", "operators"}, default="auto"
        How the work is spread over the CPU. ``"images"``: each thread reads
        and scores its own batches (a call's images are split so that every
        thread gets some), and every run of the graph is single-threaded; on
        2 cores about 1.4 times the images per second of ``"operators"``,
        because onnxruntime keeps the second core busy only part of a run of
        this graph. ``"operators"``: one batch at a time, each run's
        operators spread over onnxruntime's pool: the shortest wait for a
        call with a single image, which with ``"images"`` gets one thread
        (1.5 to 1.7 times as long on 2 cores). ``"auto"``: ``"images"`` when
        ``CPUExecutionProvider`` comes first in ``providers``,
        ``"operators"`` when another provider does. With ``"images"`` up to
        ``n_threads`` runs are under way at once, each with its working
        memory.
    session_options : onnxruntime.SessionOptions, default=None
        Further onnxruntime settings. The session's ``intra_op_num_threads``
        is set by ``parallel`` and ``n_threads`` (1 with ``"images"``); the
        object passed is left unchanged.

    Attributes
    ----------
    threshold_ : float
        Anomaly scores above it are predicted anomalous (the fitted
        detector's, unless changed with :meth:`set_threshold`).
    offset_ : float
        ``-threshold_``, as the detector's.
    geometry_ : Geometry
        The fitted resize and crop, as the feature step's ``geometry_``.
    input_size_ : tuple of int
        ``(H, W)``, the model input size and the size of the maps.
    n_channels_ : int
        1 or 3: the channels images are brought to.
    bit_depth_ : int
        Significant bits of 16-bit images.
    metadata_ : dict
        Everything the file says about the model (backbone, layers, bank
        size, scoring settings, the package version that wrote it, ...).
    providers_ : list of str
        The providers onnxruntime actually uses.
    parallel_ : {"images", "operators"}
        How the work is spread (``parallel`` with ``"auto"`` resolved).
    n_workers_ : int
        Batches read and scored at once (1 with ``"operators"``).

    See Also
    --------
    skpatchcore.export_onnx : Write the file from a fitted pipeline.
    skpatchcore.PatchCorePipeline : The torch path the file reproduces.

    Examples
    --------
    >>> from skpatchcore.runtime import OnnxPatchCore
    >>> model = OnnxPatchCore("model.onnx")  # doctest: +SKIP
    >>> maps, scores = model.predict_map(["part_001.png"], return_scores=True)  # doctest: +SKIP
    >>> model.predict(["part_001.png"])  # doctest: +SKIP
    array([1])
    """

    def __init__(
        self,
        path,
        *,
        providers=None,
        batch_size="auto",
        n_threads=None,
        parallel="auto",
        session_options=None,
    ):
        onnxruntime = _onnxruntime()
        if not (_positive_int(batch_size) or batch_size == "auto"):
            raise ValueError(
                f"The 'batch_size' parameter must be a positive int or 'auto'; got {batch_size!r}."
            )
        if not (n_threads is None or _positive_int(n_threads)):
            raise ValueError(f"The 'n_threads' parameter must be a positive int or None; got {n_threads!r}.")
        if parallel not in ("auto", "images", "operators"):
            raise ValueError(
                f"The 'parallel' parameter must be 'auto', 'images' or 'operators'; got {parallel!r}."
            )
        self.path = Path(path)
        self._arguments = {
            "providers": providers,
            "batch_size": batch_size,
            "n_threads": n_threads,
            "parallel": parallel,
        }
        # Checked block by block, then read by onnxruntime itself: the file's
        # bytes are never held twice (a model with a large bank can be big).
        _verify(self.path)
        if session_options is None:
            options = onnxruntime.SessionOptions()
            # Errors only: onnxruntime warns that the two inputs have default
            # values (empty batches), which is what they are for.
            options.log_severity_level = 3
        else:
            options = session_options
        wanted = ["CPUExecutionProvider"] if providers is None else _check_providers(providers, onnxruntime)
        if parallel == "auto":
            parallel = "images" if wanted[0] == "CPUExecutionProvider" else "operators"
        self.parallel_ = parallel
        # The session copies the options: the caller's object is left as it was.
        their_threads = options.intra_op_num_threads
        if parallel == "images":
            # Each run in the thread that calls it; the threads are ours.
            options.intra_op_num_threads = 1
            self.n_workers_ = n_threads or _usable_cpus()
        else:
            if n_threads is not None:
                options.intra_op_num_threads = n_threads
            self.n_workers_ = 1
        try:
            self._session = onnxruntime.InferenceSession(os.fspath(self.path), options, providers=wanted)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own error types
            raise ModelFileError(
                f"onnxruntime cannot load {os.fspath(self.path)!r}: {_first_line(error)}"
            ) from None
        finally:
            options.intra_op_num_threads = their_threads
        self.providers_ = self._session.get_providers()
        if batch_size == "auto":
            batch_size = 1 if self.providers_[0] == "CPUExecutionProvider" else 8
        self.batch_size = batch_size
        self.metadata_ = _check_metadata(self._session, self.path)
        meta = self.metadata_
        self.geometry_ = Geometry(**{key: _tuples(value) for key, value in meta["geometry"].items()})
        self.input_size_ = tuple(meta["input_size"])
        self.n_channels_ = int(meta["n_channels"])
        self.bit_depth_ = int(meta["bit_depth"])
        self.set_threshold(meta["threshold"])

    def __repr__(self) -> str:
        return f"OnnxPatchCore({os.fspath(self.path)!r}, providers={self.providers_!r})"

    # An onnxruntime session cannot be pickled: a pickled OnnxPatchCore (for
    # joblib or Dask workers) holds its path and arguments, and opens (and
    # checks) the file again where it is unpickled. ``session_options`` are not
    # carried; a threshold set with set_threshold is.
    def __getstate__(self) -> dict:
        return {"path": self.path, "arguments": self._arguments, "threshold": self.threshold_}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], **state["arguments"])
        self.set_threshold(state["threshold"])

    def set_threshold(self, threshold: float) -> OnnxPatchCore:
        """Set the anomaly-score threshold used by :meth:`predict` (the file is left as it is).

        Parameters
        ----------
        threshold : float
            Images whose :meth:`anomaly_score` exceeds it are predicted -1.

        Returns
        -------
        self : OnnxPatchCore
            With ``threshold_`` and ``offset_`` updated.
        """
        threshold = float(threshold)
        if not np.isfinite(threshold):
            raise ValueError(f"The threshold must be a finite number; got {threshold!r}.")
        self.threshold_ = threshold
        self.offset_ = -threshold
        return self

    # ------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------

    def _run(self, X, on_error: str) -> tuple[np.ndarray, np.ndarray]:
        """Maps (n, H, W) and scores (n,) of every image of ``X``; NaN where skipped."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"The 'on_error' parameter must be 'raise' or 'skip'; got {on_error!r}.")
        skip = on_error == "skip"
        images = check_images(X, channels=self.n_channels_, skip_errors=skip, bit_depth=self.bit_depth_)
        valid = images.valid
        if not valid:
            raise ImageReadError("No image of X could be read: " + "; ".join(images.failed.values())[:2000])
        for i in valid:
            size = tuple(self.geometry_.output_size(*images.sizes[i]))
            if size != self.input_size_:
                raise ValueError(
                    f"X[{i}] is {images.sizes[i][0]}x{images.sizes[i][1]} pixels and reaches the model as "
                    f"{size[0]}x{size[1]}, but {os.fspath(self.path)!r} takes {self.input_size_[0]}x"
                    f"{self.input_size_[1]} images (the size it was exported for, with crop_size="
                    f"{self.geometry_.crop_size!r}); give images of that aspect ratio, or export a model "
                    "with a crop_size."
                )
        n_images = len(images)
        maps = np.full((n_images, *self.input_size_), np.nan, dtype=np.float32)
        scores = np.full(n_images, np.nan, dtype=np.float32)
        failed = images.failed
        geometry = self.geometry_

        def load_one(i):
            try:
                return images.model_input(i, geometry), None
            except ImageReadError as error:
                if not skip:
                    raise
                return None, str(error)

        def score(rows, loaded):
            """``rows``' images, read: the rows scored and their maps and scores, or None."""
            kept, pixels = [], []
            for i, (image, problem) in zip(rows, loaded):
                if problem is None:
                    kept.append(i)
                    pixels.append(image)
            return (kept, *self._run_batch(pixels)) if kept else None

        size = self.batch_size
        if self.parallel_ == "images":  # smaller batches rather than idle threads
            size = max(1, min(size, -(-len(valid) // self.n_workers_)))
        batches = [valid[start : start + size] for start in range(0, len(valid), size)]
        with contextlib.closing(self._scored_batches(batches, load_one, score)) as results:
            for rows, problems, scored in results:
                for i, problem in zip(rows, problems):
                    if problem is not None:
                        failed[i] = problem
                if scored is not None:
                    kept, batch_maps, batch_scores = scored
                    maps[kept] = batch_maps
                    scores[kept] = batch_scores
        if failed:
            warnings.warn(SkippedImagesWarning(failed), stacklevel=3)
            if len(failed) == n_images:
                raise ImageReadError("No image of X could be read: " + "; ".join(failed.values())[:2000])
        return maps, scores

    def _scored_batches(self, batches, load_one, score):
        """``(rows, problems, scored)`` for each batch, in order: each row's read error (or
        None) and ``score``'s result; the work spread as ``parallel_`` says."""

        def problems(loaded):
            return [problem for _, problem in loaded]

        if self.parallel_ == "operators":  # one batch at a time; its images read side by side
            workers = max(1, min(8, os.cpu_count() or 1, self.batch_size))
            with ThreadPoolExecutor(max_workers=workers) as decoders:
                for rows in batches:
                    loaded = list(decoders.map(load_one, rows)) if len(rows) > 1 else [load_one(rows[0])]
                    yield rows, problems(loaded), score(rows, loaded)
            return

        def read_and_score(rows):
            loaded = [load_one(i) for i in rows]
            return rows, problems(loaded), score(rows, loaded)  # the pixels are dropped here

        # Each thread reads and scores whole batches, at most 2 x workers batches
        # ahead of the caller, so that memory stays bounded however many images come.
        workers = min(self.n_workers_, len(batches))
        pool = ThreadPoolExecutor(max_workers=workers)
        running = deque()
        try:
            for rows in batches:
                running.append(pool.submit(read_and_score, rows))
                if len(running) >= 2 * workers:
                    yield running.popleft().result()
            while running:
                yield running.popleft().result()
        finally:  # done, an error, or the caller stopped: nothing more is read
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_batch(self, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One run of the graph on model inputs (h, w, c): uint8, or float32 in [0, 1]."""
        if all(p.dtype == np.uint8 for p in pixels):
            feed = {UINT8_INPUT: np.stack(pixels)}
        else:  # float images among them: all as float, uint8 ones converted as the torch path does
            stacked = np.stack([to_unit_float(p) if p.dtype == np.uint8 else p for p in pixels])
            feed = {FLOAT_INPUT: stacked.astype(np.float32, copy=False)}
        scores, maps = self._session.run([SCORES_OUTPUT, MAPS_OUTPUT], feed)
        return maps, scores

    def predict_map(self, X, *, return_scores: bool = False, on_error: str = "raise"):
        """Anomaly heat maps of images at the model input size.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images: uint8, uint16 (scaled by the model's bit depth) or float
            in ``[0, 1]`` arrays, or a sequence of file paths, PIL images or
            per-image arrays, exactly as the pipeline takes them.
        return_scores : bool, default=False
            Also return the image anomaly scores (same run, no extra cost).
        on_error : {"raise", "skip"}, default="raise"
            ``"skip"``: an image that cannot be read gets NaN map and score
            instead of stopping the call; a
            :class:`~skpatchcore.SkippedImagesWarning` lists them.

        Returns
        -------
        maps : ndarray of shape (n_images, H, W), float32
            Higher = more anomalous; ``(H, W)`` is ``input_size_``.
        scores : ndarray of shape (n_images,), float32
            Only when ``return_scores=True``.
        """
        maps, scores = self._run(X, on_error)
        return (maps, scores) if return_scores else maps

    def anomaly_score(self, X, *, on_error: str = "raise") -> np.ndarray:
        """Image anomaly scores, higher = more anomalous (the paper's image score).

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images, as for :meth:`predict_map`.
        on_error : {"raise", "skip"}, default="raise"
            As in :meth:`predict_map`: skipped images score NaN.

        Returns
        -------
        scores : ndarray of shape (n_images,), float32
        """
        return self._run(X, on_error)[1]

    def score_samples(self, X) -> np.ndarray:
        """Opposite of the anomaly score: higher = more normal.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images, as for :meth:`predict_map`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            ``-anomaly_score(X)``.
        """
        return -self.anomaly_score(X)

    def decision_function(self, X) -> np.ndarray:
        """Shifted opposite of the anomaly score: negative = anomalous.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images, as for :meth:`predict_map`.

        Returns
        -------
        decision : ndarray of shape (n_images,)
            ``score_samples(X) - offset_``, i.e. ``threshold_ - anomaly_score(X)``.
        """
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """Predict +1 for good and -1 for anomalous images.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            Images, as for :meth:`predict_map`.

        Returns
        -------
        labels : ndarray of shape (n_images,)
            +1 where ``decision_function(X) >= 0``, else -1.
        """
        return np.where(self.decision_function(X) >= 0, 1, -1)


# --------------------------------------------------------------------------
# Reading and checking a file
# --------------------------------------------------------------------------


# Bytes read at a time while checking a file (a model can be hundreds of MB).
_BLOCK = 1 << 22


def _stored_digest(stream) -> tuple[slice | None, bytes]:
    """The checksum's place in the file and the file's first bytes, reading block by block."""
    overlap = len(_DIGEST_PREFIX) + _DIGEST_LENGTH
    head, tail, offset, found = b"", b"", 0, None
    while block := stream.read(_BLOCK):
        head = head or block[:4]
        window = tail + block
        span = _digest_span(window)
        if span is not None and span.stop <= len(window):
            start = offset - len(tail) + span.start
            found = slice(start, start + _DIGEST_LENGTH)
        tail = window[-overlap:]
        offset += len(block)
    return found, head


def _digest_of_file(stream, span: slice) -> tuple[str, str]:
    """(SHA-256 of the file with the checksum zeroed, the checksum stored)."""
    digest, offset, stored = hashlib.sha256(), 0, bytearray()
    while block := stream.read(_BLOCK):
        start, stop = max(span.start - offset, 0), min(span.stop - offset, len(block))
        if start < stop:
            stored += block[start:stop]
            block = block[:start] + b"0" * (stop - start) + block[stop:]
        digest.update(block)
        offset += len(block)
    return digest.hexdigest(), stored.decode("ascii", "replace")


def _verify(path: Path) -> None:
    """Check that ``path`` is an skpatchcore ONNX file whose bytes match its checksum."""
    shown = repr(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"The model file {shown} does not exist.")
    if not path.is_file():
        raise ModelFileError(f"The model {shown} is a folder, not an ONNX file written by skpatchcore.")
    with open(path, "rb") as stream:
        span, head = _stored_digest(stream)
        if span is not None:
            stream.seek(0)
            computed, stored = _digest_of_file(stream, span)
    if span is None:
        if head == b"PK\x03\x04":
            raise ModelFileError(
                f"{shown} is a model file written by skpatchcore.save(), not an ONNX export; load it with "
                "skpatchcore.load(), or export it with 'skpatchcore export MODEL -o model.onnx'."
            )
        raise ModelFileError(
            f"{shown} is not an ONNX file exported by skpatchcore (it has no skpatchcore checksum); "
            "write one with skpatchcore.export_onnx() or 'skpatchcore export'."
        )
    if computed != stored:
        raise ModelFileError(
            f"The ONNX file {shown} was modified or damaged: its bytes do not match the SHA-256 in its "
            f"metadata ({DIGEST_KEY}); export the model again."
        )


def _check_providers(providers, onnxruntime) -> list[str]:
    if isinstance(providers, str) or not all(isinstance(p, str) for p in providers):
        raise ValueError(
            f"The 'providers' parameter must be a list of onnxruntime provider names; got {providers!r}."
        )
    providers = list(providers)
    available = onnxruntime.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise ValueError(
            f"The 'providers' parameter asks for {missing or providers}, which this onnxruntime does not "
            f"have; available: {available}. CUDA needs onnxruntime-gpu, OpenVINO onnxruntime-openvino."
        )
    return providers


_REQUIRED = {
    "threshold": float,
    "geometry": dict,
    "input_size": list,
    "n_channels": int,
    "bit_depth": int,
}


def _check_metadata(session, path: Path) -> dict:
    shown = repr(os.fspath(path))
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        meta = json.loads(text) if text is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{shown} is not an ONNX file exported by skpatchcore (no skpatchcore metadata)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ModelFileError(f"The ONNX file {shown} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        from ._version import __version__

        raise ModelFileError(
            f"The ONNX file {shown} uses format version {version} (written by skpatchcore "
            f"{meta.get('skpatchcore_version')}); this skpatchcore ({__version__}) reads up to version "
            f"{FORMAT_VERSION}: upgrade skpatchcore to run it."
        )
    for key, kind in _REQUIRED.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ModelFileError(f"The ONNX file {shown} has invalid metadata: {key!r} = {value!r}."[:300])
    # Both inputs default to an empty batch: onnxruntime lists them as overridable initializers.
    inputs = {i.name for i in (*session.get_inputs(), *session.get_overridable_initializers())}
    outputs = {o.name for o in session.get_outputs()}
    if {UINT8_INPUT, FLOAT_INPUT} - inputs or {SCORES_OUTPUT, MAPS_OUTPUT} - outputs:
        raise ModelFileError(
            f"The ONNX file {shown} lacks the inputs {[UINT8_INPUT, FLOAT_INPUT]} or outputs "
            f"{[SCORES_OUTPUT, MAPS_OUTPUT]} of an skpatchcore export."
        )
    return meta


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _tuples(value):
    """JSON lists back to the tuples a Geometry holds."""
    return tuple(value) if isinstance(value, list) else value


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
