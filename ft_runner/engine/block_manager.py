"""The paged KV cache's bookkeeping: which fixed-size pages each request holds.

Pages are `block_size` token slots in every layer's cache (model_runner.PagedKVCache); a request
holds pages for positions [0, len(block_ids) * block_size). Reference counts let a page be held by
several requests at once (shared prefixes); a page returns to the free list when its count drops
to zero. Only rank 0 keeps this state: the other ranks see the resulting block tables in each
step's plan.
"""

from __future__ import annotations

import collections

from ft_runner.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free: collections.deque[int] = collections.deque(range(num_blocks))
        self.refs = [0] * num_blocks

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, request: Request, tokens: int) -> bool:
        """Grow the request's pages to hold `tokens` positions; False, changing nothing, if too few are free."""
        missing = self.pages_for(tokens) - len(request.block_ids)
        if missing > len(self.free):
            return False
        for _ in range(max(missing, 0)):
            page = self.free.popleft()
            self.refs[page] = 1
            request.block_ids.append(page)
        return True

    def release(self, request: Request) -> None:
        """Drop the request's hold on its pages (a finished, cancelled or preempted request)."""
        for page in reversed(request.block_ids):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free.append(page)
        request.block_ids = []

    @property
    def usage(self) -> float:
        """Fraction of pages in use (vLLM's kv_cache_usage_perc, as a fraction)."""
        return 1.0 - len(self.free) / self.num_blocks if self.num_blocks else 0.0
