"""Rank 0's front end: serving threads hand in requests, one engine thread steps the engine.

A job is what one API call submits: a Batch of rows (one row per prompt, or per OpenAI choice).
Each row becomes its own request of the in-flight engine (engine/core.py), which schedules it
with whatever else is running, step by step. The job's `on_token(step, tokens, reasons)` keeps
the batch contract the text, streaming and OpenAI models were written for: call `step` k carries
every row's k-th new token (end_id once a row has finished) and each row's Finish code after it,
and is delivered as soon as every row has made its k-th token or finished. A job's future holds
the whole Output once all its rows are done.

Beam search keeps the static engine's path (engine/beam.py: its beams reorder a contiguous cache):
a beam job runs to completion between two steps, pausing the in-flight requests meanwhile.

Limits (config.ServingConfig): a job past its deadline is stopped at the next step like a cancelled
one (its KV pages free up) and its future raises RequestTimeout; a job submitted while
`max_queue_len` rows already wait for the engine is refused at once with QueueFull.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from typing import Callable, Optional

import numpy as np

from ft_runner.config import ConfigError, ServingConfig
from ft_runner.engine.core import EngineCore, TokenEvent
from ft_runner.engine.generator import Batch, Generator, Output
from ft_runner.engine.request import SamplingOptions
from ft_runner.engine.sampler import Finish, parse_word_list
from ft_runner.serving.metrics import Metrics, RequestTimer
from ft_runner.serving.protocol import Channel

_REASON_LABELS = {Finish.LENGTH: "length", Finish.CANCELLED: "abort"}  # vLLM's finished_reason labels


class ServerStopping(RuntimeError):
    pass


class EngineFailed(RuntimeError):
    """A step failed: the ranks may be out of step, so the job must end (server.py aborts it)."""


class QueueFull(RuntimeError):
    """--max-queue-len rows already wait for the engine: refused at once, so a client never waits unbounded."""


class RequestTimeout(RuntimeError):
    """The request's deadline passed before it finished: its rows were stopped and their KV pages freed."""


@dataclasses.dataclass(eq=False)  # jobs are compared by identity
class _Job:
    batch: Batch
    future: concurrent.futures.Future  # cancelling it (Future.cancel) stops the job's rows
    on_token: Optional[Callable] = None  # called on the engine thread
    timer: Optional[RequestTimer] = None
    key: Optional[str] = None  # the name `Frontend.cancel` knows the job by
    request_ids: list[int] = dataclasses.field(default_factory=list)
    tokens: list[list[int]] = dataclasses.field(default_factory=list)  # per row, its new tokens
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    codes: list[int] = dataclasses.field(default_factory=list)  # per row, its Finish code (0 while running)
    delivered: int = 0  # steps handed to on_token
    timeout_s: Optional[float] = None  # its deadline, counted from `submitted`; None: none
    submitted: float = dataclasses.field(default_factory=time.monotonic)
    timed_out: bool = False  # its deadline passed: its rows are being stopped

    def __post_init__(self):
        rows = self.batch.size
        self.tokens, self.logprobs, self.codes = [[] for _ in range(rows)], [[] for _ in range(rows)], [0] * rows

    def ready(self) -> bool:
        """Has every row made its next undelivered token, or finished (and some row made one)?"""
        k = self.delivered
        made = [len(t) > k for t in self.tokens]
        return any(made) and all(m or c != Finish.RUNNING for m, c in zip(made, self.codes))

    def step_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        k, end = self.delivered, self.batch.end_id
        tokens = np.array([t[k] if len(t) > k else end[r] for r, t in enumerate(self.tokens)], dtype=np.int64)
        reasons = np.array([c if len(t) <= k + 1 else Finish.RUNNING for t, c in zip(self.tokens, self.codes)],
                           dtype=np.int64)
        return tokens, reasons

    @property
    def finished(self) -> bool:
        return all(c != Finish.RUNNING for c in self.codes) and not self.ready()

    def expired(self) -> bool:
        return self.timeout_s is not None and time.monotonic() >= self.submitted + self.timeout_s

    def timeout_error(self) -> RequestTimeout:
        return RequestTimeout(f"the request timed out: it did not finish within its deadline of {self.timeout_s:g} s "
                              "(its own timeout or the server's --request-timeout-s), so its generation was stopped; "
                              "retry with a longer timeout or fewer tokens")


