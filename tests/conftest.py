"""Hypothesis runs the same examples on every run (``derandomize``), so a run of ``make test`` is
reproducible and a red CI run means a change broke something, not that a new random example was
drawn. To explore new examples (fuzzing for edge cases), run with ``HYPOTHESIS_PROFILE=explore``;
a failure found there is added as an ``@example`` or a fix."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))
