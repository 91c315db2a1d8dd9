"""Write the committed portable model file and the scores it gave where it was fitted.

Run once, from the repository root, to (re)create ``tests/data/portable_lite0.*``::

    python tests/data/make_portable_model.py

tests/test_portability.py loads the file on whatever machine runs the tests and
checks that it reproduces the recorded scores and maps within tolerance.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from skpatchcore import __version__, make_patchcore, save  # noqa: E402
from tests._portable import MAP_STEP, MODEL_FILE, MODEL_PARAMS, RECORD_FILE, portable_parts  # noqa: E402


def main() -> None:
    model = make_patchcore(**MODEL_PARAMS).fit(portable_parts(10, seed=1))
    save(model, HERE / MODEL_FILE)
    test = portable_parts(4, defect=True, seed=2)
    maps, scores = model.predict_map(test, return_scores=True)
    record = {
        "written_by": f"skpatchcore {__version__} on {platform.machine()} ({platform.processor() or '?'})",
        "threshold": model.named_steps["detector"].threshold_,
        "scores": [float(s) for s in scores],
        "maps": maps[:, ::MAP_STEP, ::MAP_STEP].round(6).tolist(),
    }
    (HERE / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {MODEL_FILE} and {RECORD_FILE}: scores {record['scores']}")


if __name__ == "__main__":
    main()
