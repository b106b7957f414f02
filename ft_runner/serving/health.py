"""The `health` model: a one-token generation through every rank, answered within a timeout.

Triton's /v2/health/ready only says the models are loaded; a rank hung in a collective passes it.
This probe proves the engine loop end to end (SGLang's /health_generate), and fails with an error,
never a hang, when the generation does not finish in time:

    curl -s -X POST localhost:8000/v2/models/health/infer -d '{"inputs": []}'

inputs:  timeout_s float32 (1,) optional (default: --health-timeout-s)
outputs: ok bool (1,), latency_ms float32 (1,)
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from ft_runner.engine.generator import Batch
from ft_runner.serving.frontend import Frontend

NAME = "health"
INPUTS = [Tensor(name="timeout_s", shape=(1,), dtype=np.float32, optional=True)]
OUTPUTS = [Tensor(name="ok", shape=(1,), dtype=np.bool_), Tensor(name="latency_ms", shape=(1,), dtype=np.float32)]
MAX_TIMEOUT_S = 300.0


class HealthModel:
    def __init__(self, engine: Frontend, end_id: int, timeout_s: float):
        self.engine = engine
        self.end_id = end_id
        self.timeout_s = timeout_s
        self.model_config = ModelConfig(batching=False)
        self._pending: concurrent.futures.Future | None = None  # probes in a row share one generation
        self._lock = threading.Lock()

    def infer(self, requests):
        """PyTriton callable: one probe per request."""
        return [self._probe(self._timeout(request)) for request in requests]

    def _timeout(self, request) -> float:
        if "timeout_s" not in request.keys():
            return self.timeout_s
        timeout = float(np.asarray(request["timeout_s"]).reshape(-1)[0])
        if not 0 < timeout <= MAX_TIMEOUT_S:
            raise ValueError(f"timeout_s = {timeout:g} must be in (0, {MAX_TIMEOUT_S:g}] seconds")
        return timeout

    def _probe(self, timeout: float) -> dict:
        start = time.perf_counter()
        with self._lock:
            if self._pending is None or self._pending.done():
                # a probe: never refused for a full queue nor stopped at --request-timeout-s (it has its own timeout)
                self._pending = self.engine.submit_async(Batch.make([[self.end_id]], [1], end_id=self.end_id),
                                                         probe=True)
            future = self._pending
        try:
            future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(
                f"unhealthy: a one-token generation through all ranks did not finish in {timeout:g} s "
                "(a rank may be hung, or long requests are queued ahead of the probe)") from None
        return {"ok": np.array([True]), "latency_ms": np.array([(time.perf_counter() - start) * 1e3], np.float32)}
