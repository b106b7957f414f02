#!/usr/bin/env python3
"""A long mixed soak of a CPU server, both APIs at once, with a KV cache small enough to preempt.

    .venv/bin/python benchmarks/load/soak.py [--duration-s 600] [--concurrency 256] [--kv-cache-blocks 128]
        [--end stop|sigterm|sigkill-rank0|sigkill-worker] [--out benchmarks/load/soak_results.json]
        [--plot benchmarks/load/soak.png]

It starts `mpirun -n 2 server.py --tp 2` (the embedded tiny GPT-2, fp32, with the OpenAI API) in a
TMPDIR of its own, and `concurrency` closed-loop clients that each send their next request as soon as
the last is answered, for `duration_s`: prompts of 8-200 tokens, outputs of 1-128 (less where the
256-token context ends first), half greedy and half sampled, spread over the Triton text model (HTTP),
the Triton streaming model (gRPC) and OpenAI completions (plain and SSE); 10 % of streams are left
mid-way by their clients and 5 % of requests are bad on purpose (soak_clients.py says how each
answer is judged). Then it ends the job (`--end`): `stop` waits for the last answers and sends
SIGTERM to rank 0; `sigterm` sends it while the clients' requests are in flight (a drain);
`sigkill-rank0` and `sigkill-worker` kill a rank under load. Every `--sample-s` it records every
server process's RSS and the server's own counters (tokens generated, preemptions, running and waiting
requests). It writes every number to --out, draws --plot (soak_plot.py), checks that nothing of the
job is left (processes, /dev/shm files, Triton's model folders, TMPDIR) and prints a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402
import soak_clients as sc  # noqa: E402
from helpers import Server, leftovers, shm_free_files  # noqa: E402

MODEL = "tiny_gpt2"  # the embedded default model
ENDS = ("stop", "sigterm", "sigkill-rank0", "sigkill-worker")
KILL_WAIT_S = 30.0  # after a SIGKILL, a request still unanswered this long is lost


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration-s", type=float, default=600.0, help="seconds of load before the end")
    p.add_argument("--concurrency", type=int, default=256, help="closed-loop clients")
    p.add_argument("--kv-cache-blocks", type=int, default=128, help="KV pages per rank (16 tokens each): small, "
                   "so that requests are preempted")
    p.add_argument("--max-queue-len", type=int, default=0, help="the server's --max-queue-len (0: none)")
    p.add_argument("--bad-rate", type=float, default=0.05, help="fraction of requests spoilt on purpose")
    p.add_argument("--cancel-rate", type=float, default=0.10, help="fraction of streams left mid-way")
    p.add_argument("--end", choices=ENDS, default="stop", help="how the job ends (see above)")
    p.add_argument("--warmup-s", type=float, default=None, help="excluded from the RSS and latency trends "
                   "(default: a tenth of the duration, 10 s at least)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples and latency windows")
    p.add_argument("--deadline-s", type=float, default=300.0, help="a request unanswered this long is lost")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "soak_results.json")
    p.add_argument("--plot", default=str(HERE / "soak.png"), help="the PNG to draw ('' for none)")
    args = p.parse_args(argv)
    args.warmup_s = max(10.0, args.duration_s / 10) if args.warmup_s is None else args.warmup_s
    return args


def start_server(args, work: Path, tmpdir: Path) -> Server:
    extra = ["--max-queue-len", str(args.max_queue_len)] if args.max_queue_len else []
    return Server(2, "--tp", "2", "--kv-cache-blocks", str(args.kv_cache_blocks), *extra, tmp=work, openai=True,
                  env={"TMPDIR": str(tmpdir)}, ready_timeout=300.0).start()


class Sampler:
    """Every `every_s`: each server process's RSS and the server's counters (its /metrics)."""

    GAUGES = {"generation_tokens": "ft_runner:generation_tokens_total", "preemptions": "ft_runner:num_preemptions_total",
              "running": "ft_runner:num_requests_running", "waiting": "ft_runner:num_requests_waiting"}

    def __init__(self, server: Server, ctx: sc.Context, t0: float, every_s: float):
        self.server, self.ctx, self.t0, self.every_s = server, ctx, t0, every_s
        self.samples: list[dict] = []
        self.pids: dict[int, str] = {}  # every process of the job ever seen, named: none may outlive it
        self.rank0 = server.rank0_pid()

    async def run(self) -> None:
        while self.server.proc.poll() is None:
            await self.sample()
            await asyncio.sleep(self.every_s)

    async def sample(self) -> None:
        rss = loadgen.tree_rss(self.server.proc.pid)
        for pid, (name, _) in rss.items():
            self.pids.setdefault(pid, _label(pid, name, self.rank0))
        sample = {"t": time.perf_counter() - self.t0,
                  "rss_mb": {f"{self.pids[pid]} ({pid})": b / 2**20 for pid, (_, b) in rss.items()}}
        sample["rss_total_mb"] = sum(sample["rss_mb"].values())
        try:
            sample.update(await self.counters())
        except Exception:  # the server is going away: RSS only
            pass
        self.samples.append(sample)

    async def counters(self) -> dict:
        async with self.ctx.clients["openai"].get("/metrics") as response:
            text = await response.text()
        found = {}
        for key, name in self.GAUGES.items():
            match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
            found[key] = float(match.group(1)) if match else 0.0
        return found


def _label(pid: int, name: str, rank0: int) -> str:
    """What a server process is, for the RSS plot: a rank, tritonserver, a model's stub, ..."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
    except OSError:
        return name
    if "server.py" in cmd and name != "prterun":
        return "rank 0" if pid == rank0 else "worker rank"
    model = re.search(r"model-store/([^/]+)/", cmd)
    if model:
        return f"stub {model.group(1)}"
    return "janitor" if "janitor" in cmd else {"prterun": "mpirun"}.get(name, name)


