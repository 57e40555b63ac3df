"""Side-by-side timing: two calls alternated in one process, so a machine's load falls on both
and their ratio holds where either time alone would not. Used by the benchmarks and by the
registration's served-against-dense latency ratio."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def median_ratio(dense: Callable[[], Any], sparse: Callable[[], Any], repeats: int, sync: Callable[[], None]
                 ) -> tuple[float, float, float]:
    """(dense median s, sparse median s, dense / sparse), timed alternately after a warm-up."""
    times: dict[str, list[float]] = {"dense": [], "sparse": []}
    for fn in (dense, sparse, dense, sparse):
        fn()
    sync()
    for _ in range(repeats):
        for label, fn in (("dense", dense), ("sparse", sparse)):
            start = time.perf_counter()
            fn()
            sync()
            times[label].append(time.perf_counter() - start)
    d, s = statistics.median(times["dense"]), statistics.median(times["sparse"])
    return d, s, d / s


def repeats_for(seconds: float, budget: float = 12.0) -> int:
    """Alternating repeats for a call of `seconds`: about `budget` seconds a side, 5 to 50."""
    return max(5, min(50, round(budget / max(seconds, 1e-4))))
