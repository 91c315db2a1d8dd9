"""``python -m skpatchcore``: the same as the ``skpatchcore`` command."""

import sys

from .cli import main

# The guard keeps tools that import every module (pytest --doctest-modules) from running the command.
if __name__ == "__main__":
    sys.exit(main())
