"""LLM serving metrics in Prometheus' text format, named after vLLM's (`ft_runner:` prefix)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ft_runner:requests", "Requests by outcome (success, error, rejected, cancelled, timeout).",
                                ["outcome"], registry=r)
        self.finished = Counter("ft_runner:request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("ft_runner:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("ft_runner:generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram("ft_runner:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("ft_runner:inter_token_latency_seconds", "Time between two output tokens.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("ft_runner:e2e_request_latency_seconds", "Request latency, queueing included.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("ft_runner:num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("ft_runner:num_requests_waiting", "Requests waiting for the engine.", registry=r)
        self.kv_cache_usage = Gauge("ft_runner:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = all).",
                                    registry=r)
        self.prefix_queries = Counter("ft_runner:prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                      "cache.", registry=r)
        self.prefix_hits = Counter("ft_runner:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                   registry=r)
        self.preemptions = Counter("ft_runner:num_preemptions", "Requests preempted for lack of KV-cache pages "
                                   "(recomputed later).", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Times one batch of rows through the engine: queueing, first token, each next token, the end."""

    def __init__(self, metrics: Metrics, rows: int):
        self.metrics, self.rows = metrics, rows
        self.start = self.last = time.perf_counter()
        self.first = None

    def started(self) -> None:
        """The job left the submission queue (the running and waiting gauges follow the scheduler)."""

    def token(self, active_rows: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            for _ in range(self.rows):
                self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(active_rows):
                self.metrics.itl.observe(now - self.last)
        self.last = now

    def done(self, outcome: str, prompt_tokens: int = 0, generated: int = 0, reasons=()) -> None:
        """`outcome`: success, error, cancelled or timeout."""
        self.metrics.requests.labels(outcome).inc(self.rows)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generation_tokens.inc(generated)
        for reason in reasons:
            self.metrics.finished.labels(reason).inc()
        for _ in range(self.rows):
            self.metrics.e2e.observe(time.perf_counter() - self.start)
