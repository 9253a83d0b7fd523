"""``python -m d_engine_sm``: the ``d-engine-sm`` command line."""

from __future__ import annotations

import sys

from d_engine_sm._cli import main

if __name__ == "__main__":  # guarded: pytest --doctest-modules imports this module
    sys.exit(main())
