"""Rank 0's engine loop: the one thread that issues collectives, fed by the serving threads."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Callable, Optional

import numpy as np

from ft_runner.engine.generator import Batch, Generator, Output
from ft_runner.engine.sampler import Finish
from ft_runner.serving.metrics import Metrics, RequestTimer
from ft_runner.serving.protocol import Channel


class ServerStopping(RuntimeError):
    pass


class EngineFailed(RuntimeError):
    """A generation failed: the ranks may be out of step, so the job must end (server.py aborts it)."""


@dataclasses.dataclass
class _Job:
    batch: Batch
    future: concurrent.futures.Future  # cancelling it (Future.cancel) stops the job's rows
    on_token: Optional[Callable] = None  # Generator.generate's on_token, called on the engine thread
    timer: Optional[RequestTimer] = None
    key: Optional[str] = None  # the name `Engine.cancel` knows the job by


class Engine:
    """Serving threads `submit` batches; `run` (on the main thread) executes them one by one,
    first telling every other rank what to run so their collectives match rank 0's.

    A job whose future is cancelled (its client went away) is dropped if it has not started, and
    its rows stop within a few steps if it has (Generator.generate's `cancelled`)."""

    def __init__(self, generator: Generator, channel: Channel, metrics: Optional[Metrics] = None,
                 max_rows: int = 128):
        self.generator = generator
        self.channel = channel
        self.max_rows = max_rows
        self.metrics = metrics or Metrics()
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.accepting = True
        self.refusal = "the server is shutting down and accepts no new requests"
        self._lock = threading.Lock()  # no job may enter the queue once it is closed and drained
        self._keyed: dict[str, _Job] = {}  # jobs submitted with a key, until they end

    def submit(self, batch: Batch, on_token: Optional[Callable] = None) -> Output:
        """Queue a batch and wait for its output; `on_token` sees each step's tokens as they come."""
        return self.submit_async(batch, on_token).result()

    def submit_async(self, batch: Batch, on_token: Optional[Callable] = None,
                     key: Optional[str] = None) -> concurrent.futures.Future:
        """Queue a batch; its future holds the Output. `future.cancel()`, or `cancel(key)`, gives it up."""
        with self._lock:
            if not self.accepting:
                raise ServerStopping(self.refusal)
            job = _Job(batch, concurrent.futures.Future(), on_token, RequestTimer(self.metrics, batch.size), key)
            if key is not None:
                self._keyed[key] = job
                job.future.add_done_callback(lambda _: self._keyed.pop(key, None))
            self.jobs.put(job)
        return job.future

    def cancel(self, key: str) -> bool:
        """Give up the job submitted with `key` (its client went away); False if it has ended."""
        job = self._keyed.get(key)
        return job is not None and job.future.cancel()

    def run(self, stop: threading.Event) -> None:
        """Serve jobs until `stop` is set, then finish the queued ones and release the workers."""
        while True:
            try:
                job = self.jobs.get(timeout=0.05)
            except queue.Empty:
                if stop.is_set():
                    break
                continue
            if stop.is_set():
                self._close()
            self._execute(self._gather(job))
        self._close()
        while not self.jobs.empty():
            self._execute(self._gather(self.jobs.get()))
        if self.channel.comm.Get_size() > 1:
            self.channel.send_stop()

    def _gather(self, first: _Job) -> list[_Job]:
        """`first` and the jobs queued right behind it, up to max_rows rows: one generation batch.

        Requests that arrive while a batch runs are thus batched together whichever API sent them.
        Beam-search jobs run alone (their outputs have one row per beam)."""
        jobs, rows = [first], first.batch.size
        while _mergeable(jobs[-1]):
            with self.jobs.mutex:
                head = self.jobs.queue[0] if self.jobs.queue else None
                if head is None or not _mergeable(head) or rows + head.batch.size > self.max_rows:
                    break
                self.jobs.queue.popleft()
            jobs.append(head)
            rows += head.batch.size
        return jobs

    def _execute(self, jobs: list[_Job]) -> None:
        given_up = [j.future.cancelled() for j in jobs]  # while queued; read once, as cancels may arrive any time
        for job in (j for j, gone in zip(jobs, given_up) if gone):
            job.timer.started()
            job.timer.done("cancelled", reasons=["abort"] * job.batch.size)
        jobs = [j for j, gone in zip(jobs, given_up) if not gone]
        if not jobs:
            return
        batch = jobs[0].batch if len(jobs) == 1 else concat_batches([j.batch for j in jobs])
        spans = np.cumsum([0] + [j.batch.size for j in jobs])
        if self.channel.comm.Get_size() > 1:
            self.channel.send_generate(batch)
        for job in jobs:
            job.timer.started()
        running = [j.batch.size for j in jobs]  # per job: rows whose token of this step still counts

        def on_token(step, tokens, reasons):
            for i, job in enumerate(jobs):
                a, b = spans[i], spans[i + 1]
                if running[i] == 0:
                    continue
                job.timer.token(running[i])
                running[i] = int((reasons[a:b] == 0).sum())
                if job.on_token is not None:
                    job.on_token(step, tokens[a:b], reasons[a:b])

        def cancelled():
            return np.repeat([job.future.cancelled() for job in jobs], np.diff(spans))

        try:
            output = self.generator.generate(batch, on_token=on_token, cancelled=cancelled)
        except Exception as exc:  # ranks may now be out of step: fail every request, the caller ends the job
            for job in jobs:
                job.timer.done("error")
            self._fail_all(jobs, exc)
            raise EngineFailed(f"generation failed: {_first_line(exc)}") from exc
        for i, job in enumerate(jobs):
            part = output if len(jobs) == 1 else split_output(output, spans[i], spans[i + 1], job.batch)
            generated = part.sequence_lengths.reshape(job.batch.size, -1)[:, 0] - job.batch.lengths  # best beam
            codes = part.finish_reason.reshape(job.batch.size, -1)[:, 0]
            reasons = [_REASON_LABELS.get(int(code), "stop") for code in codes]
            outcome = "cancelled" if job.future.cancelled() else "success"
            job.timer.done(outcome, int(job.batch.lengths.sum()), int(generated.sum()), reasons)
            _settle(job.future, part)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; the queued ones still run (a drain). Safe from a signal handler."""
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
        for job in jobs:
            _settle(job.future, error=RuntimeError(message))
        while not self.jobs.empty():
            queued = self.jobs.get()
            queued.timer.started()
            queued.timer.done("error")
            _settle(queued.future, error=ServerStopping(message))


_REASON_LABELS = {Finish.LENGTH: "length", Finish.CANCELLED: "abort"}  # vLLM's finished_reason labels


def _settle(future: concurrent.futures.Future, result=None, error: Optional[Exception] = None) -> None:
    """Set a job's result or error unless its client has cancelled it (then nobody is waiting)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        assert future.cancelled()


def _mergeable(job: _Job) -> bool:
    return bool((job.batch.beam_width == 1).all())


def concat_batches(batches: list[Batch]) -> Batch:
    """Rows of several batches as one: prompts right-padded to the longest, word lists to the widest."""
    width = max(b.input_ids.shape[1] for b in batches)
    fields = {}
    for field in dataclasses.fields(Batch):
        arrays = [getattr(b, field.name) for b in batches]
        if field.name == "input_ids":
            arrays = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=b.end_id[0] if b.size else 0)
                      for a, b in zip(arrays, batches)]
        elif arrays[0].ndim == 3:  # FT word lists (B, 2, L): ids padded with 0, offsets with -1
            longest = max(a.shape[2] for a in arrays)
            arrays = [np.concatenate([np.pad(a[:, :1], ((0, 0), (0, 0), (0, longest - a.shape[2]))),
                                      np.pad(a[:, 1:], ((0, 0), (0, 0), (0, longest - a.shape[2])),
                                             constant_values=-1)], axis=1) for a in arrays]
        fields[field.name] = np.concatenate(arrays)
    return Batch(**fields)


def split_output(output: Output, start: int, end: int, batch: Batch) -> Output:
    """Rows [start, end) of a merged batch's output, shaped as if their batch had run alone."""
    steps = int((output.sequence_lengths[start:end] - batch.lengths).max())
    fields = {}
    for field in dataclasses.fields(Output):
        array = getattr(output, field.name)[start:end]
        if field.name == "output_ids":
            array = array[:, : batch.input_ids.shape[1] + steps]
        elif field.name == "output_log_probs":
            array = array[:, :steps]
        fields[field.name] = array
    return Output(**fields)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