class Frontend:
    """Serving threads `submit` batches; `run` (the engine thread) feeds their rows to the engine
    and steps it, first telling every other rank what to run so their collectives match rank 0's.

    A job whose future is cancelled (its client went away) or whose deadline passes is dropped if it
    has not started, and its rows end at the next step, freeing their KV pages, if it has."""

    def __init__(self, core: EngineCore, generator: Generator, channel: Channel, metrics: Optional[Metrics] = None,
                 limits: Optional[ServingConfig] = None):
        self.core = core
        self.generator = generator  # the static engine: beam search
        self.channel = channel
        self.metrics = metrics or Metrics()
        self.limits = limits or ServingConfig()
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.accepting = True
        self.refusal = "the server is shutting down and accepts no new requests"
        self._lock = threading.Lock()  # no job may enter the queue once it is closed and drained
        self._keyed: dict[str, _Job] = {}  # jobs submitted with a key, until they end
        self._rows: dict[int, tuple[_Job, int]] = {}  # engine request id -> (job, row)
        self._live: list[_Job] = []  # jobs with rows in the engine
        self._beams: collections.deque[_Job] = collections.deque()
        self._counted = (0, 0, 0)  # the scheduler's preemptions, prefix queries and hits at the last look
        self._queued_rows = 0  # rows submitted and not yet taken by the engine thread (under _lock)
        self._waiting_rows = 0  # rows taken but not running yet (the engine's waiting, beams) at the last look
        self._arrived = threading.Event()
        if channel.comm.Get_size() > 1:
            core.broadcast = channel.send_step

    def submit(self, batch: Batch, on_token: Optional[Callable] = None) -> Output:
        """Queue a batch and wait for its output; `on_token` sees each step's tokens as they come."""
        return self.submit_async(batch, on_token).result()

    def submit_async(self, batch: Batch, on_token: Optional[Callable] = None, key: Optional[str] = None,
                     timeout_s: Optional[float] = None, probe: bool = False) -> concurrent.futures.Future:
        """Queue a batch; its future holds the Output. `future.cancel()`, or `cancel(key)`, gives it up.

        `timeout_s`: the request's own deadline in seconds from now (limits.timeout_for: the server's
        --request-timeout-s when that is shorter); past it the future raises RequestTimeout. Raises
        QueueFull when --max-queue-len rows already wait, unless it is a health `probe`."""
        with self._lock:
            if not self.accepting:
                raise ServerStopping(self.refusal)
            if not probe:
                self._check_queue(batch.size)
            job = _Job(batch, concurrent.futures.Future(), on_token, RequestTimer(self.metrics, batch.size), key,
                       timeout_s=None if probe else self.limits.timeout_for(timeout_s))
            if key is not None:
                self._keyed[key] = job
                job.future.add_done_callback(lambda _: self._keyed.pop(key, None))
            self._queued_rows += batch.size
            self.jobs.put(job)
        self._arrived.set()
        return job.future

    def _check_queue(self, rows: int) -> None:
        """Refuse (under _lock) while the queue is full. The rows already waiting are counted, not the new
        request's, so one reaching an idle server is never refused, however many rows it has."""
        limit, waiting = self.limits.max_queue_len, self._queued_rows + self._waiting_rows
        if limit and waiting >= limit:
            self.metrics.requests.labels("rejected").inc(rows)
            raise QueueFull(f"the server is overloaded: {waiting} requests already wait for the engine "
                            f"(--max-queue-len {limit}); retry later")

    def cancel(self, key: str) -> bool:
        """Give up the job submitted with `key` (its client went away); False if it has ended."""
        job = self._keyed.get(key)
        return job is not None and job.future.cancel()

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set, then finish what was accepted (a drain) and release the workers."""
        while True:
            if stop.is_set():
                self._close()
            self._take_jobs()
            if self.core.has_unfinished():
                self._step()
            elif self._beams:
                self._run_static(self._beams.popleft())
            elif stop.is_set() and self.jobs.empty():
                break
            else:
                self._wait_for_job()
        if self.channel.comm.Get_size() > 1:
            self.channel.send_stop()

    def _wait_for_job(self) -> None:
        """Idle until a job is submitted (or 50 ms pass: `stop` is looked at that often)."""
        self._arrived.wait(0.05)
        self._arrived.clear()  # a job put before this is still in the queue for _take_jobs

    def _take_jobs(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            with self._lock:  # its rows stay counted as waiting until _update_gauges recounts them
                self._queued_rows -= job.batch.size
                self._waiting_rows += job.batch.size
            job.timer.started()
            if job.future.cancelled():  # given up while queued
                job.timer.done("cancelled", reasons=["abort"] * job.batch.size)
            elif job.expired():
                self._time_out(job)
            elif (job.batch.beam_width > 1).any():
                self._beams.append(job)
            else:
                self._admit(job)
        self._update_gauges()

    def _admit(self, job: _Job) -> None:
        """Each row of the job becomes an engine request; a row that can never fit fails the job alone."""
        try:
            for row in range(job.batch.size):
                job.request_ids.append(self.core.add_request(_prompt(job.batch, row), row_options(job.batch, row)))
        except (ConfigError, ValueError) as exc:
            for request_id in job.request_ids:
                self.core.cancel(request_id)
            job.request_ids = []
            job.timer.done("error")
            _settle(job.future, error=exc)
            return
        for row, request_id in enumerate(job.request_ids):
            self._rows[request_id] = (job, row)
        self._live.append(job)

    def _step(self) -> None:
        self._stop_given_up()
        try:
            events = self.core.step()
        except Exception as exc:  # ranks may now be out of step: fail every request, the caller ends the job
            self._fail_all(list(self._live), exc)
            raise EngineFailed(f"generation failed: {_first_line(exc)}") from exc
        self._update_gauges()  # before any job completes: its caller sees the metrics of its last step
        touched = {id(job): job for job in (self._record(event) for event in events) if job is not None}
        for job in touched.values():
            self._deliver(job)

    def _stop_given_up(self) -> None:
        """Jobs given up by their client or past their deadline: their rows end at this step, freeing their pages."""
        for job in self._live:
            job.timed_out = job.timed_out or job.expired()
            if job.future.cancelled() or job.timed_out:
                for request_id in job.request_ids:
                    self.core.cancel(request_id)

    def _time_out(self, job: _Job) -> None:
        """A job whose deadline passed before it started."""
        job.timer.done("timeout", reasons=["abort"] * job.batch.size)
        _settle(job.future, error=job.timeout_error())

    def _record(self, event: TokenEvent) -> Optional[_Job]:
        job, row = self._rows.get(event.request_id, (None, 0))
        if job is None:
            return None
        if event.token >= 0:
            job.tokens[row].append(event.token)
            job.logprobs[row].append(event.logprob)
        if event.finish != Finish.RUNNING:
            job.codes[row] = event.finish
            del self._rows[event.request_id]
        return job

    def _deliver(self, job: _Job) -> None:
        while job.ready():
            tokens, reasons = job.step_arrays()
            job.timer.token(sum(len(t) > job.delivered for t in job.tokens))
            if job.on_token is not None:
                job.on_token(job.delivered, tokens, reasons)
            job.delivered += 1
        if job.finished:
            self._live.remove(job)
            self._complete(job)

    def _complete(self, job: _Job) -> None:
        output = job_output(job.batch, job.tokens, job.logprobs, job.codes)
        generated = int((output.sequence_lengths - job.batch.lengths).sum())
        reasons = [_REASON_LABELS.get(int(code), "stop") for code in job.codes]
        outcome = "cancelled" if job.future.cancelled() else "timeout" if job.timed_out else "success"
        job.timer.done(outcome, int(job.batch.lengths.sum()), generated, reasons)
        if job.timed_out:
            _settle(job.future, error=job.timeout_error())
        else:
            _settle(job.future, output)

    def _run_static(self, job: _Job) -> None:
        """A beam-search job, through the static engine on every rank (it cannot be stopped once started)."""
        if job.expired():
            self._time_out(job)
            return
        if self.channel.comm.Get_size() > 1:
            self.channel.send_generate(job.batch)
        try:
            output = self.generator.generate(job.batch)
        except Exception as exc:
            self._fail_all([job], exc)
            raise EngineFailed(f"generation failed: {_first_line(exc)}") from exc
        generated = output.sequence_lengths.reshape(job.batch.size, -1)[:, 0] - job.batch.lengths  # best beam
        codes = output.finish_reason.reshape(job.batch.size, -1)[:, 0]
        job.timer.token(job.batch.size)
        job.timer.done("success", int(job.batch.lengths.sum()), int(generated.sum()),
                       [_REASON_LABELS.get(int(c), "stop") for c in codes])
        _settle(job.future, output)

    def _update_gauges(self) -> None:
        scheduler = self.core.scheduler
        self.metrics.running.set(len(scheduler.running))
        self._waiting_rows = self.core.num_waiting + sum(job.batch.size for job in self._beams)
        self.metrics.waiting.set(self._waiting_rows + self._queued_rows)
        self.metrics.kv_cache_usage.set(self.core.kv_cache_usage)
        counts = (scheduler.preemptions, scheduler.prefix_queries, scheduler.prefix_hits)
        for counter, now, before in zip((self.metrics.preemptions, self.metrics.prefix_queries,
                                         self.metrics.prefix_hits), counts, self._counted):
            counter.inc(now - before)
        self._counted = counts

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; the accepted ones still run (a drain). Safe from a signal handler."""
        self._close()

    def _close(self, refusal: Optional[str] = None) -> None:
        with self._lock:
            self.accepting = False
            self.refusal = refusal or self.refusal

    def _fail_all(self, jobs: list[_Job], exc: Exception) -> None:
        """Fail `jobs` and every queued job with one clear message, and refuse new ones."""
        message = (f"generation failed on the rank grid ({_first_line(exc)}); "
                   "the server is ending the job: restart it and retry")
        self._close(message)
        for job in jobs + list(self._beams):
            job.timer.done("error")
            _settle(job.future, error=EngineFailed(message))
        while not self.jobs.empty():
            queued = self.jobs.get()
            queued.timer.started()
            queued.timer.done("error")
            _settle(queued.future, error=ServerStopping(message))