class Load:
    """`concurrency` closed-loop clients; `stop_issuing` ends their loops after their current request."""

    def __init__(self, args, ctx: sc.Context):
        import transformers

        transformers.logging.set_verbosity_error()  # prompts over the tokenizer's nominal length are cut (soak_clients)
        tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "ft_runner" / "assets" / "tiny-gpt2")
        self.context = json.loads((ROOT / "ft_runner/assets/tiny-gpt2/config.json").read_text())["n_positions"]
        self.args, self.ctx, self.t0 = args, ctx, 0.0
        self.prompts = sc.Prompts(tokenizer, args.seed)
        self.records: list[sc.Record] = []
        self.in_flight: dict[int, sc.Record] = {}
        self.stop_issuing = False

    async def client(self, i: int) -> None:
        rng = random.Random(self.args.seed * 100_003 + i)
        while not self.stop_issuing:
            spec = sc.make_spec(rng, self.prompts, self.context, self.args.bad_rate, self.args.cancel_rate)
            self.in_flight[i] = sc.Record(spec.kind, time.perf_counter(), bad=spec.bad)
            record = await sc.send(self.ctx, spec)
            del self.in_flight[i]
            self.records.append(record)

    def lose_in_flight(self, why: str) -> None:
        """The requests of clients given up on: sent, never answered."""
        for record in self.in_flight.values():
            record.end, record.outcome, record.message = time.perf_counter(), "lost", why
            self.records.append(record)
        self.in_flight.clear()


async def soak(args, server: Server) -> dict:
    ctx = sc.Context(server.http_url, server.grpc_url, server.openai_url, MODEL, f"{MODEL}_stream",
                     deadline_s=args.deadline_s)
    await ctx.open(args.concurrency)
    load = Load(args, ctx)
    t0 = load.t0 = time.perf_counter()
    sampler = Sampler(server, ctx, t0, args.sample_s)
    sampling = asyncio.create_task(sampler.run())
    clients = [asyncio.create_task(load.client(i)) for i in range(args.concurrency)]
    await asyncio.sleep(args.duration_s)
    end = await end_job(args, server, ctx, load, clients)
    await sampler.sample()
    sampling.cancel()
    await ctx.close()
    end["pids"] = sampler.pids
    return {"t0": t0, "records": load.records, "samples": sampler.samples, "end": end}


