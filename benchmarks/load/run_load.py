#!/usr/bin/env python3
"""Load test: a CPU server (TP 2 on 2 ranks) under closed-loop load at several concurrencies.

    .venv/bin/python benchmarks/load/run_load.py [--duration-s 120] [--concurrency 1 8 64] [--tool perf_analyzer]

For each concurrency it runs `duration_s` of load with perf_analyzer (benchmarks/load/perf_analyzer.sh,
three measurement windows of duration_s / 3) or the Python generator (loadgen.py), and records
latency percentiles, throughput, failed requests (the client's count and Triton's
nv_inference_request_failure) and the RSS of every server process before and after. It prints a
markdown table for LOAD.md and writes every number to --out as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
from helpers import Server  # noqa: E402

from ft_runner.serving.server import ACCESS_TOKEN_ENV  # noqa: E402

MODEL = "tiny_gpt2"  # the embedded default model
PROMPT = "The quick brown fox jumps over the lazy dog because"
OUTPUT_LEN = 16
ACCESS_TOKEN = secrets.token_urlsafe(16)


def triton_counts(server) -> dict[str, float]:
    """Triton's own success/failure counters for the model (its metrics endpoint)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for kind in ("success", "failure"):
        match = re.search(rf'^nv_inference_request_{kind}{{model="{MODEL}",version="1"}} (\S+)', text, re.M)
        counts[kind] = float(match.group(1)) if match else 0.0
    return counts


def perf_analyzer(server, concurrency: int, duration_s: float, work: Path) -> dict:
    data = work / "input.json"
    data.write_text(json.dumps({"data": [{"prompts": {"content": [PROMPT], "shape": [1]},
                                          "request_output_len": {"content": [OUTPUT_LEN], "shape": [1]}}]}))
    report = work / f"pa-{concurrency}.csv"
    cmd = [str(HERE / "perf_analyzer.sh"), "-m", MODEL, "-u", f"127.0.0.1:{server.http}", "-i", "http",
           "-H", f"triton-access-token:{ACCESS_TOKEN}",  # perf_analyzer reads Triton's restricted statistics
           "--input-data", str(data), "--concurrency-range", str(concurrency),
           "--measurement-interval", str(int(duration_s * 1000 / 3)), "--max-trials", "3",
           "--stability-percentage", "999", "-f", str(report)]
    start = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True)
    elapsed = time.time() - start
    (work / f"pa-{concurrency}.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        return {"concurrency": concurrency, "failures": -1, "errors": {"perf_analyzer": out.stderr[-2000:] or
                                                                     out.stdout[-2000:]}, "elapsed_s": elapsed}
    row = next(csv.DictReader(report.open()))
    us = {q: float(row[f"p{q} latency"]) for q in (50, 90, 95, 99)}
    return {"concurrency": concurrency, "throughput_rps": float(row["Inferences/Second"]), "failures": 0,
            "errors": {}, "elapsed_s": elapsed, **{f"p{q}_ms": v / 1e3 for q, v in us.items()},
            "avg_ms": float(re.search(r"Avg latency: (\d+) usec", out.stdout).group(1)) / 1e3,
            "server_queue_ms": float(row["Server Queue"]) / 1e3,
            "server_compute_ms": float(row["Server Compute Infer"]) / 1e3}


def measure(server, tool: str, concurrency: int, duration_s: float, work: Path) -> dict:
    before_rss, before = loadgen.tree_rss(server.proc.pid), triton_counts(server)
    if tool == "perf_analyzer":
        result = perf_analyzer(server, concurrency, duration_s, work)
    else:
        result = loadgen.run(server.http_url, MODEL, concurrency, duration_s, PROMPT, OUTPUT_LEN)
    after, after_rss = triton_counts(server), loadgen.tree_rss(server.proc.pid)
    result.update(triton_success=after["success"] - before["success"],
                  triton_failure=after["failure"] - before["failure"],
                  rss_before_mb=sum(r for _, r in before_rss.values()) / 2**20,
                  rss_after_mb=sum(r for _, r in after_rss.values()) / 2**20,
                  rss_by_process_mb={f"{name} {pid}": [before_rss.get(pid, (name, 0))[1] / 2**20, rss / 2**20]
                                     for pid, (name, rss) in after_rss.items()})
    return result


def table(results: list[dict], tool: str, duration_s: float) -> str:
    lines = ["| concurrency | tool | duration | requests (Triton) | failed (client / Triton) | throughput req/s "
             "| tokens/s | p50 ms | p90 ms | p99 ms | server RSS before → after (MB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['concurrency']} | {tool} | {duration_s:.0f} s | {r['triton_success']:.0f} | "
            f"{r['failures']} / {r['triton_failure']:.0f} | {r.get('throughput_rps', 0):.1f} | "
            f"{r.get('throughput_rps', 0) * OUTPUT_LEN:.0f} | {r.get('p50_ms', 0):.0f} | {r.get('p90_ms', 0):.0f} | "
            f"{r.get('p99_ms', 0):.0f} | {r['rss_before_mb']:.0f} → {r['rss_after_mb']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=120.0, help="load per concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--tool", choices=("perf_analyzer", "python"), default="perf_analyzer")
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results.json")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ft_runner_load_"))
    os.environ[ACCESS_TOKEN_ENV] = ACCESS_TOKEN  # the server's ranks inherit it through mpirun
    with Server(args.tp, "--tp", str(args.tp), tmp=work) as server:
        loadgen.run(server.http_url, MODEL, 2, 3.0, PROMPT, OUTPUT_LEN)  # warm-up, not measured
        results = []
        for concurrency in args.concurrency:
            results.append(measure(server, args.tool, concurrency, args.duration_s, work))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "rss_by_process_mb"}), flush=True)
    args.out.write_text(json.dumps({"tool": args.tool, "duration_s": args.duration_s, "tp": args.tp,
                                    "model": MODEL, "prompt": PROMPT, "output_len": OUTPUT_LEN,
                                    "results": results}, indent=1))
    print(table(results, args.tool, args.duration_s))
    failed = any(r["failures"] or r["triton_failure"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
