"""Interleaved timing, and the statistics of latency ratios that stay put on a noisy machine.

On a shared machine the speed of every call drifts (other jobs, frequency scaling, caches). Timing
configuration A many times and then B compares A's good spell with B's bad one, and the ratio of
two medians inherits all of that. So here:

* **Rounds**: every round times each configuration once, back to back, in an order that rotates
  by one each round (``A B C``, ``B C A``, ``C A B``, ...): drift within a run and the position in
  a round (the call after a long generation, say) hit every configuration alike.
* **Per-round ratios**: a configuration's ratio to the reference (K=0) is taken within each round,
  where both calls saw the same machine state, and summarised by its median over the rounds, with
  a distribution-free 95% confidence interval of that median (binomial order statistics,
  ``scipy.stats.quantile_test``; it needs at least 6 rounds) and the interquartile range.
* **Adaptive length**: at least ``min_rounds``; then rounds go on until every ratio's interval is
  within ``precision`` of its median (relative half-width), ``max_seconds`` of timed rounds have
  passed, or ``max_rounds`` is reached.

Clock: ``time.perf_counter`` with the device synchronised before and after the call on CUDA (what
``torch.utils.benchmark``'s timer does, for the device under test), so a call's time is the latency
a user sees: host work, transfers and kernels. Garbage collection is off during a timed call (as
``timeit`` does). ``torch.utils.benchmark.Timer`` itself does not fit: it times one statement in
blocks (no interleaving) and ``timeit(1)`` runs two untimed warm-up calls each time; its
``Measurement`` gives the per-configuration median and IQR.
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from scipy.stats import quantile_test
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec

CONFIDENCE = 0.95


def round_order(n_configs: int, round_index: int) -> list[int]:
    """Indices of the configurations in the order round ``round_index`` times them (rotated by one per round)."""
    return [(round_index + i) % n_configs for i in range(n_configs)]


def synchronized_clock(device: torch.device) -> Callable[[], float]:
    """Seconds from ``perf_counter``, taken after the device has finished its queued work."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return clock


def median_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Distribution-free confidence interval of the median (order statistics); None when too few values."""
    values = np.asarray(values, dtype=float)
    if values.size < 2:
        return None
    interval = quantile_test(values, p=0.5).confidence_interval(confidence)
    if not (math.isfinite(interval.low) and math.isfinite(interval.high)):
        return None  # fewer than 6 values at 95%: no pair of order statistics covers the median
    return float(interval.low), float(interval.high)


def ratio_stats(times, reference, confidence: float = CONFIDENCE) -> dict:
    """Median, CI of the median and IQR of the per-round ratios ``times[r] / reference[r]``."""
    times, reference = np.asarray(times, dtype=float), np.asarray(reference, dtype=float)
    if times.shape != reference.shape or times.ndim != 1 or times.size == 0:
        raise ValueError(f"per-round times must be two equal-length 1-d sequences, got {times.shape} and "
                         f"{reference.shape}")
    if not (reference > 0).all():
        raise ValueError("reference times must be positive")
    ratios = times / reference
    return {"median": float(np.median(ratios)), "ci95": median_ci(ratios, confidence),
            "iqr": [float(q) for q in np.percentile(ratios, [25, 75])], "rounds": int(ratios.size)}


def time_stats(times_s, label: str = "") -> dict:
    """Median, IQR, quartiles, p90, mean and min in milliseconds of one configuration's timed calls (seconds)."""
    m = Measurement(number_per_run=1, raw_times=list(times_s), task_spec=TaskSpec(stmt=label, setup=""))
    p25, p75, p90 = np.percentile(m.times, [25, 75, 90]) * 1e3
    return {"median_ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "quartiles_ms": [float(p25), float(p75)],
            "p90_ms": float(p90), "mean_ms": m.mean * 1e3, "min_ms": min(m.times) * 1e3}


def precise_enough(times: list[list[float]], reference: int, precision: float) -> bool:
    """Whether every configuration's ratio to ``reference`` has a CI within ``precision`` of its median."""
    for i, series in enumerate(times):
        if i == reference:
            continue
        stats = ratio_stats(series, times[reference])
        if stats["ci95"] is None:
            return False
        low, high = stats["ci95"]
        if (high - low) / 2 > precision * stats["median"]:
            return False
    return True


@dataclass
class Timings:
    """What ``measure`` saw; ``times[i][r]`` is configuration i's call in round r (seconds)."""
    times: list[list[float]]
    peak_bytes: list[int | None]  # peak device memory over configuration i's timed calls (CUDA only)
    outputs: list  # configuration i's output of its last call
    rounds: int
    seconds: float  # wall time of the timed rounds
    stopped: str  # "precision", "max-seconds" or "max-rounds"
    order: list[int] = field(default_factory=list)  # configuration indices in the order they were timed


def measure(fns: list[Callable[[], object]], *, device: torch.device, warmup: int, min_rounds: int,
            max_rounds: int, max_seconds: float, precision: float, reference: int = 0,
            clock: Callable[[], float] | None = None) -> Timings:
    """Time ``fns`` in interleaved rounds (see the module docstring) after ``warmup`` rounds untimed."""
    if not fns:
        raise ValueError("nothing to time")
    if not 1 <= min_rounds <= max_rounds:
        raise ValueError(f"need 1 <= min_rounds <= max_rounds, got {min_rounds} and {max_rounds}")
    clock = clock or synchronized_clock(device)
    cuda = device.type == "cuda"
    for r in range(warmup):
        for i in round_order(len(fns), r):
            fns[i]()
    timings = Timings([[] for _ in fns], [None] * len(fns), [None] * len(fns), 0, 0.0, "max-rounds")
    start = clock()
    while timings.rounds < max_rounds:
        for i in round_order(len(fns), timings.rounds):
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            gc_was_on = gc.isenabled()
            gc.disable()
            try:
                begin = clock()
                timings.outputs[i] = fns[i]()
                timings.times[i].append(clock() - begin)
            finally:
                if gc_was_on:
                    gc.enable()
            if cuda:
                timings.peak_bytes[i] = max(timings.peak_bytes[i] or 0, torch.cuda.max_memory_allocated(device))
            timings.order.append(i)
        timings.rounds += 1
        timings.seconds = clock() - start
        if timings.rounds >= min_rounds:
            if precision > 0 and precise_enough(timings.times, reference, precision):
                timings.stopped = "precision"
                break
            if timings.seconds >= max_seconds:
                timings.stopped = "max-seconds"
                break
    return timings
