"""Timing a jitted call: what every benchmark here reports."""
import statistics
import time
from typing import Any, Callable

import jax


def median_time(fn: Callable[[], Any], steps: int, repeats: int) -> float:
    """Seconds per call: the median of `repeats` timings of `steps` calls
    (JAX's asynchronous dispatch waited for at the end of each timing)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(steps):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)
