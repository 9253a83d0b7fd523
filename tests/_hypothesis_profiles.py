"""Hypothesis settings for the hardening tests (model, transfer properties).

Two profiles, chosen by the ``HYPOTHESIS_PROFILE`` environment variable:

* ``ci`` (default): few, bounded examples, derandomized (a fixed seed per
  test) and no example database, so every run tries the same inputs.
* ``long``: many more and longer examples, random, for a soak before a
  release: ``HYPOTHESIS_PROFILE=long pytest tests/test_model.py
  tests/test_transfer_properties.py --timeout 3600``.

Tests apply :data:`PROFILE` explicitly (``@PROFILE`` or ``settings=PROFILE``)
rather than loading it globally, so other modules' settings are untouched.
"""

from __future__ import annotations

import os
from typing import Final

from hypothesis import HealthCheck, settings

_SLOW_OK: Final = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

settings.register_profile(
    "ci",
    max_examples=30,
    stateful_step_count=25,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=2000,
    stateful_step_count=80,
    derandomize=False,
    deadline=None,
    suppress_health_check=_SLOW_OK,
    print_blob=True,
)

PROFILE_NAME: Final = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE_NAME not in ("ci", "long"):
    raise ValueError(f"HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE_NAME!r}")
PROFILE: Final = settings.get_profile(PROFILE_NAME)
"""The selected profile, to pass to ``@settings`` / ``run_state_machine_as_test``."""

LONG: Final = PROFILE_NAME == "long"
"""True under the long profile (tests may scale their own bounds with it)."""
