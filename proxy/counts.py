"""A labelled counter and a histogram that compiled code updates in a few instructions.

prometheus_client's ``inc()`` and ``observe()`` are Python code that takes a lock (a
histogram also walks its buckets in Python): several thousand instructions, which the
proxy would pay on every client login. These keep plain numbers instead, updated
from the event loop's thread only, and :mod:`proxy.metrics` exposes them at scrape
time under the same metric names and types.
"""

from __future__ import annotations

from typing import final


@final
class LabelledCount:
    """How many times each of a fixed set of labels (a Counter with one label)."""

    __slots__ = ("counts",)

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.counts: dict[str, int] = dict.fromkeys(labels, 0)

    def inc(self, label: str) -> None:
        self.counts[label] += 1  # a label outside the set is a proxy bug: KeyError


@final
class Buckets:
    """Observations by upper bound (a Histogram): ``counts[i]`` is how many fell at or
    below ``bounds[i]`` and above the bound before it; the last one counts the rest."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must increase: {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0  # the sum of the observations

    def observe(self, value: float) -> None:
        self.total += value
        i = 0
        for bound in self.bounds:
            if value <= bound:
                break
            i += 1
        self.counts[i] += 1

    def cumulative(self) -> list[int]:
        """Prometheus's bucket values: observations at or below each bound, then all."""
        out: list[int] = []
        running = 0
        for count in self.counts:
            running += count
            out.append(running)
        return out
