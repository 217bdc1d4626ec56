"""A small careful timer: warm-up, interleaved repeats, median and spread."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Stats:
    median_s: float
    p10_s: float
    p90_s: float
    runs: int

    def to_json(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def summarise(samples: list[float]) -> Stats:
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return Stats(statistics.median(ordered), pick(0.1), pick(0.9), len(ordered))


def interleaved(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    budget_s: float = 120.0,
    slow_repeats: dict[str, int] | None = None,
) -> dict[str, Stats]:
    """Time every candidate once per round, round after round, so that all of them see the
    same machine state; stop after ``repeats`` rounds or ``budget_s`` seconds."""
    slow_repeats = slow_repeats or {}
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    deadline = time.monotonic() + budget_s
    for round_index in range(repeats):
        for name, fn in candidates.items():
            if round_index >= slow_repeats.get(name, repeats):
                continue
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        if time.monotonic() > deadline and round_index >= 2:
            break
    return {name: summarise(values) for name, values in samples.items() if values}
