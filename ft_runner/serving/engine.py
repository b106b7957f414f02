"""Rank 0's engine loop: the one thread that issues collectives, fed by the serving threads."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Callable, Optional

from ft_runner.engine.generator import Batch, Generator, Output
from ft_runner.serving.metrics import Metrics, RequestTimer
from ft_runner.serving.protocol import Channel


class ServerStopping(RuntimeError):
    pass


class EngineFailed(RuntimeError):
    """A generation failed: the ranks may be out of step, so the job must end (server.py aborts it)."""


@dataclasses.dataclass
class _Job:
    batch: Batch
    future: concurrent.futures.Future
    on_token: Optional[Callable] = None  # Generator.generate's on_token, called on the engine thread
    timer: Optional[RequestTimer] = None


class Engine:
    """Serving threads `submit` batches; `run` (on the main thread) executes them one by one,
    first telling every other rank what to run so their collectives match rank 0's."""

    def __init__(self, generator: Generator, channel: Channel, metrics: Optional[Metrics] = None):
        self.generator = generator
        self.channel = channel
        self.metrics = metrics or Metrics()
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.accepting = True
        self.refusal = "the server is shutting down and accepts no new requests"
        self._lock = threading.Lock()  # no job may enter the queue once it is closed and drained

    def submit(self, batch: Batch, on_token: Optional[Callable] = None) -> Output:
        """Queue a batch and wait for its output; `on_token` sees each step's tokens as they come."""
        return self.submit_async(batch, on_token).result()

    def submit_async(self, batch: Batch, on_token: Optional[Callable] = None) -> concurrent.futures.Future:
        with self._lock:
            if not self.accepting:
                raise ServerStopping(self.refusal)
            job = _Job(batch, concurrent.futures.Future(), on_token, RequestTimer(self.metrics, batch.size))
            self.jobs.put(job)
        return job.future

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
            self._execute(job)
        self._close()
        while not self.jobs.empty():
            self._execute(self.jobs.get())
        if self.channel.comm.Get_size() > 1:
            self.channel.send_stop()

    def _execute(self, job: _Job) -> None:
        if self.channel.comm.Get_size() > 1:
            self.channel.send_generate(job.batch)
        job.timer.started()

        running = [job.batch.size]  # rows whose token of this step still counts

        def on_token(step, tokens, reasons):
            job.timer.token(running[0])
            running[0] = int((reasons == 0).sum())
            if job.on_token is not None:
                job.on_token(step, tokens, reasons)

        try:
            output = self.generator.generate(job.batch, on_token=on_token)
        except Exception as exc:  # ranks may now be out of step: fail every request, the caller ends the job
            job.timer.done(ok=False)
            self._fail_all(job, exc)
            raise EngineFailed(f"generation failed: {_first_line(exc)}") from exc
        generated = output.sequence_lengths.reshape(job.batch.size, -1)[:, 0] - job.batch.lengths  # best beam
        reasons = ["length" if n >= want else "stop" for n, want in zip(generated, job.batch.output_lens)]
        job.timer.done(True, int(job.batch.lengths.sum()), int(generated.sum()), reasons)
        job.future.set_result(output)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on; the queued ones still run (a drain). Safe from a signal handler."""
        self._close()

    def _close(self, refusal: Optional[str] = None) -> None:
        with self._lock:
            self.accepting = False
            self.refusal = refusal or self.refusal

    def _fail_all(self, job: _Job, exc: Exception) -> None:
        """Fail `job` and every queued job with one clear message, and refuse new ones."""
        message = (f"generation failed on the rank grid ({_first_line(exc)}); "
                   "the server is ending the job: restart it and retry")
        self._close(message)
        job.future.set_exception(RuntimeError(message))
        while not self.jobs.empty():
            queued = self.jobs.get()
            queued.timer.started()
            queued.timer.done(ok=False)
            queued.future.set_exception(ServerStopping(message))


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"
