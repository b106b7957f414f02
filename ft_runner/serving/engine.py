"""Rank 0's engine loop: the one thread that issues collectives, fed by the serving threads."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Callable, Optional

from ft_runner.engine.generator import Batch, Generator, Output
from ft_runner.serving.protocol import Channel


class ServerStopping(RuntimeError):
    pass


@dataclasses.dataclass
class _Job:
    batch: Batch
    future: concurrent.futures.Future
    on_token: Optional[Callable] = None  # on_token(step, tokens, finished): numpy (B,) each, on the engine thread


class Engine:
    """Serving threads `submit` batches; `run` (on the main thread) executes them one by one,
    first telling every other rank what to run so their collectives match rank 0's."""

    def __init__(self, generator: Generator, channel: Channel):
        self.generator = generator
        self.channel = channel
        self.jobs: queue.Queue[_Job] = queue.Queue()
        self.accepting = True

    def submit(self, batch: Batch, on_token: Optional[Callable] = None) -> Output:
        """Queue a batch and wait for its output; `on_token` sees each step's tokens as they come."""
        return self.submit_async(batch, on_token).result()

    def submit_async(self, batch: Batch, on_token: Optional[Callable] = None) -> concurrent.futures.Future:
        if not self.accepting:
            raise ServerStopping("the server is shutting down and accepts no new requests")
        job = _Job(batch, concurrent.futures.Future(), on_token)
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
                self.accepting = False
            self._execute(job)
        self.accepting = False
        while not self.jobs.empty():
            self._execute(self.jobs.get())
        if self.channel.comm.Get_size() > 1:
            self.channel.send_stop()

    def _execute(self, job: _Job) -> None:
        if self.channel.comm.Get_size() > 1:
            self.channel.send_generate(job.batch)
        try:
            job.future.set_result(self.generator.generate(job.batch, on_token=job.on_token))
        except Exception as exc:  # ranks may now be out of step: the caller must end the job
            job.future.set_exception(RuntimeError(f"generation failed: {exc}"))
            raise
