"""Pickling guards shared by the estimators (joblib.dump / joblib.load)."""

from __future__ import annotations

import warnings

from .._version import __version__


class ModelVersionWarning(UserWarning):
    """A model pickled by another skpatchcore version was loaded.

    Like scikit-learn's ``InconsistentVersionWarning``: the model may behave
    differently or break; refit it, or save it with :func:`skpatchcore.save`
    whose format is checked on load.

    Attributes
    ----------
    original_version : str
        Version that pickled the model ("unknown" for pickles without a stamp).
    current_version : str
        Version loading it.
    """

    def __init__(self, estimator_name: str, original_version: str, current_version: str):
        self.estimator_name = estimator_name
        self.original_version = original_version
        self.current_version = current_version

    def __str__(self) -> str:
        return (
            f"Trying to unpickle {self.estimator_name} from skpatchcore {self.original_version} with "
            f"skpatchcore {self.current_version}; results may differ or fail. Refit the model, or save "
            "it with skpatchcore.save(), whose files are checked when loaded."
        )


class VersionedPickleMixin:
    """Stamp pickles with the skpatchcore version and keep native state out of them.

    Subclasses override :meth:`_pickle_state` to drop or convert what must not
    be pickled (faiss indexes, CUDA tensors) and :meth:`_after_unpickle` to
    rebuild it.
    """

    def __getstate__(self):
        # object.__getstate__ hands out the live __dict__: work on a copy.
        state = self._pickle_state(dict(super().__getstate__()))
        state["_skpatchcore_version"] = __version__
        return state

    def __setstate__(self, state):
        version = state.pop("_skpatchcore_version", "unknown")
        if version != __version__:
            warnings.warn(ModelVersionWarning(type(self).__name__, version, __version__), stacklevel=2)
        super().__setstate__(state)
        self._after_unpickle()

    def _pickle_state(self, state: dict) -> dict:
        return state

    def _after_unpickle(self) -> None:
        pass
