"""CUDA graphs over per-unit compute: capture once per key, replay afterwards.

A graph bakes in every address it touched at capture. Device slots never move, and every block of a pack has the same
relative tensor layout, so one graph captured over slot s serves every later block that lands in slot s with the same
layout. Activations go through static buffers that :meth:`StreamEngine.run` owns (the residual and the extras stay at
one address for the whole forward), and each capture ends with no live allocation in the shared memory pool, so
graphs can replay in any order. Callers whose compute reads per-block tensors other than the weights (e.g. cached
cross-attention K/V) put the block index into the key.

Capture (first encounter only) goes through ``torch.cuda.graph``, which synchronizes the device once; replays never
do. Callbacks must be capturable: static shapes, no CPU reads of GPU values, no host synchronization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class GraphRunner:
    """``run(key, thunk)``: the first call per key runs ``thunk`` eagerly then captures it; later calls replay."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.captures = 0
        self.replays = 0

    def run(self, key: tuple, thunk: Callable[[], None]) -> None:
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            self.replays += 1
            return
        thunk()  # the real result of this call; also the warm-up the capture needs (cuBLAS handles, autotuning)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            thunk()
        self._graphs[key] = graph
        self.captures += 1
