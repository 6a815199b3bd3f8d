"""Retry delays (pure, no I/O).

A failed try waits ``0.5 s x 2**retried``, capped at 60 s, then scaled by a random factor in
[0.8, 1.2] so that jobs which failed together (a database blip, a downstream outage) do not
retry together. ``retried`` is how many tries already failed before this one (0 after the
first failure), so the waits run 0.5, 1, 2, 4, ... seconds.
"""

from __future__ import annotations

import random

BASE = 0.5
CAP = 60.0
JITTER = 0.2


def retry_delay(retried: int, rand: float | None = None) -> float:
    """Seconds to wait before the next try, after ``retried`` earlier failures.

    ``rand`` (0..1) picks the point in the jitter band; None draws one at random.
    """
    exponent = min(max(retried, 0), 16)  # 2**16 x 0.5 s is far past the cap already
    delay = min(BASE * float(2.0**exponent), CAP)
    r = random.random() if rand is None else rand
    return delay * (1.0 - JITTER + 2.0 * JITTER * r)
