"""Hypothesis runs the same examples on every run (``derandomize``), so a run of ``make test`` is
reproducible and a red CI run means a change broke something, not that a new random example was
drawn. To explore new examples (fuzzing for edge cases), run with ``HYPOTHESIS_PROFILE=explore``;
a failure found there is added as an ``@example`` or a fix.

OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``, set before anything
imports torch, so that every process the tests start inherits it): with ``pytest -n 2`` on a 2-core
machine, two processes of torch's default 2 threads each spun on the cores the other needed, and a
4-step race on tiny-gpt took 90 s beside another instead of 10 s. The threads, and so the numbers,
are the same; only how a thread waits for work changes."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hypothesis import settings

settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))