async def end_job(args, server: Server, ctx: sc.Context, load: Load, clients: list) -> dict:
    """Ends the load and the job as --end says. `answers_s`: the last answer after the end began;
    `job_end_s`: mpirun's exit after the signal (for `stop`, the SIGTERM after the last answer)."""
    start, rank0 = time.perf_counter(), server.rank0_pid()
    end = {"how": args.end, "t": start - load.t0, "in_flight": len(load.in_flight)}
    load.stop_issuing = True
    exited = None
    if args.end != "stop":
        exited = asyncio.create_task(asyncio.to_thread(_wait_exit, server, args.deadline_s + 120))
        _signal(args.end, server, ctx, rank0)
    waited = KILL_WAIT_S if ctx.killed else args.deadline_s + 10
    done, pending = await asyncio.wait(clients, timeout=waited)
    for task in pending:
        task.cancel()
    load.lose_in_flight(f"unanswered {waited:g} s after the end began")
    end["answers_s"] = time.perf_counter() - start
    if exited is None:
        start = time.perf_counter()
        os.kill(rank0, signal.SIGTERM)
        exited = asyncio.create_task(asyncio.to_thread(_wait_exit, server, 120.0))
    end["exit_code"], t_exit = await exited
    end["job_end_s"] = t_exit - start
    return end


def _signal(how: str, server: Server, ctx: sc.Context, rank0: int) -> None:
    if how == "sigterm":
        ctx.draining = True
        os.kill(rank0, signal.SIGTERM)
        return
    ctx.killed = True
    worker = next(p for p in server.rank_pids() if p != rank0)
    os.kill(rank0 if how == "sigkill-rank0" else worker, signal.SIGKILL)


def _wait_exit(server: Server, timeout: float) -> tuple[int | None, float]:
    """mpirun's exit code (None: it did not exit in `timeout` and was killed) and when."""
    try:
        return server.proc.wait(timeout), time.perf_counter()
    except subprocess.TimeoutExpired:
        server.kill_session()
        return None, time.perf_counter()


# -- the summary -----------------------------------------------------------------------------------------


def windows(run: dict, every_s: float) -> list[dict]:
    """Per `every_s` window of completion time: answers by outcome, ok latency p50/p99, tokens/s."""
    import numpy as np

    records, samples = run["records"], run["samples"]
    end_t = max([r.end - run["t0"] for r in records] + [every_s])
    out = []
    for lo in np.arange(0.0, end_t, every_s):
        inside = [r for r in records if lo <= r.end - run["t0"] < lo + every_s]
        ok = [r.latency_s * 1e3 for r in inside if r.outcome == "ok"]
        window = {"t": float(lo + every_s), "answers": dict(collections.Counter(r.outcome for r in inside))}
        if ok:
            window.update(p50_ms=float(np.percentile(ok, 50)), p99_ms=float(np.percentile(ok, 99)))
        out.append(window)
    tokens = [(s["t"], s["generation_tokens"]) for s in samples if "generation_tokens" in s]
    for (t1, n1), (t2, n2) in zip(tokens, tokens[1:]):
        for window in out:
            if t1 < window["t"] <= t2 + every_s / 2 and "tok_s" not in window:
                window["tok_s"] = (n2 - n1) / max(t2 - t1, 1e-9)
    return out


