"""Writing a file whole or not at all (model files, exported ONNX files)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomically(path, write, verify=None) -> None:
    """Write ``path`` through a temporary file beside it, then rename it into place.

    ``write(stream)`` writes the content into an open binary stream;
    ``verify(temporary_path)``, when given, may check the finished file and
    raise. A reader never sees a half-written file, and an error leaves any
    earlier file at ``path`` as it was. ``mkstemp`` makes files private
    (0600); the file gets the usual permissions of a new file (0666 less the
    umask), so that e.g. a service account can read it.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temporary, 0o666 & ~_umask())
        if verify is not None:
            verify(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
