"""Timing shared by the benchmarks: engines interleaved round by round, so that a noisy shared machine
slows them alike, and a robust statistic of the rounds."""
from __future__ import annotations

import statistics
import time
from typing import Callable

STATISTICS = {"median": statistics.median, "min": min}


def interleaved(engines: dict[str, Callable[[], object]], rounds: int, statistic: str = "median") -> dict[str, float]:
    """Seconds per call of each engine over the rounds (a round: each engine's best of two back-to-back
    calls): the median, or with "min" the fastest round (what a machine shared with other busy
    processes still shows reliably). Every engine runs once first, untimed."""
    for call in engines.values():
        call()
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, call in engines.items():
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                call()
                best = min(best, time.perf_counter() - start)
            samples[name].append(best)
    return {name: STATISTICS[statistic](values) for name, values in samples.items()}