def trends(run: dict, wins: list[dict], warmup_s: float, duration_s: float) -> dict:
    """RSS growth after warm-up, and the ok latency's p50 late in the run against early."""
    import numpy as np

    loaded = [s for s in run["samples"] if warmup_s <= s["t"] <= duration_s]
    growth = (loaded[-1]["rss_total_mb"] / loaded[0]["rss_total_mb"] - 1) * 100 if len(loaded) >= 2 else None
    steady = [w["p50_ms"] for w in wins if warmup_s < w["t"] <= duration_s and "p50_ms" in w]
    third = max(1, len(steady) // 3)
    drift = float(np.median(steady[-third:]) / np.median(steady[:third])) if len(steady) >= 3 else None
    return {"rss_growth_pct": growth, "p50_drift": drift,
            "rss_mb_after_warmup": loaded[0]["rss_total_mb"] if loaded else None,
            "rss_mb_at_end": loaded[-1]["rss_total_mb"] if loaded else None}


def summarize(args, run: dict, left: list[str]) -> dict:
    records, end = run["records"], run["end"]
    counts = collections.Counter(r.outcome for r in records)
    by_kind = {kind: dict(collections.Counter(r.outcome for r in records if r.kind == kind)) for kind in sc.KINDS}
    failures = collections.Counter(f"{r.kind}: {r.message}" for r in records if r.outcome in ("failed", "lost"))
    ended = collections.Counter(f"{r.kind}: {r.message}" for r in records if r.outcome == "ended")
    last = next((s for s in reversed(run["samples"]) if "preemptions" in s), {})
    in_load = [s for s in run["samples"] if "generation_tokens" in s and s["t"] <= args.duration_s]
    tok_s = ((in_load[-1]["generation_tokens"] - in_load[0]["generation_tokens"]) / (in_load[-1]["t"] - in_load[0]["t"])
             if len(in_load) >= 2 else None)
    wins = windows(run, args.sample_s)
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "sent": len(records), **{o: counts.get(o, 0) for o in sc.OUTCOMES}, "by_kind": by_kind,
        "failures": dict(failures.most_common(20)), "ended_by": dict(ended.most_common(10)),
        "preemptions": last.get("preemptions"),
        "generation_tok_s": tok_s, **trends(run, wins, args.warmup_s, args.duration_s),
        "end": {k: v for k, v in end.items() if k != "pids"}, "leftovers": left,
        "in_flight_at_end": _in_flight_outcomes(run), "windows": wins, "samples": run["samples"],
    }


def _in_flight_outcomes(run: dict) -> dict:
    """What became of the requests in flight when the end began."""
    t_end = run["t0"] + run["end"]["t"]
    return dict(collections.Counter(r.outcome for r in run["records"] if r.start < t_end < r.end))


def report(summary: dict) -> str:
    e = summary["end"]
    lines = [f"sent {summary['sent']}: " + ", ".join(f"{o} {summary[o]}" for o in sc.OUTCOMES),
             f"preemptions {summary['preemptions']:.0f}" if summary["preemptions"] is not None else "preemptions ?",
             f"generation {summary['generation_tok_s'] or 0:.0f} tok/s; RSS {summary['rss_mb_after_warmup'] or 0:.0f} -> "
             f"{summary['rss_mb_at_end'] or 0:.0f} MB ({_pct(summary['rss_growth_pct'])}); p50 drift "
             f"{_num(summary['p50_drift'])}x",
             f"end {e['how']}: {e['in_flight']} in flight -> {summary['in_flight_at_end']}; answers in {e['answers_s']:.1f} s; "
             f"job ended {e['job_end_s']:.1f} s after, exit {e['exit_code']}; leftovers: {summary['leftovers'] or 'none'}"]
    lines += [f"  {count} x {message}" for message, count in summary["failures"].items()]
    lines += [f"  ended: {count} x {message}" for message, count in summary["ended_by"].items()]
    return "\n".join(lines)


def _pct(value) -> str:
    return "?" if value is None else f"{value:+.1f} %"


def _num(value) -> str:
    return "?" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    tmpdir = Path(tempfile.mkdtemp(prefix="ftr-soak-", dir="/tmp"))  # short: PyTriton puts Unix sockets in it
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    shm_before = shm_free_files()
    server = start_server(args, work, tmpdir)
    print(f"server ready; {args.concurrency} clients for {args.duration_s:g} s, then {args.end}", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a killed soak still ends its job (below)
    try:
        run = asyncio.run(soak(args, server))
    finally:
        server.kill_session()  # whatever is left of the job (its ranks have process groups of their own)
        server.log.close()
    left = leftovers(list(run["end"]["pids"]), tmpdir, shm_before)
    summary = summarize(args, run, left)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    if args.plot:
        import soak_plot

        soak_plot.draw(summary, Path(args.plot))
    print(report(summary))
    print(f"server log: {server.log_path}; results: {args.out}")
    return 0 if ok(summary) else 1


def ok(summary: dict) -> bool:
    """The soak's targets: nothing failed or lost, nothing left behind."""
    return summary["failed"] == 0 and summary["lost"] == 0 and not summary["leftovers"]


if __name__ == "__main__":
    sys.exit(main())