def _prompt(batch: Batch, row: int) -> list[int]:
    return batch.input_ids[row, :batch.lengths[row]].tolist()


def row_options(batch: Batch, row: int) -> SamplingOptions:
    """One Batch row's generation options, for the in-flight engine."""
    words = {name: tuple(tuple(w) for w in parse_word_list(getattr(batch, name)[row]))
             if getattr(batch, name).shape[-1] else () for name in ("stop_words", "bad_words")}
    return SamplingOptions(
        max_tokens=int(batch.output_lens[row]), end_id=int(batch.end_id[row]), top_k=int(batch.top_k[row]),
        top_p=float(batch.top_p[row]), temperature=float(batch.temperature[row]),
        repetition_penalty=float(batch.repetition_penalty[row]), presence_penalty=float(batch.presence_penalty[row]),
        frequency_penalty=float(batch.frequency_penalty[row]), min_length=int(batch.min_length[row]), seed=int(batch.seed[row]), **words)


def job_output(batch: Batch, tokens: list[list[int]], logprobs: list[list[float]], codes: list[int]) -> Output:
    """The static engine's Output for rows generated one by one: prompt, new tokens, end_id padding."""
    B, S = batch.input_ids.shape
    width = max((len(t) for t in tokens), default=0)
    out_ids = np.repeat(batch.end_id[:, None], S + width, axis=1)
    lp = np.zeros((B, width), dtype=np.float32)
    for row in range(B):
        length, n = int(batch.lengths[row]), len(tokens[row])
        out_ids[row, :length] = batch.input_ids[row, :length]
        out_ids[row, length:length + n] = tokens[row]
        lp[row, :n] = logprobs[row]
    lengths = batch.lengths + np.array([len(t) for t in tokens], dtype=np.int64)
    return Output(out_ids, lengths, lp.sum(axis=1).astype(np.float32), lp, np.array(codes, dtype=np.int64))


def _settle(future: concurrent.futures.Future, result=None, error: Optional[Exception] = None) -> None:
    """Set a job's result or error unless its client has cancelled it (then nobody is waiting)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        assert future.cancelled()


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
