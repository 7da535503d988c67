"""Seconds per part of a prediction (``h3de predict``'s summary and ``benchmarks/predict_cost.py``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

__all__ = ["Stopwatch"]


class Stopwatch:
    """Adds the seconds spent in each ``with stopwatch("part"):`` block to ``timings[part]`` (nothing when None)."""

    def __init__(self, timings: dict[str, float] | None) -> None:
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        if self.timings is not None:
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - start
