"""A fitted pipeline as one ONNX graph: :func:`export_onnx`.

The file holds the whole predict path of a fitted
:class:`~skpatchcore.PatchCorePipeline`, so that
:class:`skpatchcore.runtime.OnnxPatchCore` (onnxruntime, no torch) scores
images exactly as the pipeline does. Its layout is described in
:mod:`skpatchcore.runtime`; here is how the graph is made.

Features (exported from torch by ``torch.onnx.export(dynamo=True)``)
    uint8 images become ``value / 255``; the pixels go NHWC -> NCHW (a gray
    model's one channel three times), are normalised with the backbone's
    statistics and run through the backbone up to its last tapped stage. The
    package's EfficientNet-Lite convolutions are swapped for plain ones with
    the "same" padding fixed for the model input size
    (:func:`~skpatchcore._efficientnet_lite.with_static_padding`), so the
    graph is ~30 Conv and Clip nodes with no shape arithmetic. Aggregation
    is the feature step's own linear maps (:mod:`skpatchcore._aggregation`):
    ``"mean"`` an average pool (and a 1x1 convolution when it pools to
    ``target_dim``); ``"reference"`` its banded map as one small convolution
    per block of 32 output channels over the input channels that block
    reaches (what the CPU path does with matrix products), skipping ~90% of
    the dense convolution's work. The deeper stages are resized bilinearly to
    the first stage's grid.

Nearest neighbours (built node by node with :mod:`onnx.helper`)
    The bank is stored centred on its mean (float64, rounded once), with its
    squared norms. A patch's candidates are the bank vectors with the
    smallest ``|y|^2 - 2 <x, y>`` (one Gemm, ArgMin or TopK), ``x`` the
    centred patch vector; their distances are then computed exactly, as the
    sum of squared differences, so the float32 cancellation of the norm
    expansion never reaches a score. A bank of 2,048 vectors or more of 512
    values or more (the reference settings) finds its candidates with an int8
    product and proven bounds instead (:mod:`skpatchcore._onnx_filter`; same
    neighbours, the int8 copy of the bank adds a quarter to the file). A bank
    larger than ``_BANK_CHUNK_BYTES`` per image's worth of products is searched in
    equal chunks by a Scan node (the last one padded with vectors that are
    never nearest): memory stays bounded whatever the bank size, and the
    limit is the ONNX file itself (2 GiB, a protobuf limit). ``n_neighbors``
    averages the k nearest; ``distance="squared"`` skips the square root;
    eq. 7 (``reweight_neighbors = b``) takes the b nearest bank neighbours of
    each bank vector from a table precomputed at export with the fitted
    index (so they are the ones the torch path finds), and weights the
    image's worst patch in float64, as the detector does.

Maps
    The patch-score grid goes through the detector's two small matrices,
    ``A_rows @ scores @ A_cols.T`` (bilinear upsampling and the Gaussian,
    :mod:`skpatchcore._maps`).

After writing, the file is run once with onnxruntime (when installed) on two
synthetic images and compared with the torch path: a graph that disagrees
(a user's backbone that does not trace faithfully) is never left on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._aggregation import _row_blocks
from ._coreset import GreedyCoresetSampler
from ._detector import PatchCoreDetector
from ._efficientnet_lite import with_static_padding
from ._features import PatchFeatureTransformer
from ._maps import _axis_operator
from ._onnx_filter import Int8Filter, use_int8_filter
from ._version import __version__
from .runtime import (
    DIGEST_KEY,
    DIGEST_PLACEHOLDER,
    FLOAT_INPUT,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAPS_OUTPUT,
    METADATA_KEY,
    SCORES_OUTPUT,
    UINT8_INPUT,
    _digest_span,
    _file_digest,
    _fixed_input_size,
)
from .utils._files import write_atomically
from .utils._geometry import Geometry

__all__ = ["export_onnx"]

# Bytes of (patch x bank vector) products held at once per image: a bank whose
# products for one image's patches exceed this is searched in chunks by a Scan.
_BANK_CHUNK_BYTES = 64 << 20
# ONNX files are protobuf messages: they cannot exceed 2 GiB.
_MAX_FILE_BYTES = 2**31 - 1
# Largest relative difference between the file and the torch path in the
# check after export (float32 rounding of differently ordered sums is ~1e-6).
_CHECK_RTOL = 1e-3
_EXPORT_HELP = "pip install onnx onnxscript onnxruntime"
_MIN_OPSET = 18
_PREFIX = "skpatchcore/"


def export_onnx(model, path, *, input_size=None, check: bool = True) -> None:
    """Write a fitted pipeline as one self-contained ONNX file, for torch-free deployment.

    The file holds the whole predict path: normalisation, backbone stages,
    aggregation, nearest-neighbour distances to the memory bank (k and eq. 7
    as fitted), upsampling and Gaussian smoothing; plus, as metadata, the
    threshold, the fitted geometry, the backbone and its layers, the package
    version and a SHA-256 checksum. :class:`skpatchcore.runtime.OnnxPatchCore`
    runs it with onnxruntime (no torch import), reading images with the
    package's own reader; any other ONNX runtime can run it too (see
    :mod:`skpatchcore.runtime` for its inputs and outputs). The batch size
    is free; the image size is the model input size.

    Parameters
    ----------
    model : PatchCorePipeline or Pipeline
        A fitted pipeline of :class:`PatchFeatureTransformer`,
        :class:`GreedyCoresetSampler` (or ``"passthrough"``) and
        :class:`PatchCoreDetector`, as :func:`make_patchcore` builds.
    path : str or path-like
        The file to write (replaced if it exists). ``.onnx`` is customary.
    input_size : (int, int) or None, default=None
        ``(height, width)`` of the images the graph takes. None takes the
        size the fitted geometry brings every image to (it has a
        ``crop_size`` or an exact ``(h, w)`` ``image_size``); a geometry
        that keeps each image's aspect ratio needs it, and the file then
        scores only images that reach that size.
    check : bool, default=True
        Run the written file once with onnxruntime (when installed) on two
        synthetic images and compare scores and maps with the torch path;
        a file that disagrees by more than 1e-3 (relative) is removed and
        an error raised.

    See Also
    --------
    skpatchcore.runtime.OnnxPatchCore : Run the file without torch.

    Notes
    -----
    Exporting needs ``onnx`` and ``onnxscript`` (``pip install onnx onnxscript
    onnxruntime``). The graph searches the bank exactly: a detector fitted
    with an approximate ``index`` ("ivf", "hnsw") gets exact scores in the
    file (a warning says so). The file holds the bank, so it must stay
    below 2 GiB (protobuf's limit: about 500,000 vectors of 1024 values);
    a larger model is refused with a message saying what to do.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from skpatchcore import export_onnx, make_patchcore
    >>> from skpatchcore.runtime import OnnxPatchCore
    >>> images = np.random.default_rng(0).integers(96, 160, (4, 64, 64, 3), dtype=np.uint8)
    >>> model = make_patchcore(backbone="efficientnet_lite0", image_size=64, crop_size=64,
    ...                        random_state=0, device="cpu").fit(images[:3])
    >>> path = os.path.join(tempfile.mkdtemp(), "model.onnx")
    >>> export_onnx(model, path)
    >>> runtime = OnnxPatchCore(path)
    >>> bool(np.allclose(runtime.anomaly_score(images[3:]), model.anomaly_score(images[3:]), rtol=1e-4))
    True
    """
    onnx = _onnx()
    features, detector = _check_pipeline(model)
    geometry: Geometry = features.geometry_
    size = _check_input_size(input_size, geometry)
    _check_file_size(features, detector)
    if not (isinstance(detector.index, str) and detector.index == "flat"):
        warnings.warn(
            f"The detector searches its bank with the approximate index {detector.index!r}; the ONNX graph "
            "searches exactly, so its scores can be slightly lower than the pipeline's (they are the exact "
            "ones).",
            UserWarning,
            stacklevel=2,
        )
    with torch.inference_mode(False), torch.no_grad():
        graph = _FeatureGraph(features, size)
        feature_model = _export_features(graph, size, features.n_channels_)
    opset = next(o.version for o in feature_model.opset_import if o.domain in ("", "ai.onnx"))
    if opset < _MIN_OPSET:  # the scoring nodes take their reduction axes as inputs
        raise RuntimeError(f"torch exported opset {opset}; the scoring nodes need opset {_MIN_OPSET}+.")
    scoring = _ScoringGraph(detector, graph.grid, size)
    merged = _assemble(onnx, feature_model, scoring, size, features.n_channels_)
    meta = _metadata(features, detector, geometry, size, graph.grid)
    merged.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))
    merged.metadata_props.add(key=DIGEST_KEY, value=DIGEST_PLACEHOLDER)
    merged.producer_name = "skpatchcore"
    merged.producer_version = __version__
    merged.doc_string = (
        f"PatchCore anomaly detector exported by skpatchcore {__version__}: inputs {UINT8_INPUT!r} "
        f"(uint8) or {FLOAT_INPUT!r} (float32 in [0, 1]), NHWC at {size[0]}x{size[1]}; outputs "
        f"{SCORES_OUTPUT!r} and {MAPS_OUTPUT!r}. Run it with skpatchcore.runtime.OnnxPatchCore."
    )
    data = bytearray(merged.SerializeToString())
    span = _digest_span(bytes(data))
    data[span] = _file_digest(bytes(data), span).encode()
    verify = (lambda written: _check_file(written, model)) if check else None
    write_atomically(path, lambda stream: stream.write(bytes(data)), verify)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch's exporter needs it
    except ImportError:
        raise ImportError(f"Exporting to ONNX needs onnx and onnxscript: {_EXPORT_HELP}.") from None
    return onnx


def _check_pipeline(model) -> tuple[PatchFeatureTransformer, PatchCoreDetector]:
    accepted = (
        "a fitted PatchCorePipeline (make_patchcore) or Pipeline of PatchFeatureTransformer, "
        "GreedyCoresetSampler and PatchCoreDetector"
    )
    if not isinstance(model, Pipeline):
        raise TypeError(f"export_onnx() takes {accepted}; got {type(model).__name__}.")
    steps = [step for _, step in model.steps]
    features, detector = steps[0], steps[-1]
    middle = [s is None or s == "passthrough" or isinstance(s, GreedyCoresetSampler) for s in steps[1:-1]]
    ends = isinstance(features, PatchFeatureTransformer) and isinstance(detector, PatchCoreDetector)
    if not (ends and all(middle)):
        names = [type(step).__name__ for step in steps]
        raise TypeError(f"export_onnx() takes {accepted}; got a Pipeline of {names}.")
    check_is_fitted(features)
    check_is_fitted(detector)
    return features, detector


def _check_file_size(features: PatchFeatureTransformer, detector: PatchCoreDetector) -> None:
    """Refuse, before any work, a model whose file would exceed what an ONNX file can hold."""
    bank = detector.memory_bank_
    weights = sum(t.numel() * t.element_size() for t in features.backbone_.state_dict().values())
    support = 8 * len(bank) * (detector.reweight_neighbors or 0)
    # (The int8 filter's copy of the bank is made only for banks searched in one
    # piece, at most 64 MB of products per image: a few tens of MB at most.)
    n_bytes = bank.nbytes + weights + support
    if n_bytes > _MAX_FILE_BYTES:
        raise ValueError(
            f"The exported model would take {n_bytes / 2**30:.2f} GiB, beyond the 2 GiB an ONNX file can "
            f"hold (protobuf's limit); its memory bank has {bank.shape[0]} vectors of {bank.shape[1]} "
            "values. Refit with a smaller coreset ratio or target_dim, or deploy the pipeline itself "
            "(skpatchcore.save) with an approximate index (PatchCoreDetector(index='ivf'))."
        )


def _check_input_size(input_size, geometry: Geometry) -> tuple[int, int]:
    fixed = _fixed_input_size(geometry)
    shown = (
        f"image_size={geometry.image_size!r}, crop_size={geometry.crop_size!r}, "
        f"resize_side={geometry.resize_side!r}"
    )
    if input_size is None:
        if fixed is None:
            raise ValueError(
                f"The fitted geometry ({shown}) keeps each image's aspect ratio, so images reach the model "
                "at different sizes, and an ONNX graph takes one: pass input_size=(height, width), the "
                "size your images reach (the file then scores those only)."
            )
        return fixed
    valid = (
        isinstance(input_size, (tuple, list))
        and len(input_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in input_size)
    )
    if not valid:
        raise ValueError(
            f"The 'input_size' parameter must be None or a (height, width) pair of positive ints; got "
            f"{input_size!r}."
        )
    input_size = (int(input_size[0]), int(input_size[1]))
    if fixed is not None and fixed != input_size:
        raise ValueError(
            f"The 'input_size' parameter is {input_size}, but the fitted geometry ({shown}) brings every "
            f"image to {fixed}; leave input_size=None."
        )
    return input_size


# --------------------------------------------------------------------------
# Features: a torch module that exports cleanly
# --------------------------------------------------------------------------


class _StageMap(nn.Module):
    """One stage's share of the fused features, in operations that export cleanly."""

    def __init__(self, stage_map):
        super().__init__()
        self.mode, self.patch_size = stage_map.mode, stage_map.patch_size
        self.rows = stage_map.rows
        weight = None if stage_map.weight is None else stage_map.weight.detach().cpu()
        self.blocks = []
        if self.mode == "reference":
            area = self.patch_size**2
            for index, (r0, r1, c0, c1, _) in enumerate(_row_blocks(weight)):
                # Unfolded columns c0:c1 are channels c0 // p^2 to (c1 - 1) // p^2.
                first, last = c0 // area, -(-c1 // area)
                self.register_buffer(f"block{index}", weight[r0:r1, first:last].clone())
                self.blocks.append((first, last))
        elif weight is not None:
            self.register_buffer("weight", weight)
        else:
            self.weight = None

    def forward(self, stage: torch.Tensor) -> torch.Tensor:
        pad = self.patch_size // 2
        if self.mode == "reference":
            parts = [
                F.conv2d(stage[:, first:last], getattr(self, f"block{index}"), padding=pad)
                for index, (first, last) in enumerate(self.blocks)
            ]
            return torch.cat(parts, dim=1)
        pooled = F.avg_pool2d(stage, self.patch_size, stride=1, padding=pad, count_include_pad=True)
        return pooled if self.weight is None else F.conv2d(pooled, self.weight)


class _Stages(nn.Module):
    """The backbone's tapped stages, captured without stopping the forward pass.

    The feature extractor stops its forward pass by raising an exception from
    a hook once it has its stages; torch.export cannot trace through that.
    Here the hooks only record, the forward pass runs to its end, and the
    exporter drops what the stages do not need (for the registered backbones
    the later modules are identities already).
    """

    def __init__(self, extractor, probe: torch.Tensor):
        super().__init__()
        self.model = with_static_padding(extractor.model, probe)
        self.layers = tuple(extractor.layers)
        self.register_buffer("mean", extractor.mean.detach().cpu().clone())
        self.register_buffer("std", extractor.std.detach().cpu().clone())
        self._captured: dict = {}
        modules = dict(self.model.named_modules())
        for name in self.layers:
            modules[name].register_forward_hook(self._recorder(name))

    def _recorder(self, name: str):
        def record(module, inputs, output):
            self._captured[name] = output

        return record

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._captured = {}
        self.model((images - self.mean) / self.std)
        captured, self._captured = self._captured, {}
        return [captured[name] for name in self.layers]


class _FeatureGraph(nn.Module):
    """Pixels (B, H, W, C) in [0, 1] -> patch features (B, h, w, d), as the feature step computes them."""

    def __init__(self, features: PatchFeatureTransformer, size: tuple[int, int]):
        super().__init__()
        extractor = features.backbone_
        if any(t.device.type != "cpu" for t in extractor.state_dict().values()):
            extractor = copy.deepcopy(extractor).cpu()
        probe = torch.zeros((1, 3, *size))
        self.stages = _Stages(extractor, probe)
        with torch.inference_mode():
            stages = self.stages(probe)
        self.grid = tuple(int(v) for v in stages[0].shape[-2:])
        self.n_channels = features.n_channels_
        self.out_dim = features.n_features_out_
        self.maps = nn.ModuleList(_StageMap(stage_map) for stage_map in features._stage_maps)
        bounds = [(m.rows.start, m.rows.stop) for m in self.maps]
        self.tiled = [start for start, _ in bounds] == [0] + [stop for _, stop in bounds[:-1]] and (
            bounds[-1][1] == self.out_dim
        )

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2)
        if self.n_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        parts = []
        for stage, stage_map in zip(self.stages(x), self.maps):
            part = stage_map(stage)
            if tuple(part.shape[-2:]) != self.grid:
                part = F.interpolate(part, size=self.grid, mode="bilinear", align_corners=False)
            parts.append(part)
        if self.tiled:  # each stage fills the rows after the previous one's
            fused = torch.cat(parts, dim=1)
        else:  # zeros on the rows other stages fill: adding them changes no value
            fused = None
            for part, stage_map in zip(parts, self.maps):
                rows = stage_map.rows
                part = F.pad(part, (0, 0, 0, 0, rows.start, self.out_dim - rows.stop))
                fused = part if fused is None else fused + part
        return fused.permute(0, 2, 3, 1)


