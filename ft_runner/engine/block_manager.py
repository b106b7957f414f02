"""The paged KV cache's bookkeeping: which fixed-size pages each request holds, and which full
pages hold a known prefix (prefix caching).

Pages are `block_size` token slots in every layer's cache (model_runner.PagedKVCache); a request
holds pages for positions [0, len(block_ids) * block_size). Reference counts let a page be held by
several requests at once; a page whose count drops to zero is free again.

Prefix caching: once a page is full and computed, it is keyed by its tokens and by everything
before them (Request.block_key), so a later request whose prompt starts the same way takes the
same pages instead of computing them again. A cached page whose count drops to zero stays
cached, evictable: new pages come from never-cached free pages first, then from the least
recently released cached ones. Only rank 0 keeps this state: the other ranks see the resulting
block tables in each step's plan.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable

from ft_runner.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free: collections.deque[int] = collections.deque(range(num_blocks))
        self.refs = [0] * num_blocks
        self.cached: dict[Hashable, int] = {}  # block key -> page
        self.keys: list[Hashable | None] = [None] * num_blocks  # page -> its key, while cached
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, count 0, LRU first

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    def allocate(self, request: Request, tokens: int) -> bool:
        """Grow the request's pages to hold `tokens` positions; False, changing nothing, if too few are free."""
        missing = self.pages_for(tokens) - len(request.block_ids)
        if missing > self.available:
            return False
        for _ in range(max(missing, 0)):
            page = self.free.popleft() if self.free else self._evict()
            self.refs[page] = 1
            request.block_ids.append(page)
        return True

    def _evict(self) -> int:
        page, _ = self.evictable.popitem(last=False)
        del self.cached[self.keys[page]]
        self.keys[page] = None
        return page

    def release(self, request: Request) -> None:
        """Drop the request's hold on its pages (a finished, cancelled or preempted request)."""
        for page in reversed(request.block_ids):
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if self.keys[page] is not None:
                    self.evictable[page] = None
                else:
                    self.free.append(page)
        request.block_ids = []
        request.registered = 0

    def share_prefix(self, request: Request) -> int:
        """A request about to start takes the cached pages of its longest cached prefix (full pages,
        and never its last token, whose logits must be computed); returns the tokens it skips."""
        if not self.prefix_caching or request.block_ids:
            return 0
        pages = []
        for index in range((request.num_tokens - 1) // self.block_size):
            page = self.cached.get(request.block_key(index, self.block_size))
            if page is None:
                break
            pages.append(page)
        for page in pages:
            if self.refs[page] == 0:
                del self.evictable[page]
            self.refs[page] += 1
        request.block_ids = pages
        request.registered = len(pages)
        return len(pages) * self.block_size

    def register(self, request: Request) -> None:
        """Key the request's pages that are now full and computed, for later requests to share."""
        if not self.prefix_caching:
            return
        full = min(request.num_computed // self.block_size, len(request.block_ids))
        for index in range(request.registered, full):
            key = request.block_key(index, self.block_size)
            page = request.block_ids[index]
            if key not in self.cached and self.keys[page] is None:
                self.cached[key] = page
                self.keys[page] = key
        request.registered = max(request.registered, full)

    @property
    def usage(self) -> float:
        """Fraction of pages held by requests (vLLM's kv_cache_usage_perc, as a fraction)."""
        return 1.0 - self.available / self.num_blocks if self.num_blocks else 0.0
