"""The one backoff of both packages (the agent imports it; the proxy never imports agent).

Pure: the caller passes a ``random.Random`` and does the sleeping itself.
"""

from __future__ import annotations

import random

MIN_DELAY = 0.05  # never spin: the smallest wait any schedule returns


class Backoff:
    """Exponential backoff with decorrelated jitter, capped by ``maximum`` and expiry.

    ``next(remaining)`` keeps at least a few attempts inside the time left before
    the credential expires, so a short outage never costs the lease.
    """

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self.initial = max(initial, MIN_DELAY)
        self.maximum = max(maximum, self.initial)
        self.rng = rng
        self.attempts = 0
        self._prev = self.initial

    def next(self, remaining: float | None = None) -> float:
        self.attempts += 1
        upper = min(self.maximum, self._prev * 3)
        self._prev = self.rng.uniform(self.initial, max(upper, self.initial))
        delay = self._prev
        if remaining is not None and remaining > 0:
            delay = min(delay, max(remaining / 3, MIN_DELAY))
        return max(delay, MIN_DELAY)

    def reset(self) -> None:
        self.attempts = 0
        self._prev = self.initial
