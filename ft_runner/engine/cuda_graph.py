"""Decode steps captured as CUDA graphs over a ladder of padded batch sizes.

A batch of B rows runs in the graph of the smallest ladder size >= B; the extra rows are
finished padding. One replay launches the whole step (all layers, the sampler and its
bookkeeping) with a single host call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def padded_batch(batch: int) -> int:
    """The ladder size a batch of `batch` rows runs at (multiples of 64 above the ladder)."""
    for size in LADDER:
        if size >= batch:
            return size
    return -(-batch // 64) * 64


class StepGraphs:
    """One captured graph per key (padded batch, sampling mode), each with its own memory pool
    (they replay in any order, so they must not share intermediates)."""

    def __init__(self):
        self.graphs: dict[Hashable, torch.cuda.CUDAGraph] = {}

    def run(self, key: Hashable, step: Callable[[], None], state) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(step, state)
        graph.replay()

    def _capture(self, step, state) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (Triton compiles, cuBLAS and NCCL set up), then undo the warm-up's
        # effect on the step state; the cache slots it wrote are rewritten before they are read.
        saved = state.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        state.restore(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        return graph

    def clear(self) -> None:
        self.graphs.clear()
