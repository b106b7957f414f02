"""Test-only fault injection: off unless FT_RUNNER_FAULT_INJECT is set (tests/test_reliability.py).

    FT_RUNNER_FAULT_INJECT="KIND:ARG[,KIND:ARG...]"

    worker_forward_raise:N   every worker rank raises in its forward once N steps have run
    worker_hang:N            every worker rank hangs in its forward once N steps have run
    worker_delay:S           every worker rank sleeps S seconds at the start of each step

A step is one in-flight engine step (a request of n new tokens takes n of them) or one beam batch.
    load_oom:R               rank R runs out of memory while it loads its shard
    load_delay:R:S           rank R takes S seconds longer to load its shard
"""

from __future__ import annotations

import os
import time

ENV = "FT_RUNNER_FAULT_INJECT"


class InjectedFault(RuntimeError):
    pass


def _faults() -> dict[str, list[str]]:
    spec = os.environ.get(ENV, "")
    return {kind: args for kind, *args in (item.split(":") for item in spec.split(",") if item)}


def before_worker_step(done: int) -> None:
    """Called by a worker rank before each step; `done` steps have run so far."""
    faults = _faults()
    if "worker_delay" in faults:
        time.sleep(float(faults["worker_delay"][0]))
    if "worker_forward_raise" in faults and done >= int(faults["worker_forward_raise"][0]):
        raise InjectedFault(f"injected fault: worker forward raised after {done} steps ({ENV})")
    if "worker_hang" in faults and done >= int(faults["worker_hang"][0]):
        while True:
            time.sleep(1)


def during_load(rank: int) -> None:
    """Called by every rank while it loads its shard."""
    faults = _faults()
    if "load_delay" in faults and int(faults["load_delay"][0]) == rank:
        print(f"injected fault: rank {rank} loads its shard {faults['load_delay'][1]} s slower", flush=True)
        time.sleep(float(faults["load_delay"][1]))
    if "load_oom" in faults and int(faults["load_oom"][0]) == rank:
        import torch

        raise torch.OutOfMemoryError(f"injected fault: out of memory loading rank {rank}'s shard ({ENV})")
