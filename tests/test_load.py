"""Soak (issue 6): a real TP 2 server under closed-loop load: no failed request, memory holds steady.

The full load test (perf_analyzer, 2 minutes at concurrency 1, 8 and 64) is benchmarks/load/run_load.py;
its results are in LOAD.md. This is its short CI twin, with the Python load generator.
"""

from __future__ import annotations

import sys

import pytest
from helpers import ROOT, Server

sys.path.insert(0, str(ROOT / "benchmarks" / "load"))

import loadgen  # noqa: E402
from run_load import MODEL, OUTPUT_LEN, PROMPT, triton_counts  # noqa: E402

SOAK_S = 25.0
CONCURRENCY = 16


def server_rss_mb(server) -> float:
    return sum(rss for _, rss in loadgen.tree_rss(server.proc.pid).values()) / 2**20


@pytest.mark.slow
def test_soak_has_no_failed_request_and_steady_memory(tmp_path):
    with Server(2, "--tp", "2", tmp=tmp_path) as server:
        loadgen.run(server.http_url, MODEL, CONCURRENCY, 3.0, PROMPT, OUTPUT_LEN)  # warm-up: allocator, caches
        before_rss, before = server_rss_mb(server), triton_counts(server)
        result = loadgen.run(server.http_url, MODEL, CONCURRENCY, SOAK_S, PROMPT, OUTPUT_LEN)
        after_rss, after = server_rss_mb(server), triton_counts(server)
    print(f"soak: {result['requests']} requests in {result['elapsed_s']:.0f}s at concurrency {CONCURRENCY}, "
          f"{result['throughput_rps']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, "
          f"server RSS {before_rss:.0f} -> {after_rss:.0f} MB")
    assert result["failures"] == 0, result["errors"]
    assert result["requests"] >= CONCURRENCY
    assert after["failure"] - before["failure"] == 0
    assert after["success"] - before["success"] == result["requests"]
    assert after_rss - before_rss < max(64.0, 0.1 * before_rss), (before_rss, after_rss)
