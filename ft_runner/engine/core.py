"""The in-flight engine on rank 0: requests in, one step at a time, tokens out.

    core = EngineCore(stage, runtime, EngineConfig())
    rid = core.add_request(prompt_ids, SamplingOptions(max_tokens=64))
    while core.has_unfinished():
        for event in core.step(): ...      # TokenEvent: request_id, token, logprob, finish

`step()` = schedule (scheduler.py) -> hand the plan to the other ranks (`broadcast`, set by the
serving layer) -> run it (model_runner.py) -> sample (sampler.py) -> update each request. Every
other rank runs `ModelRunner.run` on the same plans in the same order (serving/worker.py).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
from typing import Callable, Optional

import numpy as np
import torch

from ft_runner.config import EngineConfig
from ft_runner.engine.block_manager import BlockManager
from ft_runner.engine.model_runner import ModelRunner, StepPlan, cache_pages
from ft_runner.engine.request import PENDING, Request, SamplingOptions, Status
from ft_runner.engine.sampler import Finish, sample_requests
from ft_runner.engine.scheduler import Schedule, Scheduler
from ft_runner.engine.transfer import to_device


@dataclasses.dataclass
class TokenEvent:
    request_id: int
    token: int  # -1 for a request that ended without a new token (cancelled)
    logprob: float
    finish: int  # a sampler.Finish code: RUNNING (0) while the request goes on


def agreed_pages(stage, runtime, config: EngineConfig) -> int:
    """Every rank's cache must have the same pages: the smallest any rank can hold."""
    pages = np.array([cache_pages(stage, runtime, config)], dtype=np.int64)
    if runtime.grid.world > 1:
        from mpi4py import MPI

        runtime.comm.Allreduce(MPI.IN_PLACE, pages, op=MPI.MIN)
    return int(pages[0])


