"""Safe model files: :func:`save` and :func:`load`.

Why not joblib? ``joblib.dump`` / ``joblib.load`` work with these estimators,
but a joblib file is a pickle, and **loading a pickle can run arbitrary
code**: the file names the functions to call while it is read, so a model
file from an untrusted source can do anything your user account can. Only
``joblib.load`` files you made yourself.

The format written by :func:`save` holds no pickle. :func:`load` parses JSON
and reads raw tensors with safetensors, nothing else: it builds the
estimators from a fixed list of skpatchcore classes, checks every parameter
with the estimators' own validation, and never imports a module or calls a
function that the file names. A file can at worst be refused.

File layout: a ZIP archive whose members are stored uncompressed, in this order

``skpatchcore-model``
    A fixed marker line. Being first, it sits at the start of the file, so a
    truncated model file is told apart from a foreign one.
``arrays.safetensors``
    The fitted arrays: memory bank, calibration scores, coreset indices, ...
``backbone.safetensors``
    Only when the backbone is a user's ``torch.nn.Module``: its state_dict.
    Such a model loads with ``load(path, backbone=<a module of the same
    architecture>)``. A named backbone (``"efficientnet_lite0"``, a
    torchvision or timm name) is rebuilt by name and weights instead, and
    must match the stored fingerprint of the fitted network.
``manifest.json``
    Format name and version; the versions of skpatchcore, Python, NumPy,
    torch, faiss, safetensors and scikit-learn that wrote it; the model (a
    pipeline's step names and its own parameters, or one estimator); for each
    estimator its class, every constructor parameter and its fitted scalar
    attributes (threshold, geometry, backbone fingerprint, device, ...) as
    JSON, and the name, dtype and shape of each of its arrays; and the size
    and SHA-256 of every other member.
``manifest.sha256``
    The SHA-256 of ``manifest.json``.

:func:`load` checks the marker, the members, every checksum, the format
version, the manifest's structure and every value, and refuses a truncated,
modified, damaged, newer-format or foreign file with a one-line
:class:`ModelFileError`. The checksums catch damage and careless edits, not
a deliberate forger (who can recompute them); what protects against a
malicious file is that loading one cannot run code.

Scores and maps of a loaded model are bit-identical to the saved one's on
the same device.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import zipfile
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._backbones import BackboneError, build_backbone, fingerprint
from ._coreset import GreedyCoresetSampler
from ._detector import PatchCoreDetector
from ._features import PatchFeatureTransformer
from ._pipeline import PatchCorePipeline
from ._version import __version__
from .utils._device import resolve_device
from .utils._errors import ModelFileError
from .utils._files import write_atomically
from .utils._geometry import LEGACY_RESIZE_SIDE, Geometry

__all__ = ["ModelFileError", "load", "save"]

FORMAT_NAME = "skpatchcore-model"
# 2: PatchFeatureTransformer has resize_side (version 1 files load with "shorter").
# 3: PatchFeatureTransformer has bit_depth, its geometry_ may letterbox into a box
#    (resize_side="fit", from crop_size="auto"), and backbone_fingerprint_ covers the
#    weights as read (see _backbones.check_fingerprint). GreedyCoresetSampler keeps
#    what partial_fit needs: coreset_ (an array that is also the detector's
#    memory_bank_ is stored once), projection_ (when there is one) and
#    n_vectors_seen_; in earlier files a pipeline's sampler takes the detector's bank
#    (the same vectors) when loaded. Versions 1 and 2 still load.
FORMAT_VERSION = 3

_MARKER = "skpatchcore-model"
_MARKER_TEXT = b"skpatchcore model file: read it with skpatchcore.load()\n"
_ARRAYS = "arrays.safetensors"
_BACKBONE = "backbone.safetensors"
_MANIFEST = "manifest.json"
_MANIFEST_DIGEST = "manifest.sha256"
# Fixed member timestamps: the same model always gives the same bytes.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

_CLASSES = {cls.__name__: cls for cls in (PatchFeatureTransformer, GreedyCoresetSampler, PatchCoreDetector)}
_PIPELINE_CLASSES = (Pipeline, PatchCorePipeline)
# Fitted attributes written per class: JSON scalars and arrays (with their dtype).
_SCALARS = {
    PatchFeatureTransformer: (
        "backbone_fingerprint_",
        "device_",
        "geometry_",
        "layers_",
        "n_channels_",
        "n_features_out_",
    ),
    GreedyCoresetSampler: ("n_features_in_", "n_patches_seen_", "n_vectors_seen_"),
    PatchCoreDetector: ("device_", "n_features_in_", "offset_", "threshold_"),
}
_ARRAY_DTYPES = {
    PatchFeatureTransformer: {},
    GreedyCoresetSampler: {"sample_indices_": "int64", "coreset_": "float32", "projection_": "float32"},
    PatchCoreDetector: {"memory_bank_": "float32", "calibration_scores_": "float32"},
}
# Arrays a file may lack: a sampler without a projection (or fitted by skpatchcore
# 0.1, then saved); scalars that files before ``FORMAT_VERSION`` 3 lack.
_OPTIONAL_ARRAYS = {GreedyCoresetSampler: {"coreset_", "projection_"}}
_SCALARS_SINCE_3 = {"n_vectors_seen_"}
# Rebuilt on load rather than stored.
_REBUILT = {PatchFeatureTransformer: {"backbone_"}, GreedyCoresetSampler: set(), PatchCoreDetector: set()}


# --------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------


def save(model, path) -> None:
    """Write a fitted model to one file that loading cannot turn into code.

    Parameters
    ----------
    model : PatchCorePipeline, Pipeline or estimator
        A fitted :class:`PatchCorePipeline` (from :func:`make_patchcore`), a
        fitted :class:`~sklearn.pipeline.Pipeline` whose steps are
        skpatchcore estimators (or ``"passthrough"``), or one fitted
        :class:`PatchFeatureTransformer`, :class:`GreedyCoresetSampler` or
        :class:`PatchCoreDetector`.
    path : str or path-like
        The file to write (replaced if it exists; written to a temporary
        file first, so a failure never leaves half a model). The suffix is
        free; ``.skpatchcore`` is customary.

    See Also
    --------
    load : Read the file back.

    Notes
    -----
    Every constructor parameter must be JSON-representable (numbers,
    strings, None, lists, tuples, dicts, paths, devices); a
    ``numpy.random.RandomState`` as ``random_state`` is refused. A backbone
    given as a ``torch.nn.Module`` is stored as its state_dict and must be
    passed again to :func:`load`.

    Examples
    --------
    >>> import numpy as np, os, tempfile
    >>> from skpatchcore import PatchCoreDetector, load, save
    >>> train = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> detector = PatchCoreDetector(device="cpu").fit(train)
    >>> path = os.path.join(tempfile.mkdtemp(), "detector.skpatchcore")
    >>> save(detector, path)
    >>> bool((load(path).score_samples(train) == detector.score_samples(train)).all())
    True
    """
    arrays = _Arrays()
    backbone_state: dict[str, torch.Tensor] = {}
    if isinstance(model, Pipeline):
        description = _describe_pipeline(model, arrays, backbone_state)
    else:
        entry = _describe_estimator(model, "estimator", arrays, backbone_state)
        description = {"type": "estimator", "estimator": entry}
    from safetensors.numpy import save as save_arrays

    members = {_MARKER: _MARKER_TEXT, _ARRAYS: save_arrays(arrays.stored)}
    if backbone_state:
        from safetensors.torch import save as save_tensors

        members[_BACKBONE] = save_tensors(backbone_state)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "written_by": _versions(),
        "model": description,
        "members": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in members.items()
        },
    }
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")
    members[_MANIFEST] = manifest_bytes
    members[_MANIFEST_DIGEST] = (hashlib.sha256(manifest_bytes).hexdigest() + "\n").encode("ascii")
    _write_zip(Path(path), members)


def _write_zip(path: Path, members: dict[str, bytes]) -> None:
    def write(raw) -> None:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as archive:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
                info.compress_type = zipfile.ZIP_STORED
                archive.writestr(info, data)

    write_atomically(path, write)


def _versions() -> dict:
    import faiss
    import safetensors

    return {
        "skpatchcore": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "safetensors": safetensors.__version__,
        "scikit-learn": sklearn.__version__,
    }


class _Arrays:
    """The arrays a file stores, each once: an array object given again (a sampler's
    ``coreset_`` that is its detector's ``memory_bank_``) keeps its first key."""

    def __init__(self):
        self.stored: dict[str, np.ndarray] = {}
        self._keys: dict[int, str] = {}

    def add(self, key: str, value: np.ndarray) -> str:
        """Store ``value`` under ``key``, or return the key it is already stored under."""
        if id(value) in self._keys:
            return self._keys[id(value)]
        self.stored[key] = np.ascontiguousarray(value)
        self._keys[id(value)] = key
        return key


def _describe_pipeline(model: Pipeline, arrays: _Arrays, backbone_state: dict) -> dict:
    if type(model) not in _PIPELINE_CLASSES:
        raise TypeError(
            f"save() stores a Pipeline or PatchCorePipeline; got the subclass {type(model).__name__}."
        )
    check_is_fitted(model)
    steps = []
    # Last step first: an array shared with an earlier step (the coreset step's
    # coreset_, which is the detector's memory_bank_) is stored under the later key.
    for position, (name, step) in reversed(list(enumerate(model.steps))):
        if step is None or step == "passthrough":
            steps.insert(0, {"name": name, "passthrough": True})
            continue
        entry = _describe_estimator(step, f"steps.{position}", arrays, backbone_state)
        steps.insert(0, {"name": name, "estimator": entry})
    params = model.get_params(deep=False)
    del params["steps"]
    # A joblib.Memory is kept as its folder: the cache is not part of the model.
    params["memory"] = getattr(params["memory"], "location", params["memory"])
    return {
        "type": "pipeline",
        "class": type(model).__name__,
        "steps": steps,
        "params": {key: _encode(value, f"pipeline parameter {key!r}") for key, value in params.items()},
    }


def _describe_estimator(estimator, prefix: str, arrays: _Arrays, backbone_state: dict) -> dict:
    """The manifest entry of one fitted estimator; its arrays and backbone tensors go under ``prefix``."""
    cls = type(estimator)
    if _CLASSES.get(cls.__name__) is not cls:
        raise TypeError(
            "save() stores skpatchcore's PatchFeatureTransformer, GreedyCoresetSampler, PatchCoreDetector "
            f"and pipelines of them; got {cls.__module__}.{cls.__qualname__}."
        )
    check_is_fitted(estimator)
    state = vars(estimator)
    known = set(_SCALARS[cls]) | set(_ARRAY_DTYPES[cls]) | _REBUILT[cls]
    unknown = sorted(k for k in state if k.endswith("_") and not k.startswith("_") and k not in known)
    if unknown:
        raise TypeError(
            f"save() does not know how to store the fitted attribute(s) {unknown} of {cls.__name__}; "
            "skpatchcore._persistence must be taught them."
        )
    params = {
        key: _encode(value, f"{cls.__name__} parameter {key!r}")
        for key, value in estimator.get_params(deep=False).items()
        if not (cls is PatchFeatureTransformer and key == "backbone")
    }
    backbone = estimator.backbone if cls is PatchFeatureTransformer else None
    if isinstance(backbone, nn.Module):
        # A user's module: its class name for the messages, its fitted weights as tensors.
        params["backbone"] = {"$module": type(backbone).__name__}
        for key, tensor in estimator.backbone_.state_dict().items():
            # Cloned: safetensors refuses tensors that share memory (tied weights).
            backbone_state[f"{prefix}.{key}"] = tensor.detach().cpu().contiguous().clone()
    elif backbone is not None:
        params["backbone"] = _encode(backbone, "PatchFeatureTransformer parameter 'backbone'")
    fitted = {name: _encode_fitted(state[name]) for name in _SCALARS[cls]}
    stored_arrays = {}
    for name, dtype in _ARRAY_DTYPES[cls].items():
        value = state.get(name)
        if value is None and name in _OPTIONAL_ARRAYS.get(cls, ()):
            continue
        if value.dtype != np.dtype(dtype):
            raise TypeError(f"{cls.__name__}.{name} should be {dtype}; got {value.dtype}.")
        key = arrays.add(f"{prefix}.{name}", value)
        stored_arrays[name] = {"key": key, "dtype": dtype, "shape": list(value.shape)}
    return {
        "class": cls.__name__,
        "prefix": prefix,
        "params": params,
        "fitted": fitted,
        "arrays": stored_arrays,
    }


def _encode(value, where: str):
    """A parameter value as JSON; tuples, dicts, paths and devices are tagged ``{"$kind": ...}``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, Real) and np.isfinite(value):
        return float(value)
    if isinstance(value, list):
        return [_encode(item, where) for item in value]
    if isinstance(value, tuple):
        return {"$tuple": [_encode(item, where) for item in value]}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"$dict": {key: _encode(item, where) for key, item in value.items()}}
    if isinstance(value, os.PathLike):
        return {"$path": os.fspath(value)}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    raise TypeError(
        f"save() cannot store the {where} = {value!r}: model files hold parameters as JSON (numbers, "
        "strings, None, lists, tuples, dicts of str keys, paths, devices). Set it to such a value "
        "(for random_state: an int seed or None) and refit."
    )


def _encode_fitted(value):
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Geometry):
        return {
            "image_size": _encode(value.image_size, "geometry"),
            "crop_size": _encode(value.crop_size, "geometry"),
            "resize_side": value.resize_side,
        }
    if isinstance(value, tuple):
        return list(value)
    return _encode(value, "fitted attribute")


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def load(path, *, backbone: nn.Module | None = None, device=None):
    """Read a model written by :func:`save`, checking everything first.

    Parameters
    ----------
    path : str or path-like
        The model file.
    backbone : torch.nn.Module, default=None
        Needed only when the model was fitted with a user's module as its
        backbone: a module of the same architecture (its weights are replaced
        by the stored ones). For a named backbone, leave it None.
    device : str or torch.device, default=None
        Where the loaded model computes (features and search). None keeps the
        device it was fitted on when that exists here, else the CPU with a
        warning. The estimators' ``device`` parameters are left as saved.

    Returns
    -------
    model : PatchCorePipeline or estimator
        A :class:`PatchCorePipeline` for a saved pipeline (also one saved from
        a plain :class:`~sklearn.pipeline.Pipeline`), else the estimator.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ModelFileError
        The file is not a model file, or is truncated, damaged, modified or
        of a newer format version.
    BackboneError
        The backbone cannot be rebuilt as it was fitted: a named backbone's
        weights differ on this machine, or a user's module is missing or does
        not fit the stored weights.

    See Also
    --------
    save : Write a model file.
    """
    path = Path(path)
    shown = repr(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"The model file {shown} does not exist.")
    if not path.is_file():
        raise ModelFileError(
            f"The model {shown} is a folder, not a model file written by skpatchcore.save()."
        )
    target = None if device is None else resolve_device(device)
    members = _read_members(path, shown)
    manifest = members.pop(_MANIFEST)
    arrays = _read_arrays(members.get(_ARRAYS), shown)
    tensors = _read_backbone_state(members.get(_BACKBONE), shown)
    loader = _Loader(shown, arrays, tensors, backbone, target, manifest["format_version"])
    description = _field(manifest, "model", dict, shown)
    kind = _field(description, "type", str, shown)
    if kind == "estimator":
        model = loader.estimator(_field(description, "estimator", dict, shown))
    elif kind == "pipeline":
        model = loader.pipeline(description)
    else:
        raise ModelFileError(f"The model file {shown} describes an unknown kind of model {kind!r}.")
    loader.check_everything_used()
    return model


def _read_members(path: Path, shown: str) -> dict:
    """Every member's bytes, after checking the archive, the checksums and the format version."""
    with open(path, "rb") as raw:
        head = raw.read(30 + len(_MARKER))
    # A local file header: signature, ..., name length at byte 26, name from byte 30.
    has_marker = head[:4] == b"PK\x03\x04" and head[30:] == _MARKER.encode()
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        if has_marker:
            raise ModelFileError(
                f"The model file {shown} is truncated or damaged: its zip directory is missing or broken."
            ) from None
        raise ModelFileError(
            f"{shown} is not a skpatchcore model file (it is not a zip archive); "
            "write model files with skpatchcore.save()."
        ) from None
    with archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if not has_marker or not names or names[0] != _MARKER:
            raise ModelFileError(
                f"{shown} is not a skpatchcore model file (a zip archive without the skpatchcore "
                "marker); write model files with skpatchcore.save()."
            )
        if len(set(names)) != len(names):
            raise ModelFileError(f"The model file {shown} was modified: a member name appears twice.")
        missing = {_MANIFEST, _MANIFEST_DIGEST} - set(names)
        if missing:
            raise ModelFileError(f"The model file {shown} is damaged: member(s) {sorted(missing)} missing.")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise ModelFileError(
                    f"The model file {shown} was modified: member {info.filename!r} is compressed."
                )
        manifest_bytes = _member(archive, _MANIFEST, shown)
        digest = _member(archive, _MANIFEST_DIGEST, shown).decode("ascii", "replace").strip()
        if hashlib.sha256(manifest_bytes).hexdigest() != digest:
            raise ModelFileError(
                f"The model file {shown} was modified or damaged: manifest.json does not match its "
                "SHA-256 in manifest.sha256."
            )
        manifest = _parse_manifest(manifest_bytes, shown)
        listed = _field(manifest, "members", dict, shown)
        extra = set(names) - set(listed) - {_MANIFEST, _MANIFEST_DIGEST}
        absent = set(listed) - set(names)
        if extra:
            raise ModelFileError(
                f"The model file {shown} was modified: member(s) {sorted(extra)} are not in the manifest."
            )
        if absent:
            raise ModelFileError(
                f"The model file {shown} is damaged: member(s) {sorted(absent)} are missing."
            )
        members = {_MANIFEST: manifest}
        for name, record in listed.items():
            record = _field(listed, name, dict, shown)
            size = _field(record, "size", int, shown)
            if archive.getinfo(name).file_size != size:
                raise ModelFileError(
                    f"The model file {shown} was modified or damaged: member {name!r} has "
                    f"{archive.getinfo(name).file_size} bytes, the manifest says {size}."
                )
            data = _member(archive, name, shown)
            if hashlib.sha256(data).hexdigest() != _field(record, "sha256", str, shown):
                raise ModelFileError(
                    f"The model file {shown} was modified or damaged: member {name!r} does not match "
                    "its SHA-256 in the manifest."
                )
            members[name] = data
    if members.get(_MARKER) != _MARKER_TEXT:
        raise ModelFileError(
            f"The model file {shown} was modified: its marker member is not the expected text."
        )
    return members


def _member(archive: zipfile.ZipFile, name: str, shown: str) -> bytes:
    try:
        return archive.read(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ModelFileError(
            f"The model file {shown} is damaged or was modified: member {name!r} cannot be read "
            f"({_first_line(error)})."
        ) from None


def _parse_manifest(data: bytes, shown: str) -> dict:
    def refuse_constant(name):
        raise ValueError(f"non-finite number {name}")

    try:
        manifest = json.loads(data.decode("utf-8"), parse_constant=refuse_constant)
    except ValueError as error:  # also UnicodeDecodeError and json.JSONDecodeError
        raise ModelFileError(
            f"The model file {shown} has a manifest.json that is not valid JSON ({error})."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{shown} is not a skpatchcore model file (its manifest names another format).")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(f"The model file {shown} has an invalid format version {version!r}.")
    if version > FORMAT_VERSION:
        written_by = manifest.get("written_by")
        by = written_by.get("skpatchcore") if isinstance(written_by, dict) else None
        raise ModelFileError(
            f"The model file {shown} uses format version {version} (written by skpatchcore {by}); "
            f"this skpatchcore ({__version__}) reads up to version {FORMAT_VERSION}: upgrade skpatchcore "
            "to load it."
        )
    return manifest


def _read_arrays(data: bytes | None, shown: str) -> dict[str, np.ndarray]:
    if data is None:
        raise ModelFileError(f"The model file {shown} is damaged: member {_ARRAYS!r} is missing.")
    from safetensors.numpy import load as load_arrays

    try:
        return load_arrays(data)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for bad data
        raise ModelFileError(
            f"The model file {shown} has unreadable arrays ({_first_line(error)})."
        ) from None


def _read_backbone_state(data: bytes | None, shown: str) -> dict[str, torch.Tensor] | None:
    if data is None:
        return None
    from safetensors.torch import load as load_tensors

    try:
        return load_tensors(data)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for bad data
        raise ModelFileError(
            f"The model file {shown} has unreadable backbone weights ({_first_line(error)})."
        ) from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _field(mapping: dict, key: str, kind: type, shown: str):
    value = mapping.get(key) if isinstance(mapping, dict) else None
    valid = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not valid:
        raise ModelFileError(
            f"The model file {shown} has an invalid manifest: {key!r} should be a {kind.__name__}; "
            f"got {value!r}."[:300]
        )
    return value


def _decode(value, shown: str):
    """Inverse of :func:`_encode`; anything else than its output is refused."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(item, shown) for item in value]
    if isinstance(value, dict) and len(value) == 1:
        [(tag, content)] = value.items()
        if tag == "$tuple" and isinstance(content, list):
            return tuple(_decode(item, shown) for item in content)
        if tag == "$dict" and isinstance(content, dict):
            return {key: _decode(item, shown) for key, item in content.items()}
        if tag == "$path" and isinstance(content, str):
            return Path(content)
        if tag == "$device" and isinstance(content, str):
            try:
                return torch.device(content)
            except (RuntimeError, TypeError):
                pass
    raise ModelFileError(f"The model file {shown} holds a parameter value it cannot hold: {value!r}."[:300])


class _Loader:
    """Builds estimators from manifest entries, taking their arrays as it goes."""

    def __init__(self, shown, arrays, backbone_state, backbone, device, version: int):
        self.shown = shown
        self.version = version
        self.arrays = dict(arrays)
        self.used: set[str] = set()
        self.backbone_state = dict(backbone_state or {})
        self.backbone = backbone
        self.device = device

    def fail(self, message: str):
        raise ModelFileError(f"The model file {self.shown} {message}"[:600])

    def pipeline(self, description: dict) -> PatchCorePipeline:
        steps = []
        for entry in _field(description, "steps", list, self.shown):
            name = _field(entry, "name", str, self.shown)
            if entry.get("passthrough") is True:
                steps.append((name, "passthrough"))
            else:
                steps.append((name, self.estimator(_field(entry, "estimator", dict, self.shown))))
        raw = _field(description, "params", dict, self.shown)
        params = {key: _decode(value, self.shown) for key, value in raw.items()}
        try:
            model = PatchCorePipeline(steps, **params)
            model._validate_params()
            model._validate_steps()
        except (TypeError, ValueError) as error:
            self.fail(f"describes an invalid pipeline: {_first_line(error)}")
        model._share_bank()  # files before version 3: the coreset step takes the detector's bank
        return model

    def estimator(self, entry: dict):
        name = _field(entry, "class", str, self.shown)
        cls = _CLASSES.get(name)
        if cls is None:
            self.fail(
                f"names an estimator class {name!r} that is not one of skpatchcore's {sorted(_CLASSES)}."
            )
        raw = dict(_field(entry, "params", dict, self.shown))
        module_backbone = cls is PatchFeatureTransformer and _is_module_reference(raw.get("backbone"))
        module_name = raw.pop("backbone")["$module"] if module_backbone else None
        params = {key: _decode(value, self.shown) for key, value in raw.items()}
        if cls is PatchFeatureTransformer:
            params["backbone"] = self._backbone_param(params.get("backbone"), module_name)
            # Files written before resize_side existed resized the shorter side (the default then).
            params.setdefault("resize_side", LEGACY_RESIZE_SIDE)
        try:
            estimator = cls(**params)
            estimator._validate_params()
        except (TypeError, ValueError) as error:
            self.fail(f"holds invalid parameters for {name}: {_first_line(error)}")
        fitted = _field(entry, "fitted", dict, self.shown)
        missing = [
            key
            for key in _SCALARS[cls]
            if key not in fitted and not (self.version < 3 and key in _SCALARS_SINCE_3)
        ]
        if missing:
            self.fail(f"lacks the fitted attribute(s) {missing} of {name}.")
        arrays = self._take_arrays(cls, _field(entry, "arrays", dict, self.shown))
        try:
            if cls is PatchFeatureTransformer:
                prefix = _field(entry, "prefix", str, self.shown) if module_backbone else None
                self._restore_features(estimator, fitted, prefix)
            elif cls is GreedyCoresetSampler:
                self._restore_coreset(estimator, fitted, arrays)
            else:
                self._restore_detector(estimator, fitted, arrays)
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            if isinstance(error, (BackboneError, ModelFileError)):
                raise
            self.fail(f"holds invalid fitted values for {name}: {_first_line(error)}")
        return estimator

    def _backbone_param(self, value, module_name: str | None):
        if module_name is not None:
            if self.backbone is None:
                raise BackboneError(
                    f"The model in {self.shown} was fitted with a user's backbone module "
                    f"({module_name}); pass a module of that architecture: "
                    "skpatchcore.load(path, backbone=<module>)."
                )
            if not isinstance(self.backbone, nn.Module):
                raise BackboneError(
                    f"The 'backbone' argument of load() must be a torch.nn.Module; got "
                    f"{type(self.backbone).__name__}."
                )
            return self.backbone
        if self.backbone is not None:
            raise BackboneError(
                f"The model in {self.shown} uses the named backbone {value!r}, rebuilt by name on "
                "load; do not pass backbone= to load()."
            )
        return value

    def _take_arrays(self, cls, entries: dict) -> dict[str, np.ndarray]:
        expected, optional = set(_ARRAY_DTYPES[cls]), _OPTIONAL_ARRAYS.get(cls, set())
        if not expected - optional <= set(entries) <= expected:
            self.fail(
                f"lists arrays {sorted(entries)} for {cls.__name__}; expected {sorted(expected - optional)}"
                + (f" and optionally {sorted(optional)}." if optional else ".")
            )
        taken = {}
        for name, dtype in _ARRAY_DTYPES[cls].items():
            if name not in entries:
                continue
            record = _field(entries, name, dict, self.shown)
            key = _field(record, "key", str, self.shown)
            if key not in self.arrays:
                self.fail(f"lacks the array {key!r}.")
            value = self.arrays[key]  # an array stored once for two estimators is theirs to share
            self.used.add(key)
            if value.dtype != np.dtype(dtype) or list(value.shape) != record.get("shape"):
                self.fail(
                    f"has array {key!r} of {value.dtype} {list(value.shape)}; the manifest says "
                    f"{dtype} {record.get('shape')}."
                )
            taken[name] = value
        return taken

    def _device(self, saved) -> torch.device:
        # An explicit device wins; else the fitted one (moved to the CPU with a
        # warning by the estimators' own _after_unpickle when CUDA is absent).
        if self.device is not None:
            return self.device
        try:
            device = torch.device(saved)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ValueError(f"device_ must name a CPU or CUDA device; got {saved!r}")
        return device

    def _restore_features(self, estimator: PatchFeatureTransformer, fitted: dict, prefix: str | None):
        """Fitted state of the transformer; ``prefix`` names the stored weights of a user's module."""
        geometry = _field(fitted, "geometry_", dict, self.shown)
        # Files written before resize_side existed resized the shorter side.
        estimator.geometry_ = Geometry(
            _decode(geometry.get("image_size"), self.shown),
            _decode(geometry.get("crop_size"), self.shown),
            geometry.get("resize_side", LEGACY_RESIZE_SIDE),
        )
        estimator.n_channels_ = _positive_int(fitted["n_channels_"])
        if estimator.n_channels_ not in (1, 3):
            raise ValueError(f"n_channels_ must be 1 or 3; got {estimator.n_channels_}")
        estimator.backbone_fingerprint_ = _field(fitted, "backbone_fingerprint_", str, self.shown)
        estimator.device_ = self._device(fitted["device_"])
        layers = fitted["layers_"]
        if not (isinstance(layers, list) and layers and all(isinstance(layer, str) for layer in layers)):
            raise ValueError(f"layers_ must be a list of names; got {layers!r}")
        if prefix is not None:
            estimator.backbone_ = self._user_extractor(estimator, tuple(layers), prefix)
        else:
            estimator.backbone_ = None  # rebuilt by name, checked against the fingerprint
        # The estimators' own hook rebuilds the derived state (and a named backbone).
        estimator._after_unpickle()
        if list(estimator.layers_) != layers or estimator.n_features_out_ != fitted["n_features_out_"]:
            raise ValueError(
                f"the rebuilt backbone gives layers {list(estimator.layers_)} and "
                f"{estimator.n_features_out_} features, the file says {layers} and "
                f"{fitted['n_features_out_']}"
            )

    def _user_extractor(self, estimator: PatchFeatureTransformer, layers: tuple, prefix: str):
        start = prefix + "."
        state = {
            key[len(start) :]: value for key, value in self.backbone_state.items() if key.startswith(start)
        }
        if not state:
            self.fail(f"lacks the member {_BACKBONE!r} with the weights of the user's backbone.")
        self.backbone_state = {k: v for k, v in self.backbone_state.items() if not k.startswith(start)}
        extractor = build_backbone(estimator.backbone, list(layers), None)
        try:
            extractor.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise BackboneError(
                f"The backbone module given to load() does not fit the weights stored in {self.shown} "
                f"({_first_line(error)}); pass a module of the architecture the model was fitted with."
            ) from None
        if fingerprint(extractor) != estimator.backbone_fingerprint_:
            raise BackboneError(
                f"The backbone module given to load() holds the stored weights of {self.shown} but its "
                "fingerprint differs (other dtypes or extra state); pass a module of the architecture "
                "the model was fitted with."
            )
        return extractor

    def _restore_coreset(self, estimator: GreedyCoresetSampler, fitted: dict, arrays: dict):
        n_features = estimator.n_features_in_ = _positive_int(fitted["n_features_in_"])
        estimator.n_patches_seen_ = _positive_int(fitted["n_patches_seen_"])
        indices = arrays["sample_indices_"]
        if indices.ndim != 1 or len(indices) == 0 or indices.min() < 0:
            raise ValueError("sample_indices_ must be a non-empty 1-D array of non-negative indices")
        estimator.sample_indices_ = indices
        # Files from before version 3 did not count every vector seen (see _after_unpickle).
        default = max(estimator.n_patches_seen_, int(indices.max()) + 1)
        estimator.n_vectors_seen_ = _positive_int(fitted.get("n_vectors_seen_", default))
        if "coreset_" in arrays:
            coreset = arrays["coreset_"]
            if coreset.shape != (len(indices), n_features) or not np.isfinite(coreset).all():
                raise ValueError(f"coreset_ must be ({len(indices)}, {n_features}) finite values")
            estimator.coreset_ = coreset
            projection = arrays.get("projection_")
            if projection is not None and (projection.ndim != 2 or len(projection) != n_features):
                raise ValueError(f"projection_ must be ({n_features}, k); got {projection.shape}")
            estimator.projection_ = projection

    def _restore_detector(self, estimator: PatchCoreDetector, fitted: dict, arrays: dict):
        estimator.n_features_in_ = _positive_int(fitted["n_features_in_"])
        bank, calibration = arrays["memory_bank_"], arrays["calibration_scores_"]
        if bank.ndim != 2 or len(bank) == 0 or bank.shape[1] != estimator.n_features_in_:
            raise ValueError(f"memory_bank_ must be (n, {estimator.n_features_in_}); got {bank.shape}")
        if not np.isfinite(bank).all():
            raise ValueError("memory_bank_ holds NaN or infinite values")
        if calibration.ndim != 1:
            raise ValueError(f"calibration_scores_ must be 1-D; got {calibration.shape}")
        threshold, offset = fitted["threshold_"], fitted["offset_"]
        if not isinstance(threshold, float) or offset != -threshold:
            raise ValueError(f"threshold_ {threshold!r} and offset_ {offset!r} disagree")
        estimator.memory_bank_ = bank
        estimator.calibration_scores_ = calibration
        estimator.set_threshold(threshold)
        estimator.device_ = self._device(fitted["device_"])
        estimator._after_unpickle()  # rebuilds the search index on device_

    def check_everything_used(self):
        unused = sorted(set(self.arrays) - self.used)
        if unused:
            self.fail(f"holds arrays {unused[:5]} that no estimator uses.")
        if self.backbone_state:
            self.fail(f"holds backbone weights {sorted(self.backbone_state)[:3]} that no estimator uses.")


def _is_module_reference(value) -> bool:
    return isinstance(value, dict) and set(value) == {"$module"} and isinstance(value["$module"], str)


def _positive_int(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a positive int; got {value!r}")
    return value