def _export_features(graph: _FeatureGraph, size: tuple[int, int], n_channels: int):
    """The features graph as an ONNX ModelProto, batch size dynamic."""
    example = torch.rand((2, *size, n_channels), generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # Non-strict capture: the backbone's forward hooks run as plain Python
        # (torch.onnx.export would first try a strict capture, which fails on them).
        exported = torch.export.export(graph.eval(), (example,), dynamic_shapes=({0: batch},), strict=False)
        program = torch.onnx.export(
            exported, input_names=["pixels"], output_names=["features"], optimize=True, verbose=False
        )
    return program.model_proto


# --------------------------------------------------------------------------
# Scoring: nodes built by hand
# --------------------------------------------------------------------------


class _Nodes:
    """A list of ONNX nodes and initializers with unique, prefixed value names."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes = []
        self.initializers = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}{hint}_{self.count}"

    def const(self, value, hint: str = "const") -> str:
        from onnx import numpy_helper

        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def ints(self, values, hint: str = "axes") -> str:
        """A constant int64 vector (axes, sizes, slice bounds)."""
        return self.const(np.array(values, dtype=np.int64), hint)

    def op(self, op_type: str, inputs, hint: str | None = None, n_outputs: int = 1, **attributes):
        from onnx import helper

        outputs = [self.name(hint or op_type.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, **attributes))
        return outputs[0] if n_outputs == 1 else outputs


class _ScoringGraph:
    """Features (B, h, w, d) -> image scores (B,) and maps (B, H, W), as the detector scores them."""

    def __init__(self, detector: PatchCoreDetector, grid: tuple[int, int], size: tuple[int, int]):
        bank = np.asarray(detector.memory_bank_, dtype=np.float32)
        self.n_bank, self.n_dims = bank.shape
        self.k = min(int(detector.n_neighbors), self.n_bank)
        self.squared = detector.distance == "squared"
        self.grid, self.size = grid, size
        mean = bank.mean(axis=0, dtype=np.float64)
        self.mean = mean.astype(np.float32)
        centred = bank.astype(np.float64) - self.mean.astype(np.float64)
        self.bank = centred.astype(np.float32)
        self.sq_norms = np.einsum("ij,ij->i", self.bank, self.bank, dtype=np.float64).astype(np.float32)
        per_image = grid[0] * grid[1]
        self.chunk = max(self.k, _BANK_CHUNK_BYTES // (4 * per_image))
        self.support = None
        if detector.reweight_neighbors is not None:
            b = min(int(detector.reweight_neighbors), self.n_bank)
            # The b nearest bank vectors of each bank vector, as the fitted index finds them.
            _, support = detector._index.search(torch.from_numpy(bank), b)
            self.support = support.cpu().numpy().astype(np.int64)
        sigma, mode = float(detector.sigma), detector.upsampling
        self.rows_operator = _axis_operator(grid[0], size[0], sigma, mode, "cpu")
        self.cols_operator = _axis_operator(grid[1], size[1], sigma, mode, "cpu")

    def build(self, g: _Nodes, features: str) -> tuple[str, str]:
        """Add the nodes; return the names of the scores and the maps."""
        h, w = self.grid
        d = self.n_dims
        queries = g.op("Reshape", [features, g.const(np.array([-1, d], dtype=np.int64))], "queries")
        centred = g.op("Sub", [queries, g.const(self.mean[None, :], "bank_mean")], "centred")
        if self.n_bank <= self.chunk:
            bank = g.const(self.bank, "bank")
            if use_int8_filter(self.n_bank, self.n_dims, self.k):
                search = Int8Filter(self.bank, self.k)
                candidates = search.candidates(
                    g, centred, bank, lambda g, rows: self._candidates(g, rows, bank)
                )
            else:
                candidates = self._candidates(g, centred, bank)
        else:  # the bank is stored once, as the equal chunks the Scan takes
            bank = g.const(self._chunks(self.bank, 0.0), "bank_chunks")
            candidates = self._chunked_candidates(g, centred, bank)
        # Exact squared distances to the candidates: sum of squared differences.
        near = self._rows(g, bank, candidates)  # (N, k, d)
        diff = g.op("Sub", [g.op("Unsqueeze", [centred, g.const(np.array([1], dtype=np.int64))]), near])
        squared = g.op("ReduceSum", [g.op("Mul", [diff, diff]), g.ints([2])], "squared", keepdims=0)
        if self.k > 1:  # back in order of the exact distances
            squared, order = g.op(
                "TopK", [squared, g.ints([self.k])], "sorted", n_outputs=2, largest=0, sorted=1
            )
            candidates = g.op("GatherElements", [candidates, order], axis=1)
        distances = squared if self.squared else g.op("Sqrt", [squared], "distances")
        patch = g.op("ReduceMean", [distances, g.ints([1])], "patch_scores", keepdims=0)  # (N,)
        per_image = g.op("Reshape", [patch, g.const(np.array([-1, h * w], dtype=np.int64))])
        scores = g.op("ReduceMax", [per_image, g.ints([1])], "image_scores", keepdims=0)
        if self.support is not None:
            scores = g.op("Mul", [scores, self._reweighting(g, queries, per_image, candidates, bank)])
        grid = g.op("Reshape", [patch, g.const(np.array([-1, h, w], dtype=np.int64))], "grid")
        rows = g.const(self.rows_operator.numpy(), "map_rows")
        cols = g.const(self.cols_operator.T.contiguous().numpy(), "map_cols")
        maps = g.op("MatMul", [g.op("MatMul", [rows, grid]), cols], "maps")
        return scores, maps

    def _chunks(self, values: np.ndarray, padding: float) -> np.ndarray:
        """``values`` (n_bank, ...) cut into equal chunks (n_chunks, chunk, ...), the last one padded."""
        n_chunks = -(-self.n_bank // self.chunk)
        chunks = np.full((n_chunks * self.chunk, *values.shape[1:]), padding, dtype=values.dtype)
        chunks[: self.n_bank] = values
        return chunks.reshape(n_chunks, self.chunk, *values.shape[1:])

    def _rows(self, g: _Nodes, bank: str, indices: str) -> str:
        """Centred bank vectors at ``indices`` (any shape), with a last axis of d."""
        if self.n_bank <= self.chunk:
            return g.op("Gather", [bank, indices], axis=0)
        # (chunk, row in chunk) pairs for GatherND on the (n_chunks, chunk, d) bank.
        size = g.const(np.array(self.chunk, dtype=np.int64))
        last = g.const(np.array([-1], dtype=np.int64))
        pairs = [g.op("Div", [indices, size]), g.op("Mod", [indices, size])]
        pairs = g.op("Concat", [g.op("Unsqueeze", [p, last]) for p in pairs], axis=-1)
        return g.op("GatherND", [bank, pairs])

    def _candidates(self, g: _Nodes, centred: str, bank: str) -> str:
        """Indices (N, k) of the bank vectors with the smallest ``|y|^2 - 2 <x, y>``."""
        return self._smallest(g, centred, bank, g.const(self.sq_norms, "bank_sq_norms"), None)[1]

    def _chunked_candidates(self, g: _Nodes, centred: str, bank: str) -> str:
        """:meth:`_candidates` with the bank (n_chunks, chunk, d) searched one chunk at a time."""
        from onnx import TensorProto, helper

        n_chunks = -(-self.n_bank // self.chunk)
        norms = self._chunks(self.sq_norms, 1e30)  # padding rows: never a candidate
        offsets = (np.arange(n_chunks, dtype=np.int64) * self.chunk).reshape(n_chunks, 1)
        body = _Nodes(g.prefix + "scan/")
        names = [body.name("chunk"), body.name("norms"), body.name("offset")]
        values, indices = self._smallest(body, centred, names[0], names[1], names[2])
        values = body.op("Identity", [values], "chunk_values")
        indices = body.op("Identity", [indices], "chunk_indices")
        k = self.k
        graph = helper.make_graph(
            body.nodes,
            "bank_chunk",
            [
                helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [self.chunk, self.n_dims]),
                helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [self.chunk]),
                helper.make_tensor_value_info(names[2], TensorProto.INT64, [1]),
            ],
            [
                helper.make_tensor_value_info(values, TensorProto.FLOAT, ["n", k]),
                helper.make_tensor_value_info(indices, TensorProto.INT64, ["n", k]),
            ],
            initializer=body.initializers,
        )
        stacked_values, stacked_indices = g.op(
            "Scan",
            [bank, g.const(norms, "bank_chunk_sq_norms"), g.const(offsets, "bank_chunk_offsets")],
            "scan",
            n_outputs=2,
            body=graph,
            num_scan_inputs=3,
        )
        # (chunks, N, k) -> (N, chunks * k), then the k smallest of those.
        shape = g.const(np.array([0, -1], dtype=np.int64))
        merged_values = g.op("Reshape", [g.op("Transpose", [stacked_values], perm=[1, 0, 2]), shape])
        merged_indices = g.op("Reshape", [g.op("Transpose", [stacked_indices], perm=[1, 0, 2]), shape])
        _, positions = self._smallest_of(g, merged_values)
        return g.op("GatherElements", [merged_indices, positions], "candidates", axis=1)

    def _smallest(self, g: _Nodes, centred: str, bank: str, sq_norms: str, offset: str | None):
        """Values and indices (N, k) of the smallest ``|y|^2 - 2 <x, y>`` over ``bank`` (C, d)."""
        scores = g.op("Gemm", [centred, bank, sq_norms], "expansion", alpha=-2.0, beta=1.0, transB=1)
        values, indices = self._smallest_of(g, scores)
        if offset is not None:
            indices = g.op("Add", [indices, offset])
        return values, indices

    def _smallest_of(self, g: _Nodes, values: str) -> tuple[str, str]:
        if self.k == 1:
            indices = g.op("ArgMin", [values], "argmin", axis=1, keepdims=1)
            return g.op("GatherElements", [values, indices], axis=1), indices
        k = g.const(np.array([self.k], dtype=np.int64))
        return tuple(g.op("TopK", [values, k], "topk", n_outputs=2, largest=0, sorted=1))

    def _reweighting(self, g: _Nodes, queries: str, per_image: str, candidates: str, bank: str) -> str:
        """Eq. 7's weight (B,) of each image's worst patch, in float64 as the detector computes it."""
        from onnx import TensorProto

        h, w = self.grid
        worst = g.op("ArgMax", [per_image], "worst", axis=1, keepdims=1)  # (B, 1), first of equals
        first = g.op("Gather", [candidates, g.const(np.array(0, dtype=np.int64))], axis=1)  # (N,)
        nearest = g.op("Reshape", [first, g.const(np.array([-1, h * w], dtype=np.int64))])
        m_star = g.op("Squeeze", [g.op("GatherElements", [nearest, worst], axis=1), g.ints([1])])
        vectors = g.op("Reshape", [queries, g.const(np.array([-1, h * w, self.n_dims], dtype=np.int64))])
        patch = g.op("GatherND", [vectors, worst], "worst_patch", batch_dims=1)  # (B, d), not centred
        centred = g.op("Sub", [patch, g.const(self.mean[None, :])])
        support = g.op("Gather", [g.const(self.support, "bank_support"), m_star], axis=0)  # (B, b)

        def as_double(name):
            return g.op("Cast", [name], to=TensorProto.DOUBLE)

        patch64 = as_double(centred)
        neighbours = as_double(self._rows(g, bank, support))  # (B, b, d)
        nearest_vector = as_double(self._rows(g, bank, m_star))  # (B, d)
        one = g.const(np.array([1], dtype=np.int64))
        diff = g.op("Sub", [g.op("Unsqueeze", [patch64, one]), neighbours])
        to_support = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [diff, diff]), g.ints([2])], keepdims=0)])
        diff = g.op("Sub", [patch64, nearest_vector])
        to_nearest = g.op("Sqrt", [g.op("ReduceSum", [g.op("Mul", [diff, diff]), g.ints([1])], keepdims=0)])
        # 1 - softmax over the support, taken at m*, computed stably
        shift = g.op("ReduceMax", [to_support, g.ints([1])], keepdims=0)
        top = g.op("Exp", [g.op("Sub", [to_nearest, shift])])
        spread = g.op("Exp", [g.op("Sub", [to_support, g.op("Unsqueeze", [shift, one])])])
        share = g.op("Div", [top, g.op("ReduceSum", [spread, g.ints([1])], keepdims=0)])
        weight = g.op("Sub", [g.const(np.array(1.0, dtype=np.float64)), share])
        return g.op("Cast", [weight], "reweighting", to=TensorProto.FLOAT)


# --------------------------------------------------------------------------
# The whole graph, its metadata, the file
# --------------------------------------------------------------------------


def _assemble(onnx, feature_model, scoring: _ScoringGraph, size, n_channels: int):
    """One model: uint8 / float inputs -> features graph -> scoring nodes -> scores and maps."""
    from onnx import TensorProto, helper, numpy_helper

    g = _Nodes(_PREFIX)
    features_graph = feature_model.graph
    pixels_in = features_graph.input[0].name
    features_out = features_graph.output[0].name
    taken = {v for node in features_graph.node for v in (*node.input, *node.output)}
    taken |= {t.name for t in features_graph.initializer}
    if any(name.startswith(_PREFIX) for name in taken) or {UINT8_INPUT, FLOAT_INPUT} & (taken - {pixels_in}):
        raise RuntimeError("The exported features graph uses names reserved for the scoring nodes.")

    # images (uint8) / 255, then the float pixels: the order of the results.
    unit = g.op("Div", [g.op("Cast", [UINT8_INPUT], to=TensorProto.FLOAT), g.const(np.float32(255.0))])
    concatenated = g.op("Concat", [unit, FLOAT_INPUT], "pixels_all", axis=0)
    nodes, g.nodes = g.nodes, []
    for node in features_graph.node:
        node = copy.deepcopy(node)
        node.input[:] = [concatenated if v == pixels_in else v for v in node.input]
        nodes.append(node)
    scores, maps = scoring.build(g, features_out)
    nodes += g.nodes
    nodes.append(helper.make_node("Identity", [scores], [SCORES_OUTPUT]))
    nodes.append(helper.make_node("Identity", [maps], [MAPS_OUTPUT]))

    shape = ["batch", *size, n_channels]
    # Both inputs default to an empty batch (an initializer of the same name),
    # so a caller feeds the one its images come in.
    defaults = [
        numpy_helper.from_array(np.zeros((0, *size, n_channels), dtype=np.uint8), UINT8_INPUT),
        numpy_helper.from_array(np.zeros((0, *size, n_channels), dtype=np.float32), FLOAT_INPUT),
    ]
    graph = helper.make_graph(
        nodes,
        "skpatchcore",
        [
            helper.make_tensor_value_info(UINT8_INPUT, TensorProto.UINT8, shape),
            helper.make_tensor_value_info(FLOAT_INPUT, TensorProto.FLOAT, shape),
        ],
        [
            helper.make_tensor_value_info(SCORES_OUTPUT, TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info(MAPS_OUTPUT, TensorProto.FLOAT, ["batch", *size]),
        ],
        initializer=[*defaults, *features_graph.initializer, *g.initializers],
    )
    model = helper.make_model(
        graph, opset_imports=list(feature_model.opset_import), ir_version=feature_model.ir_version
    )
    model.functions.extend(feature_model.functions)
    onnx.checker.check_model(model, full_check=False)
    return model


def _metadata(features, detector, geometry: Geometry, size, grid) -> dict:
    backbone = features.backbone if isinstance(features.backbone, str) else type(features.backbone).__name__
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "skpatchcore_version": __version__,
        "threshold": float(detector.threshold_),
        "geometry": {f.name: _json_value(getattr(geometry, f.name)) for f in dataclasses.fields(geometry)},
        "input_size": list(size),
        "n_channels": int(features.n_channels_),
        "bit_depth": int(features.bit_depth),
        "backbone": backbone,
        "backbone_fingerprint": features.backbone_fingerprint_,
        "layers": list(features.layers_),
        "aggregation": features.aggregation,
        "patch_size": int(features.patch_size),
        "n_features": int(features.n_features_out_),
        "feature_grid": list(grid),
        "bank_size": int(len(detector.memory_bank_)),
        "n_neighbors": int(detector.n_neighbors),
        "reweight_neighbors": detector.reweight_neighbors,
        "distance": detector.distance,
        "sigma": float(detector.sigma),
        "upsampling": detector.upsampling,
        "inputs": {
            UINT8_INPUT: "uint8 (batch, H, W, C), optional",
            FLOAT_INPUT: "float32 (batch, H, W, C) in [0, 1], optional",
        },
        "outputs": {SCORES_OUTPUT: "float32 (batch,)", MAPS_OUTPUT: "float32 (batch, H, W)"},
    }


def _json_value(value):
    return list(value) if isinstance(value, tuple) else value


def _check_file(path: Path, model) -> None:
    """Compare the written file with the torch path on two synthetic images (when onnxruntime is here)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    from .runtime import OnnxPatchCore

    runtime = OnnxPatchCore(path, n_threads=max(1, torch.get_num_threads()), parallel="operators")
    height, width = runtime.input_size_
    # Random 8 x 8 px blocks: edges and flat areas for every stage, not pure noise.
    blocks = np.random.default_rng(0).integers(
        0, 256, (2, -(-height // 8), -(-width // 8), runtime.n_channels_), dtype=np.uint8
    )
    images = blocks.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    features, detector = model.steps[0][1], model.steps[-1][1]
    with torch.inference_mode():
        pixels = torch.from_numpy(images).float().div(255.0).permute(0, 3, 1, 2)
        expected_maps, expected_scores = detector._map_tensors(features._forward(pixels), (height, width))
    expected_maps, expected_scores = expected_maps.cpu().numpy(), expected_scores.cpu().numpy()
    maps, scores = runtime._run_batch(list(images))
    for name, got, expected in (("scores", scores, expected_scores), ("maps", maps, expected_maps)):
        error = float(np.max(np.abs(got - expected)) / max(float(np.max(np.abs(expected))), 1e-30))
        if not error <= _CHECK_RTOL:
            raise RuntimeError(
                f"The exported graph's {name} differ from the pipeline's by {error:.2g} (relative) on a test "
                f"image, more than {_CHECK_RTOL:g}; the backbone may not export faithfully. Nothing was "
                "written. Please report this with the backbone used."
            )
