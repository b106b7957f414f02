"""Before/after on a realistic REST API: the same OpenAI-style load against (a) plain HF
transformers behind FastAPI (benchmarks/hf_openai_server.py) and (b) ft_runner's OpenAI endpoint.

    python benchmarks/before_after.py --model DIR [--tp 2] [--concurrency 1 4 16] [--requests 32]
        [--max-tokens 64] [--out benchmarks/results/before_after]

Both servers are started by this script on local ports and stopped at the end. Every request
streams (SSE) so time to first token is measured the same way for both; `ignore_eos` makes both
generate exactly --max-tokens tokens. Prints a table (requests/s, output tok/s, p50/p95 TTFT and
latency per engine and concurrency), writes it as JSON and draws a PNG chart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Thank you for", "Q: Are you going for lunch?", "The class statement", "A function definition",
    "In the beginning", "The quick brown fox", "import os", "Once upon a time",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def start_hf(model: str, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "hf_openai_server.py"), "--model", model,
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def start_ft(model: str, tp: int, out_dir: Path, log) -> tuple[subprocess.Popen, str]:
    openai_port, http, grpc, metrics = (free_port() for _ in range(4))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=path)
    mpirun = str(Path(sys.executable).parent / "mpirun") if (Path(sys.executable).parent / "mpirun").exists() else "mpirun"
    cmd = [mpirun, "-n", str(tp), "--oversubscribe", sys.executable, str(ROOT / "server.py"), "--tp", str(tp),
           "--hf-model-name", model, "--output-dir", str(out_dir), "--bind-address", "127.0.0.1",
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--openai-port", str(openai_port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{openai_port}"


async def one_request(client: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    async with client.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("text") and first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": max_tokens}


async def load(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    results, next_index = [], iter(range(requests))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as client:
        async def worker():
            for i in next_index:
                results.append(await one_request(client, url, PROMPTS[i % len(PROMPTS)], max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = np.array([r["ttft"] for r in results]) * 1000
    latency = np.array([r["latency"] for r in results]) * 1000
    return {"concurrency": concurrency, "requests": requests, "req_s": requests / wall,
            "out_tok_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50_ms": float(np.percentile(ttft, 50)), "ttft_p95_ms": float(np.percentile(ttft, 95)),
            "latency_p50_ms": float(np.percentile(latency, 50)), "latency_p95_ms": float(np.percentile(latency, 95))}


def run_engine(name: str, proc: subprocess.Popen, url: str, args) -> list[dict]:
    try:
        wait_healthy(url, proc, args.startup_timeout)
        rows = []
        for c in args.concurrency:
            asyncio.run(load(url, c, c, args.max_tokens))  # warm-up: one round at this concurrency
            rows.append(dict(engine=name, **asyncio.run(load(url, c, args.requests, args.max_tokens))))
        return rows
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def table(rows: list[dict]) -> str:
    head = f"{'engine':<12}{'conc':>5}{'req/s':>9}{'out tok/s':>11}{'TTFT p50':>10}{'p95':>8}{'lat p50':>10}{'p95':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['engine']:<12}{r['concurrency']:>5}{r['req_s']:>9.2f}{r['out_tok_s']:>11.1f}"
                     f"{r['ttft_p50_ms']:>9.0f}ms{r['ttft_p95_ms']:>6.0f}ms{r['latency_p50_ms']:>8.0f}ms"
                     f"{r['latency_p95_ms']:>7.0f}ms")
    return "\n".join(lines)


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        conc = [r["concurrency"] for r in mine]
        axes[0].plot(conc, [r["out_tok_s"] for r in mine], marker="o", label=engine)
        axes[1].plot(conc, [r["ttft_p50_ms"] for r in mine], marker="o", label=engine)
    axes[0].set(xlabel="concurrent clients", ylabel="output tokens/s", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="p50 time to first token (ms)", title="TTFT")
    levels = sorted({r["concurrency"] for r in rows})
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "before_after")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{args.out}.log", "w") as log:
        rows = run_engine("hf-fastapi", *start_hf(args.model, log), args)
        rows += run_engine("ft_runner", *start_ft(args.model, args.tp, args.out.parent / "ft_models", log), args)
    print(table(rows))
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    chart(rows, Path(f"{args.out}.png"))
    print(f"wrote {args.out}.json and {args.out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
