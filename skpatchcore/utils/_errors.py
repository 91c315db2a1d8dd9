"""Exceptions shared by the torch stack and the torch-free runtime."""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file is not a valid skpatchcore model file.

    Raised by :func:`skpatchcore.load` and by
    :class:`skpatchcore.runtime.OnnxPatchCore` for a foreign, truncated,
    damaged or modified file, or one written in a newer format version; the
    message says which, on one line.
    """
