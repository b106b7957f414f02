"""Closed-loop load on a text model through tritonclient's asyncio HTTP client.

`concurrency` clients each send their next request as soon as the last one is answered, for
`duration_s`: perf_analyzer's concurrency mode, in Python. It is the CI soak test's load (perf_analyzer
needs a download and a system library) and the fallback where perf_analyzer cannot run.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time

import numpy as np


def _inputs(prompt: str, output_len: int) -> list:
    import tritonclient.http.aio as aioclient

    prompts = np.array([[prompt.encode()]], dtype=object)
    lens = np.array([[output_len]], dtype=np.uint32)
    inputs = [aioclient.InferInput("prompts", [1, 1], "BYTES"), aioclient.InferInput("request_output_len", [1, 1],
                                                                                      "UINT32")]
    inputs[0].set_data_from_numpy(prompts)
    inputs[1].set_data_from_numpy(lens)
    return inputs


async def _clients(url: str, model: str, concurrency: int, duration_s: float, prompt: str, output_len: int) -> dict:
    import tritonclient.http.aio as aioclient

    latencies, errors = [], collections.Counter()
    deadline = time.perf_counter() + duration_s
    client = aioclient.InferenceServerClient(url.removeprefix("http://"), conn_limit=concurrency, conn_timeout=300)

    async def one_client():
        inputs = _inputs(prompt, output_len)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                result = await client.infer(model, inputs)
                if result.as_numpy("sentences").size != 1:
                    raise ValueError("a response without its sentence")
                latencies.append(time.perf_counter() - start)
            except Exception as exc:  # every failure is counted and reported, none is retried
                errors[str(exc).splitlines()[0][:200]] += 1

    start = time.perf_counter()
    try:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    finally:
        await client.close()
    return summary(latencies, errors, time.perf_counter() - start, concurrency)


def summary(latencies: list[float], errors: collections.Counter, elapsed_s: float, concurrency: int) -> dict:
    ms = np.array(latencies) * 1e3 if latencies else np.zeros(1)
    return {
        "concurrency": concurrency, "requests": len(latencies), "failures": sum(errors.values()),
        "errors": dict(errors), "elapsed_s": elapsed_s, "throughput_rps": len(latencies) / elapsed_s,
        **{f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 95, 99)}, "avg_ms": float(ms.mean()),
    }


def run(url: str, model: str, concurrency: int, duration_s: float, prompt: str = "The quick brown fox",
        output_len: int = 16) -> dict:
    """Latency percentiles, throughput and every failure of `duration_s` of closed-loop load."""
    return asyncio.run(_clients(url, model, concurrency, duration_s, prompt, output_len))


def tree_rss(root_pid: int) -> dict[int, tuple[str, int]]:
    """{pid: (name, RSS bytes)} of `root_pid` and all its descendants (mpirun, ranks, tritonserver, stubs)."""
    from pathlib import Path

    parents, names = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid, rest = int(text.split(" ", 1)[0]), text.rsplit(")", 1)[1].split()
        parents[pid], names[pid] = int(rest[1]), text.split("(", 1)[1].rsplit(")", 1)[0]
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier and p not in tree]
        tree.update(children)
        frontier = children
    rss = {}
    for pid in sorted(tree):
        try:
            pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError):
            continue
        rss[pid] = (names.get(pid, "?"), pages * os.sysconf("SC_PAGE_SIZE"))
    return rss
