r"""Dynamic sampling: a batch size that grows geometrically.

Growing the sample size :math:`|S_k| = \lceil b_0 r^k \rceil` (:math:`r > 1`) makes the
variance of the gradient estimate fall geometrically, so a constant step size converges
linearly in expectation on strongly convex problems, like a batch method, while the early
iterations stay as cheap as SGD's (Friedlander & Schmidt 2012, SIAM J. Sci. Comput. 34,
arXiv:1104.2373; Byrd, Chin, Nocedal & Wu 2012, Math. Prog. 134; Bottou, Curtis & Nocedal
2018, SIAM Review 60, Thm. 5.3).
"""

from __future__ import annotations

import math
from typing import Any

from gradwise.validation import check_int, check_range


class GeometricBatchSize:
    r"""The batch-size schedule :math:`b_k = \min(b_{\max}, \lceil b_0 r^k \rceil)`.

    A schedule the training loop reads: ``schedule(k)`` is the batch size of iteration
    ``k`` (a pure function of ``k``); ``next()`` returns the current one and advances;
    ``examples_seen(k)`` is the total over iterations ``0..k-1``. ``state_dict()`` /
    ``load_state_dict()`` resume the counter.

    Example::

        batches = GeometricBatchSize(initial=16, factor=1.1, maximum=len(dataset))
        for step in range(steps):
            idx = torch.randint(len(dataset), (batches.next(),))
    """

    def __init__(self, initial: int, factor: float, maximum: int | None = None) -> None:
        self.initial = check_int("initial", initial, 1)
        self.factor = check_range("factor", factor, 1.0)
        self.maximum = None if maximum is None else check_int("maximum", maximum, initial)
        self.iteration = 0

    def __call__(self, iteration: int) -> int:
        check_int("iteration", iteration, 0)
        log_size = math.log(self.initial) + iteration * math.log(self.factor)
        if self.maximum is not None and log_size >= math.log(self.maximum):
            return self.maximum
        # A relative nudge below 1 keeps exact powers (16 * 1.5^2 = 36) from rounding up.
        return math.ceil(math.exp(log_size) * (1 - 1e-12))

    def next(self) -> int:
        """The current batch size; advances to the next iteration."""
        size = self(self.iteration)
        self.iteration += 1
        return size

    def examples_seen(self, iterations: int) -> int:
        """Total examples drawn by iterations ``0 .. iterations - 1``."""
        return sum(self(k) for k in range(check_int("iterations", iterations, 0)))

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "factor": self.factor, "maximum": self.maximum, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        type(self).__init__(self, state["initial"], state["factor"], state["maximum"])
        self.iteration = check_int("iteration", state["iteration"], 0)