@dataclasses.dataclass
class _Sampled:
    """One step's sampled tokens: on the device (the next step may read them there) and on their
    way to the host."""

    requests: list[Request]
    tokens: torch.Tensor  # int64 (S,) on the device
    staged: torch.Tensor  # float64 (2, S) on the host: tokens (exact below 2**53) and log-probs
    event: torch.cuda.Event | None

    @classmethod
    def start(cls, requests, tokens: torch.Tensor, logprobs: torch.Tensor) -> _Sampled:
        both = torch.stack([tokens.double(), logprobs.double()])
        if not tokens.is_cuda:
            return cls(requests, tokens, both, None)
        staged = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        staged.copy_(both, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(requests, tokens, staged, event)

    def host(self) -> tuple[np.ndarray, np.ndarray]:
        if self.event is not None:
            self.event.synchronize()
        array = self.staged.numpy()
        return array[0].astype(np.int64), array[1]


class EngineCore:
    def __init__(self, stage, runtime, config: EngineConfig | None = None,
                 broadcast: Optional[Callable[[StepPlan], None]] = None):
        """Every rank builds its ModelRunner at the same point (the page count is agreed collectively)."""
        self.config = config or EngineConfig()
        self.runner = ModelRunner(stage, runtime, self.config, agreed_pages(stage, runtime, self.config))
        # dynamic RoPE rotates a prompt's keys by the prompt's length: equal tokens need not mean equal pages
        caching = self.config.enable_prefix_caching and stage.config.rope_type != "dynamic"
        self.blocks = BlockManager(self.runner.pages, self.config.kv_block_size, caching)
        self.scheduler = Scheduler(self.config, self.blocks, self.config.model_len(stage.config))
        self.broadcast = broadcast
        model = stage.config
        self.model_end = model.end_id
        self.other_ends = tuple(model.other_end_ids)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # add_request and cancel may come from other threads
        self._incoming: list[Request] = []
        self._sampled: _Sampled | None = None  # the last step's tokens, not yet read on the host
        # With PP > 1, PP steps (micro-batches of different requests) are in flight at once, so
        # that every stage has work: a step's logits are taken when the next ones are launched.
        self.micro_batches = runtime.grid.pp
        self._in_flight: collections.deque[Schedule] = collections.deque()
        self.most_in_flight = 0  # the most steps in flight so far (tests, metrics)
        # (decode rows, prefill tokens) of the step the last step() launched, None if none (step profiles)
        self.last_launch: tuple[int, int] | None = None
        self.requests: dict[int, Request] = {}

    def add_request(self, prompt: list[int], options: SamplingOptions) -> int:
        """Queue a request (any thread); its tokens come from later steps. Raises ConfigError when
        it can never fit (too long for max_model_len or for the whole cache)."""
        if options.end_id is None:
            options = dataclasses.replace(options, end_id=self.model_end)
        ends = (options.end_id, *self.other_ends) if options.end_id == self.model_end else (options.end_id,)
        request = Request(next(self._ids), prompt, options, ends)
        if not request.tokens:
            raise ValueError("a request needs at least one prompt token")
        self.scheduler.check(request)
        with self._lock:
            self._incoming.append(request)
            self.requests[request.id] = request
        return request.id

    def cancel(self, request_id: int) -> None:
        """Stop a request at the next step (any thread); it ends as Finish.CANCELLED."""
        request = self.requests.get(request_id)
        if request is not None:
            request.cancelled = True

    def has_unfinished(self) -> bool:
        return (bool(self._incoming) or self.scheduler.has_unfinished() or self._sampled is not None
                or bool(self._in_flight))

    def step(self) -> list[TokenEvent]:
        """Launch one step of every scheduled request, then read the previous step's tokens while the
        device runs it; returns the events of the requests that moved or ended (those tokens).

        The step is planned before the previous one's tokens are on the host: a request sampled then
        takes its new token from the device (StepPlan.token_src). One that turns out to have ended
        (an end token, a stop word) computed one row for nothing, and its sample is dropped; one
        that ends by length is not scheduled again at all."""
        events = self._take_incoming()
        busy = frozenset(row.request.id for step in self._in_flight for row in step.rows)
        schedule = self.scheduler.schedule(busy, self.micro_batches)
        previous, self._sampled = self._sampled, None
        self.last_launch = schedule.shape if schedule.rows else None
        if schedule.rows:
            plan = make_plan(schedule, previous.requests if previous else ())
            if self.broadcast is not None:
                self.broadcast(plan)
            self.runner.launch(plan, previous.tokens if previous else None)
            self.scheduler.computed(schedule)
            self._in_flight.append(schedule)
            self.most_in_flight = max(self.most_in_flight, len(self._in_flight))
        if previous is not None:
            events += self._resolve(previous)
        if self._in_flight and (len(self._in_flight) >= self.micro_batches or not schedule.rows):
            done = self._in_flight.popleft()
            self._sample(self.runner.collect(), [row.request for row in done.rows if row.samples])
        return events

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Sample the step's rows whose requests still run; their tokens travel to the host meanwhile."""
        live = [i for i, r in enumerate(requests) if r.status != Status.FINISHED]
        if not live:
            return
        if len(live) < len(requests):
            logits = logits[to_device(live, logits.device, torch.int64)]
            requests = [requests[i] for i in live]
        tokens, logprobs = sample_requests(logits, requests)
        for request in requests:
            request.reserve()
        self._sampled = _Sampled.start(requests, tokens, logprobs)

    def _resolve(self, sampled: _Sampled) -> list[TokenEvent]:
        events = []
        for request, token, logprob in zip(sampled.requests, *sampled.host()):
            if request.status == Status.FINISHED:  # cancelled meanwhile
                continue
            finish = request.resolve(int(token), float(logprob))
            events.append(TokenEvent(request.id, int(token), float(logprob), int(finish)))
            if finish != Finish.RUNNING:
                self._end(request)
        return events

    def _take_incoming(self) -> list[TokenEvent]:
        """Queue the new requests and end the cancelled ones (before scheduling, so their pages free up)."""
        with self._lock:
            incoming, self._incoming = self._incoming, []
        for request in incoming:
            self.scheduler.add(request)
        with self._lock:
            cancelled = [r for r in self.requests.values() if r.cancelled]
        events = []
        for request in cancelled:
            request.finish = Finish.CANCELLED
            events.append(TokenEvent(request.id, -1, 0.0, int(Finish.CANCELLED)))
            self._end(request)
        return events

    def _end(self, request: Request) -> None:
        self.scheduler.finish(request)
        with self._lock:
            del self.requests[request.id]

    def request(self, request_id: int) -> Request | None:
        return self.requests.get(request_id)

    @property
    def num_waiting(self) -> int:
        """Requests not running yet: just added, queued, or preempted (any thread may look)."""
        return len(self._incoming) + len(self.scheduler.waiting)

    @property
    def kv_cache_usage(self) -> float:
        return self.blocks.usage

    def close(self) -> None:
        """Free the cache (and graphs) now rather than at garbage collection."""
        self.runner = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def make_plan(schedule: Schedule, pending: list[Request] = ()) -> StepPlan:
    """The step's plan; `pending`: the requests whose last token the previous step is still sampling."""
    rows = schedule.rows
    counts = [r.count for r in rows]
    tokens = [t for r in rows for t in r.request.tokens[r.start:r.start + r.count]]
    positions = [p for r in rows for p in range(r.start, r.start + r.count)]
    width = max(len(r.request.block_ids) for r in rows)
    tables = np.zeros((len(rows), width), dtype=np.int32)
    for i, r in enumerate(rows):
        tables[i, :len(r.request.block_ids)] = r.request.block_ids
    plan = StepPlan(tokens=np.array(tokens, dtype=np.int64), positions=np.array(positions, dtype=np.int64),
                    cu_seqlens=np.concatenate([[0], np.cumsum(counts)]).astype(np.int32),
                    context_lens=np.array([r.start for r in rows], dtype=np.int32), block_tables=tables,
                    num_decode=sum(c == 1 for c in counts),
                    sample_rows=np.array([i for i, r in enumerate(rows) if r.samples], dtype=np.int64),
                    prompt_lens=np.array([r.request.num_prompt for r in rows], dtype=np.int64))
    if plan.pending_tokens:  # only decode rows (the first ones, one token each) can be pending
        index = {id(r): i for i, r in enumerate(pending)}
        plan.token_src = np.array([index[id(rows[i].request)] if t == PENDING else -1 for i, t in enumerate(tokens)],
                                  dtype=np.int64)
    return plan
