"""Rank 0's scheduler: which requests compute which tokens in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a row limit (`max_num_seqs`). Running
requests go first, in the order they were admitted: a decode costs one token, an unfinished
prompt takes the next chunk that fits the budget (chunked prefill). Waiting requests are admitted
behind them, first come first served, while budget, rows and KV pages last. When a running
request needs a page and none is free, the most recently admitted running request is preempted:
its pages are freed and it waits at the head of the queue to be recomputed (prompt and output so
far) once pages free up. A request is never failed for lack of KV cache: `check` refuses at once
a request that could not fit alone. With prefix caching, a request starts past the longest run of
full pages some earlier request computed with the same tokens (block_manager.py).
"""

from __future__ import annotations

import collections
import dataclasses

from ft_runner.config import ConfigError, EngineConfig
from ft_runner.engine.block_manager import BlockManager
from ft_runner.engine.request import Request, Status


@dataclasses.dataclass
class Scheduled:
    request: Request
    start: int  # the first position computed this step (request.num_computed before it)
    count: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """Does this step reach the request's last token, and so produce its next one?"""
        return self.start + self.count == self.request.num_tokens


@dataclasses.dataclass
class Schedule:
    """One step: single-token rows first (decodes), then longer prefill chunks."""

    rows: list[Scheduled]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        """(single-token rows, tokens of the longer chunks): the step's decode and prefill work."""
        decode = sum(r.count == 1 for r in self.rows)
        return decode, self.num_tokens - decode


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_model_len: int):
        self.config = config
        self.blocks = blocks
        self.max_model_len = max_model_len
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.preemptions = 0
        self.prefix_queries = 0  # prompt tokens of requests admitted (vLLM's prefix_cache_queries, in tokens)
        self.prefix_hits = 0  # of those, tokens found in the prefix cache

    def check(self, request: Request) -> None:
        """Refuse, before it is queued, a request that could never run (a clear ConfigError)."""
        if request.options.max_tokens < 1:
            raise ConfigError(f"max_tokens must be at least 1, got {request.options.max_tokens}")
        need = request.num_prompt + request.options.max_tokens
        if need > self.max_model_len:
            raise ConfigError(f"prompt ({request.num_prompt} tokens) + max_tokens ({request.options.max_tokens}) "
                              f"exceeds the engine's max_model_len {self.max_model_len}")
        if self.blocks.pages_for(need) > self.blocks.num_blocks:
            raise ConfigError(f"a request of {need} tokens needs more KV-cache pages than the cache has "
                              f"({self.blocks.num_blocks} of {self.blocks.block_size} tokens): "
                              "raise --kv-cache-blocks or --gpu-memory-utilization")

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, busy: frozenset[int] = frozenset(), micro_batches: int = 1) -> Schedule:
        """The next step. `busy`: ids of requests in steps still in flight (pipeline micro-batches),
        which wait for their logits; with `micro_batches` > 1 a step takes about its share of the
        requests, so that the next ones have rows of their own to overlap with it."""
        budget = self.config.max_num_batched_tokens
        limit = -(-(len(self.running) + len(self.waiting)) // micro_batches)
        rows, preempted = self._schedule_running(budget, busy, limit)
        budget -= sum(r.count for r in rows)
        if not preempted:
            rows += self._admit(budget, limit - len(rows))
        rows.sort(key=lambda r: r.count > 1)  # stable: decodes first, each group in admission order
        return Schedule(rows, preempted)

    def _schedule_running(self, budget: int, busy: frozenset[int], limit: int) -> tuple[list[Scheduled], list[Request]]:
        rows: list[Scheduled] = []
        preempted: list[Request] = []
        index = 0
        while index < len(self.running) and budget > 0 and len(rows) < limit:
            request = self.running[index]
            # done_by_length: its last token is still being sampled, nothing more to compute
            if request.done_by_length or request.id in busy:
                index += 1
                continue
            count = min(request.num_tokens - request.num_computed, budget)
            while not self.blocks.allocate(request, request.num_computed + count):
                victim = self._victim(busy)
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    return rows, preempted
            rows.append(Scheduled(request, request.num_computed, count))
            budget -= count
            index += 1
        return rows, preempted

    def _victim(self, busy: frozenset[int]) -> Request:
        """The most recently admitted request not in a step in flight (the one being scheduled at
        worst: it is not busy), taken out of `running`."""
        index = max(i for i, r in enumerate(self.running) if r.id not in busy)
        return self.running.pop(index)

    def _admit(self, budget: int, limit: int) -> list[Scheduled]:
        rows = []
        while (self.waiting and budget > 0 and len(rows) < limit
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            hit = self.blocks.share_prefix(request) if request.num_computed == 0 else 0
            request.num_computed += hit
            count = min(request.num_tokens - request.num_computed, budget)
            chunk_refused = count < request.num_tokens - request.num_computed and not self.config.enable_chunked_prefill
            if chunk_refused or not self.blocks.allocate(request, request.num_computed + count):
                self.blocks.release(request)  # give back the shared pages: it waits as it was
                request.num_computed -= hit
                break
            self.prefix_queries += request.num_tokens
            self.prefix_hits += hit
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            rows.append(Scheduled(request, request.num_computed, count))
            budget -= count
        return rows

    def _preempt(self, request: Request) -> None:
        """Recompute later: free the pages, forget what was computed, wait at the head of the queue."""
        self.blocks.release(request)
        request.num_computed = 0
        request.status = Status.WAITING
        self.waiting.appendleft(request)
        self.preemptions += 1

    def computed(self, schedule: Schedule) -> None:
        """The step ran: its tokens' keys and values are in the cache."""
        for row in schedule.rows:
            row.request.num_computed = row.start + row.count
            self.blocks.register(row.request)

    def finish(self, request: Request) -> None:
        """Take a finished or cancelled request out of the queues and free its pages."""
        if request.status == Status.RUNNING:
            self.running.remove(request)
        elif request.status == Status.WAITING:
            self.waiting.remove(request)
        self.blocks.release(request)
        request.status = Status.FINISHED
