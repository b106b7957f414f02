"""The loop of every rank but 0: receive work from rank 0, run the same step, repeat."""

from __future__ import annotations

from ft_runner.engine.generator import Generator
from ft_runner.engine.model_runner import ModelRunner
from ft_runner.serving import faults
from ft_runner.serving.protocol import Channel, Command


def run_worker(runner: ModelRunner, generator: Generator, channel: Channel) -> None:
    """Return when rank 0 sends STOP; an exception propagates and must end the whole job
    (server.py first closes this rank's collectives so rank 0 fails fast and can answer its clients)."""
    done = 0
    while True:
        command, work = channel.receive()
        if command == Command.STOP:
            return
        faults.before_worker_step(done)
        if command == Command.STEP:
            runner.run(work)
        else:  # a beam-search batch: the static engine
            generator.generate(work)
        done += 1
