"""The one timer every benchmark uses: the median of several runs, CUDA events on a GPU, wall clock on CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(fn: Callable[[], object], iters: int, warmup: int = 1, cuda: bool | None = None) -> float:
    """Median seconds of ``fn()`` over ``iters`` runs after ``warmup`` untimed ones. With ``cuda`` (default: when
    CUDA is present) CUDA events time the GPU work, each run synchronized so runs do not overlap; else perf_counter."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if not cuda:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
