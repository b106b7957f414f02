"""Serving benchmark in the shape of `vllm bench serve`: a random workload with Poisson arrivals, sent
to a server (the OpenAI streaming endpoint or Triton's decoupled gRPC model) or run in-process by
several engines in turn, reporting throughput, TTFT, TPOT, ITL, E2E latency and goodput.

    # against a running server (python server.py --openai-port 9000 ...)
    python benchmarks/bench_serving.py --backend openai --base-url http://127.0.0.1:9000 \\
        --num-prompts 200 --input-len 64:512 --output-len 16:512 --request-rate 8 --max-concurrency 64
    python benchmarks/bench_serving.py --backend triton-grpc --grpc-url 127.0.0.1:8001 --served-model-name gpt2 \\
        --num-prompts 100 --input-len 128 --output-len 128 --request-rate 4
    # in-process, no server: the in-flight engine, today's static batches, HF continuous batching
    python benchmarks/bench_serving.py --offline --model llama-3-8b --engines ft_runner,ft_runner-static,hf-cb \\
        --num-prompts 512 --input-len 64:512 --output-len 16:512 --request-rate inf,8 --plot serving.png
    python benchmarks/bench_serving.py --offline --model ft_runner/assets/tiny-gpt2 --device cpu \\
        --engines ft_runner-static,hf-cb --num-prompts 8 --input-len 8:32 --output-len 4:16   # smoke test

Workload: `--num-prompts` requests; each draws its prompt and output lengths uniformly from the
`--input-len` / `--output-len` ranges ("a:b", or one number) and its prompt's token ids uniformly
from the vocabulary without the end ids, all from `--seed`. Every request ignores the end token,
so it generates exactly its output length. Arrivals: a Poisson process of `--request-rate`
requests/s (`--burstiness` other than 1: gamma-distributed gaps, as vLLM), `inf` = all at t=0;
several comma-separated rates give a row each. At most `--max-concurrency` requests are out at
once: the k-th request then starts once the (k - c)-th has finished, as c clients would send them.

Metrics, per request, from the time it is sent (with queueing in the engine counted):
TTFT = first token; E2E = last token (servers: end of the stream); TPOT = (E2E - TTFT) / (n_out - 1);
ITL = each gap between consecutive tokens (servers: between streamed chunks, which may hold several
tokens), pooled over requests. Mean, median and p90/p99 in ms. Goodput (`--goodput ttft:MS tpot:MS
e2e:MS`): completed requests/s meeting every SLO given. Output tok/s counts every token generated
in the run (also those of requests `--max-duration-s` cut short); request/s counts completed ones.

Offline engines (`--engines`): ft_runner (EngineCore: in-flight batching on the paged KV cache);
ft_runner-static (today's Generator, scheduled as today's server: FCFS, up to `--max-num-seqs`
arrived requests a batch, each batch run to completion; on GPUs its tokens reach the host a few
steps late, which its TTFT includes); hf-cb (HF transformers' continuous batching manager, per-token
timestamps from `record_timestamps`). `--model`: a shape of bench_generate.hf_config with random
weights (built, converted and loaded as bench_generate does) or a local HF directory.

One JSON line per (engine, rate) is appended to `<--results>/serving_<UTC date>_<gpu or cpu>.jsonl`;
`--plot PATH` draws output tok/s against TTFT and TPOT p50 per engine and rate.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import dataclasses
import datetime
import gc
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_generate as bg  # noqa: E402

ROOT = bg.ROOT
ENGINES = ("ft_runner", "ft_runner-no-prefix-cache", "ft_runner-static", "hf-cb")
FT_ENGINES = ("ft_runner", "ft_runner-no-prefix-cache", "ft_runner-static")
INFLIGHT = ("ft_runner", "ft_runner-no-prefix-cache")  # the in-flight engine, with and without prefix caching
SLO_KEYS = ("ttft", "tpot", "e2e")
PENDING = "not finished"
CUT = "cut by --max-duration-s"
clock = time.perf_counter


# --- workload --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    index: int
    prompt_ids: list
    output_len: int
    arrival: float = 0.0  # seconds after the run's start


def parse_range(text: str) -> tuple[int, int]:
    """"64:512" -> (64, 512); "128" -> (128, 128)."""
    lo, _, hi = str(text).partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"a length range is N or A:B with 1 <= A <= B, got {text!r}")
    return lo, hi


def range_label(span: tuple[int, int]):
    """The JSON form of a length range: an int, or "a:b"."""
    return span[0] if span[0] == span[1] else f"{span[0]}:{span[1]}"


def make_workload(num: int, input_len, output_len, vocab: int, avoid, seed: int, shared_prefix: int = 0,
                  chat: bool = False) -> list[Request]:
    """Prompts of uniform random lengths and token ids (never one of `avoid`), each after the same
    `shared_prefix` random tokens (a system prompt), and output lengths. `chat`: request k is turn k
    of one conversation that resends its whole history, k + 1 pieces of `input_len` tokens."""
    rng = np.random.default_rng(seed)
    if chat:
        allowed = np.setdiff1d(np.arange(vocab), np.asarray(list(avoid), dtype=np.int64))
        turns = [allowed[rng.integers(0, len(allowed), size=input_len[0])].tolist() for _ in range(num)]
        return [Request(i, [t for turn in turns[:i + 1] for t in turn], output_len[0]) for i in range(num)]
    ins = rng.integers(input_len[0], input_len[1] + 1, size=num)
    outs = rng.integers(output_len[0], output_len[1] + 1, size=num)
    allowed = np.setdiff1d(np.arange(vocab), np.asarray(list(avoid), dtype=np.int64))
    prefix = allowed[rng.integers(0, len(allowed), size=shared_prefix)].tolist()
    return [Request(i, prefix + allowed[rng.integers(0, len(allowed), size=int(n))].tolist(), int(m))
            for i, (n, m) in enumerate(zip(ins, outs))]


def arrival_times(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Seconds after the start: 0 for every request at rate inf, else gaps of mean 1/rate (the first at 0)."""
    if math.isinf(rate):
        return np.zeros(num)
    gaps = np.random.default_rng(seed + 1).gamma(burstiness, 1.0 / (rate * burstiness), size=num)
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def with_arrivals(requests: list[Request], rate: float, burstiness: float, seed: int) -> list[Request]:
    times = arrival_times(len(requests), rate, burstiness, seed)
    return [dataclasses.replace(r, arrival=float(t)) for r, t in zip(requests, times)]


def warmup_requests(requests: list[Request], count: int) -> list[Request]:
    """The first `count` requests, all at t=0 and 4 tokens long: compiles and captures before timing.
    Their prompts are reversed, so that they leave nothing in a prefix cache that the timed run could
    reuse (a shared prefix or a chat's history would otherwise be cached before the clock starts)."""
    return [dataclasses.replace(r, prompt_ids=r.prompt_ids[::-1], output_len=min(r.output_len, 4), arrival=0.0)
            for r in requests[:count]]


# --- metrics (pure functions of the per-request records) -------------------------------------------


@dataclasses.dataclass
class RequestResult:
    prompt_len: int
    output_len: int  # tokens generated (one cut short: those it had)
    start: float  # when it was sent, seconds on any clock shared with the other fields
    token_times: list = dataclasses.field(default_factory=list)  # each token's (servers: chunk's) arrival
    end: float = 0.0
    error: Optional[str] = PENDING  # None once it completed


def latencies(r: RequestResult) -> dict:
    """One request's TTFT, TPOT, E2E (seconds; None where unknown) and its inter-token gaps."""
    e2e = r.end - r.start
    if not r.token_times:
        return {"ttft": None, "tpot": None, "e2e": e2e, "itl": []}
    ttft = r.token_times[0] - r.start
    tpot = (e2e - ttft) / (r.output_len - 1) if r.output_len > 1 else None
    return {"ttft": ttft, "tpot": tpot, "e2e": e2e, "itl": np.diff(r.token_times).tolist()}


def meets(lat: dict, slos: dict) -> bool:
    """Every SLO (ms) met; a one-token request has TPOT 0, an unknown TTFT or E2E fails (as vLLM)."""
    for key, limit in slos.items():
        value = lat[key] if lat[key] is not None else (0.0 if key == "tpot" else math.inf)
        if value * 1e3 > limit:
            return False
    return True


def stats(values_s: list, name: str) -> dict:
    """{name}_ms_{mean,p50,p90,p99}: None when there are no values."""
    keys = [f"{name}_ms_{k}" for k in ("mean", "p50", "p90", "p99")]
    if not values_s:
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    return dict(zip(keys, [float(ms.mean()), *(float(np.percentile(ms, q)) for q in (50, 90, 99))]))


def summarize(results: list[RequestResult], duration: float, slos: Optional[dict] = None) -> dict:
    """The run's throughput and latency figures (what a result row holds besides its labels)."""
    ok = [r for r in results if r.error is None]
    cut = sum(r.error == CUT for r in results)
    served = [r for r in results if r.error is None or r.output_len > 0]
    lats = [latencies(r) for r in ok]
    inputs, outputs = sum(r.prompt_len for r in served), sum(r.output_len for r in served)
    out = dict(completed=len(ok), failed=len(results) - len(ok) - cut, cut=cut, duration_s=duration,
               total_input_tokens=inputs, total_output_tokens=outputs, request_throughput=len(ok) / duration,
               output_tok_s=outputs / duration, total_tok_s=(inputs + outputs) / duration)
    for key in SLO_KEYS:
        out.update(stats([lat[key] for lat in lats if lat[key] is not None], key))
    out.update(stats([gap for lat in lats for gap in lat["itl"]], "itl"))
    out["goodput"] = sum(meets(lat, slos) for lat in lats) / duration if slos else None
    ttfts = [lat["ttft"] for lat in lats]
    if len(ttfts) > 1 and None not in ttfts:  # for a chat, the first turn's and the last one's (ms)
        out["ttft_ms_first"], out["ttft_ms_last"] = ttfts[0] * 1e3, ttfts[-1] * 1e3
    out["goodput_slos_ms"] = slos or None
    return out


# --- pacing and bookkeeping (shared by every backend) ----------------------------------------------


class Admission:
    """Requests in arrival order, let out once arrived and while fewer than `limit` are outstanding.

    The k-th request may start once the (k - limit)-th finish has happened, as a pool of `limit`
    clients would send it: its start (and TTFT) then holds no time the driver spent elsewhere."""

    def __init__(self, requests: list[Request], limit: Optional[int], t0: float):
        self.pending = collections.deque(requests)
        self.limit, self.t0 = limit, t0
        self.sent = 0
        self.finishes: list[float] = []  # sorted

    def release(self, when: float) -> None:
        bisect.insort(self.finishes, when)

    def next_start(self) -> Optional[float]:
        """When the next request may start; None when none is left or it waits for a finish."""
        if not self.pending:
            return None
        arrival = self.t0 + self.pending[0].arrival
        if not self.limit or self.sent < self.limit:
            return arrival
        k = self.sent - self.limit
        return max(arrival, self.finishes[k]) if k < len(self.finishes) else None

    def due(self, now: float) -> list[tuple[Request, float]]:
        """(request, start time) for every request that may start by `now`."""
        out = []
        while (start := self.next_start()) is not None and start <= now:
            out.append((self.pending.popleft(), start))
            self.sent += 1
        return out

    @property
    def done(self) -> bool:
        return not self.pending


class Tracker:
    """Per-request start, token times and end, as an engine reports them."""

    def __init__(self):
        self.results: dict[int, RequestResult] = {}

    def start(self, req: Request, when: float) -> None:
        self.results[req.index] = RequestResult(len(req.prompt_ids), 0, when, end=when)

    def token(self, index: int, when: float) -> None:
        r = self.results[index]
        r.token_times.append(when)
        r.output_len, r.end = r.output_len + 1, when

    def finish(self, index: int, when: float, error: Optional[str] = None) -> None:
        self.results[index].end, self.results[index].error = when, error

    @property
    def open(self) -> int:
        return sum(r.error == PENDING for r in self.results.values())

    def collect(self) -> list[RequestResult]:
        return [self.results[i] for i in sorted(self.results)]


def sleep_until(when: Optional[float], cap: float = 0.05) -> None:
    """Sleep until `when` (at most `cap` seconds when it is unknown)."""
    time.sleep(cap if when is None else max(0.0, when - clock()))


def deadline_of(cap: Optional[float], t0: float) -> float:
    """When a run started at t0 stops (`cap`: --max-duration-s, None for warm-ups)."""
    return t0 + cap if cap else math.inf


# --- backend: OpenAI streaming completions ---------------------------------------------------------


def parse_sse(raw: bytes, res: RequestResult) -> bool:
    """Record one SSE line of a streamed completion; False once the stream is over."""
    line = raw.decode("utf-8", "replace").strip()
    if not line.startswith("data:"):
        return True
    data = line[5:].strip()
    if data == "[DONE]":
        return False
    chunk = json.loads(data)
    if "error" in chunk:
        res.error = str(chunk["error"].get("message", chunk["error"]))
        return False
    if chunk.get("usage"):
        res.prompt_len = chunk["usage"].get("prompt_tokens", res.prompt_len)
        res.output_len = chunk["usage"].get("completion_tokens", res.output_len)
    if any(c.get("text") for c in chunk.get("choices") or []):
        res.token_times.append(clock())
    return True


async def stream_completion(session, url: str, body: dict, res: RequestResult) -> None:
    """POST one streamed completion, filling `res` as chunks come (a cancelled one keeps what it had)."""
    import aiohttp

    res.start = clock()
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return
            async for raw in resp.content:
                if not parse_sse(raw, res):
                    break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    res.end = clock()
    if res.error == PENDING:
        res.error = None
    elif res.error is not None:  # it got what it streamed, not the length it asked for
        res.output_len = len(res.token_times)


async def served_model(session, base: str) -> str:
    async with session.get(f"{base}/v1/models") as resp:
        resp.raise_for_status()
        return (await resp.json())["data"][0]["id"]


async def accepts_token_ids(session, base: str, model: str, ids: list) -> bool:
    """Whether /v1/completions takes a prompt given as a list of token ids."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0}
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        return resp.status == 200


class OpenAIBackend:
    name = "openai"

    def __init__(self, args, tokenizer):
        self.args, self.tokenizer = args, tokenizer
        self.base = args.base_url.rstrip("/")
        self.model = args.served_model_name
        self.use_ids: Optional[bool] = None

    def prompt(self, req: Request):
        return req.prompt_ids if self.use_ids else self.tokenizer.decode(req.prompt_ids)

    def body(self, req: Request) -> dict:
        return {"model": self.model, "prompt": self.prompt(req), "max_tokens": req.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    async def _prepare(self, session, probe: list) -> None:
        if self.model is None:
            self.model = await served_model(session, self.base)
        if self.use_ids is None:
            self.use_ids = await accepts_token_ids(session, self.base, self.model, probe)
            log(f"{self.base}: model {self.model!r}, prompts sent as {'token ids' if self.use_ids else 'text'}")

    async def _send(self, session, req: Request, res: RequestResult, t0: float, gate) -> None:
        await asyncio.sleep(max(0.0, t0 + req.arrival - clock()))
        if gate is None:
            return await stream_completion(session, f"{self.base}/v1/completions", self.body(req), res)
        async with gate:
            await stream_completion(session, f"{self.base}/v1/completions", self.body(req), res)

    async def _run(self, requests: list[Request], cap: Optional[float]) -> tuple[list[RequestResult], float]:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.args.request_timeout_s)
        connector = aiohttp.TCPConnector(limit=0)  # no pool cap: --max-concurrency is the only limit
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await self._prepare(session, requests[0].prompt_ids[:8])
            results = [RequestResult(self._prompt_len(r), r.output_len, math.inf) for r in requests]
            gate = asyncio.Semaphore(self.args.max_concurrency) if self.args.max_concurrency else None
            t0 = clock()
            tasks = [asyncio.create_task(self._send(session, r, res, t0, gate)) for r, res in zip(requests, results)]
            _, late = await asyncio.wait(tasks, timeout=cap or None)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            duration = clock() - t0
        return cut_short(results, late_count=len(late)), duration

    def _prompt_len(self, req: Request) -> int:
        return len(req.prompt_ids) if self.use_ids else len(self.tokenizer(self.prompt(req))["input_ids"])

    def run(self, requests: list[Request], cap: Optional[float] = None) -> tuple[list[RequestResult], float]:
        return asyncio.run(self._run(requests, cap))

    def close(self) -> None:
        pass


def cut_short(results: list[RequestResult], late_count: int) -> list[RequestResult]:
    """Requests never sent are dropped; those cut mid-stream keep the tokens they got."""
    sent = [r for r in results if math.isfinite(r.start)]
    for r in sent:
        if r.error == PENDING:
            r.output_len, r.end = len(r.token_times), (r.token_times or [r.start])[-1]
            r.error = CUT
    if late_count:
        log(f"--max-duration-s: {late_count} requests not finished ({len(results) - len(sent)} never sent)")
    return sent


# --- backend: Triton's decoupled streaming model over gRPC ------------------------------------------


class TritonBackend:
    """`<model>_stream` through tritonclient.grpc's stream: every request on one stream, told
    apart by request id; a response per token (token_id -1 once a row has finished)."""

    name = "triton-grpc"

    def __init__(self, args, tokenizer):
        self.args, self.tokenizer = args, tokenizer
        self.model = args.stream_model_name or f"{args.served_model_name or 'tiny_gpt2'}_stream"
        self.cond = threading.Condition()
        self.errors: list[str] = []

    def _inputs(self, req: Request, text: str) -> list:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        arrays = {"prompts": np.array([[text.encode()]], dtype=object),
                  "request_output_len": np.array([[req.output_len]], np.uint32)}
        if self.args.triton_min_length:  # the stream model has no ignore_eos: a minimum length stands in
            arrays["min_length"] = np.array([[req.output_len]], np.uint32)
        tensors = []
        for name, array in arrays.items():
            tensors.append(grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype)))
            tensors[-1].set_data_from_numpy(array)
        return tensors

    def _on_response(self, result, error) -> None:
        now = clock()
        with self.cond:
            if error is not None:  # a stream error carries no request id
                self.errors.append(str(error))
            else:
                self._record(result, now)
            self.cond.notify_all()

    def _record(self, result, now: float) -> None:
        token, finish = result.as_numpy("token_id"), result.as_numpy("finish_reason")
        if token is None:
            return
        index = int(result.get_response().id)
        if int(token.reshape(-1)[0]) >= 0:
            self.track.token(index, now)
        if finish is not None and finish.reshape(-1)[0]:
            self.track.finish(index, now)
            self.admission.release(now)

    def _settled(self) -> bool:
        return self.track.open <= len(self.errors)

    def run(self, requests: list[Request], cap: Optional[float] = None) -> tuple[list[RequestResult], float]:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.args.grpc_url.split("://")[-1])
        client.start_stream(callback=self._on_response)
        self.errors, self.track = [], Tracker()
        t0 = clock()
        self.admission, deadline = Admission(requests, self.args.max_concurrency, t0), deadline_of(cap, t0)
        try:
            self._pace(client, deadline)
            with self.cond:
                self.cond.wait_for(self._settled, timeout=max(0.0, min(deadline - clock(),
                                                                       self.args.request_timeout_s)))
            duration = clock() - t0
        finally:
            client.stop_stream(cancel_requests=True)
            client.close()
        return self._results(), duration

    def _pace(self, client, deadline: float) -> None:
        while not self.admission.done and clock() < deadline:
            with self.cond:
                due = self.admission.due(clock())
                for req, start in due:
                    self.track.start(req, start)
            for req, _ in due:
                text = self.tokenizer.decode(req.prompt_ids)
                self.track.results[req.index].prompt_len = len(self.tokenizer(text)["input_ids"])  # as served
                client.async_stream_infer(self.model, self._inputs(req, text), request_id=str(req.index))
            with self.cond:
                start = self.admission.next_start()
                wait = 0.05 if start is None else max(0.0, start - clock())
                self.cond.wait(timeout=min(wait, max(0.0, deadline - clock())))

    def _results(self) -> list[RequestResult]:
        reason = self.errors[0] if self.errors else CUT
        results = self.track.collect()
        for r in results:
            if r.error == PENDING:
                r.error = reason
        return results

    def close(self) -> None:
        pass


# --- backend: in-process engines --------------------------------------------------------------------


def engine_config(args, prefix_caching: bool = True):
    from ft_runner.config import EngineConfig

    return EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                        kv_block_size=args.kv_block_size, gpu_memory_utilization=args.gpu_memory_utilization,
                        kv_cache_blocks=args.kv_cache_blocks, enable_prefix_caching=prefix_caching)


class StepProfile:
    """Where an in-flight run's time went, by kind of step. A call of EngineCore.step() waits for the
    previous step's tokens, so the time from one call's return to the next's is charged to the step
    launched by the earlier call (the device's time for it, when the device is the bottleneck)."""

    def __init__(self):
        self.totals: dict[str, list] = {}  # kind -> [steps, seconds, decode rows, prefill tokens]
        self.pending, self.last = None, None

    @staticmethod
    def kind(decode: int, prefill: int) -> str:
        if prefill:
            return "mixed" if decode else "prefill"
        return "decode" if decode >= 64 else "decode<64"  # a few rows: the run's tail, bound by weight reads

    def add(self, now: float, launched: Optional[tuple[int, int]]) -> None:
        if self.pending is not None:
            total = self.totals.setdefault(self.kind(*self.pending), [0, 0.0, 0, 0])
            for i, value in enumerate((1, now - self.last, *self.pending)):
                total[i] += value
        self.pending, self.last = launched, now

    def summary(self) -> dict:
        """Per kind: steps, seconds, ms a step, and the decode rows and prefill tokens of all its steps."""
        return {kind: {"steps": n, "s": round(s, 3), "ms_per_step": round(1e3 * s / n, 2), "decode_rows": d,
                       "prefill_tokens": p} for kind, (n, s, d, p) in sorted(self.totals.items())}


class InflightRunner:
    """The in-flight engine (EngineCore): arrived requests join before every step."""

    def __init__(self, stage, runtime, args, name: str = "ft_runner"):
        self.stage, self.runtime, self.args, self.name = stage, runtime, args, name
        self.core = None
        self.profile = StepProfile()  # the last run's

    def run(self, requests: list[Request], cap: Optional[float] = None) -> tuple[list[RequestResult], float]:
        from ft_runner.engine.core import EngineCore

        if self.core is None:
            config = engine_config(self.args, prefix_caching=self.name == "ft_runner")
            self.core = EngineCore(self.stage, self.runtime, config)
        track, t0 = Tracker(), clock()
        admission, deadline = Admission(requests, self.args.max_concurrency, t0), deadline_of(cap, t0)
        ids: dict[int, int] = {}
        self.profile = StepProfile()
        while (not admission.done or self.core.has_unfinished()) and clock() < deadline:
            self._admit(admission, track, ids)
            if not self.core.has_unfinished():  # idle: nothing to step until the next arrival
                sleep_until(admission.next_start())
                continue
            self._step(admission, track, ids)
        duration = clock() - t0
        if self.core.has_unfinished():  # cut short: the next run gets a fresh engine
            self.core.close()
            self.core = None
        return cut_results(track), duration

    def _admit(self, admission: Admission, track: Tracker, ids: dict) -> None:
        from ft_runner.engine.request import SamplingOptions

        for req, start in admission.due(clock()):
            rid = self.core.add_request(req.prompt_ids, SamplingOptions(max_tokens=req.output_len, ignore_eos=True))
            ids[rid] = req.index
            track.start(req, start)

    def _step(self, admission: Admission, track: Tracker, ids: dict) -> None:
        events = self.core.step()
        now = clock()
        self.profile.add(now, self.core.last_launch)
        for ev in events:
            track.token(ids[ev.request_id], now)
            if ev.finish:
                track.finish(ids[ev.request_id], now)
                admission.release(now)

    def close(self) -> None:
        if self.core is not None:
            self.core.close()
        self.core = self.stage = None


class StaticRunner:
    """Today's engine as today's server schedules it: FCFS, up to --max-num-seqs arrived requests
    a batch, each batch run to completion before the next is taken."""

    name = "ft_runner-static"

    def __init__(self, stage, runtime, args):
        from ft_runner.engine.generator import Generator

        self.generator, self.args = Generator(stage, runtime), args

    def run(self, requests: list[Request], cap: Optional[float] = None) -> tuple[list[RequestResult], float]:
        track, queue, t0 = Tracker(), collections.deque(), clock()
        admission, deadline = Admission(requests, self.args.max_concurrency, t0), deadline_of(cap, t0)
        while (not admission.done or queue) and clock() < deadline:
            for req, start in admission.due(clock()):
                track.start(req, start)
                queue.append(req)
            if not queue:
                sleep_until(admission.next_start())
                continue
            batch = [queue.popleft() for _ in range(min(len(queue), self.args.max_num_seqs))]
            self._generate(batch, track, admission, deadline)
        return cut_results(track), clock() - t0

    def _generate(self, reqs: list[Request], track: Tracker, admission: Admission, deadline: float) -> None:
        from ft_runner.engine.generator import Batch
        from ft_runner.engine.sampler import Finish

        batch = Batch.make([r.prompt_ids for r in reqs], [r.output_len for r in reqs], end_id=-1)  # -1: no end
        steps = []  # (time, Finish codes): replayed afterwards, so the engine's loop pays two copies a step

        def on_token(step, tokens, reasons):
            steps.append((clock(), reasons.copy()))

        cancelled = (lambda: np.full(len(reqs), clock() > deadline)) if math.isfinite(deadline) else None
        self.generator.generate(batch, on_token=on_token, cancelled=cancelled)
        running = np.ones(len(reqs), dtype=bool)
        for now, reasons in steps:  # a row's token counts while its code was 0 before it
            for row in np.flatnonzero(running):
                track.token(reqs[row].index, now)
                if reasons[row] != Finish.RUNNING:
                    track.finish(reqs[row].index, now, None if reasons[row] != Finish.CANCELLED else PENDING)
                    admission.release(now)
            running &= reasons == Finish.RUNNING

    def close(self) -> None:
        self.generator = None


class HFContinuousRunner:
    """HF transformers' continuous batching manager, requests added as they arrive."""

    name = "hf-cb"
    warms_itself = True

    def __init__(self, model, args, device):
        self.model, self.args, self.device = model, args, device
        self.warmup = args.warmup_requests
        if args.hf_attn:
            model.set_attn_implementation(args.hf_attn)
        self.attn = None

    def _configs(self, requests: list[Request]):
        from transformers import ContinuousBatchingConfig, GenerationConfig
        from transformers.generation.continuous_batching.utils import WorkloadHints

        gen = GenerationConfig(do_sample=False, max_new_tokens=max(r.output_len for r in requests),
                               eos_token_id=-1, pad_token_id=0)
        kw = dict(max_batch_tokens=self.args.max_num_batched_tokens, max_requests_per_batch=self.args.max_num_seqs)
        if self.device.type == "cuda":
            kw["max_memory_percent"] = self.args.gpu_memory_utilization
        else:  # no memory probe on CPUs (it is slow without psutil): room for the whole workload
            pages = sum(-(-(len(r.prompt_ids) + r.output_len) // self.args.kv_block_size) for r in requests)
            kw.update(page_size=self.args.kv_block_size, num_blocks=pages + len(requests))
        if self.args.kv_cache_blocks:
            kw["num_blocks"] = self.args.kv_cache_blocks
        hints = WorkloadHints(max_prompt_length=max(len(r.prompt_ids) for r in requests),
                              max_generated_length=gen.max_new_tokens, num_requests=len(requests))
        return gen, ContinuousBatchingConfig(**kw), hints

    def run(self, requests: list[Request], cap: Optional[float] = None) -> tuple[list[RequestResult], float]:
        """One manager session a run (sized for it), warmed up inside it: a session's first steps are slow."""
        gen, cb, hints = self._configs(requests)
        with self.model.continuous_batching_context_manager(
                generation_config=gen, continuous_batching_config=cb, workload_hints=hints, block=True, timeout=5,
                warmup=self.device.type == "cuda") as manager:
            self.attn = self.model.config._attn_implementation
            if self.warmup:
                self._drive(manager, warmup_requests(requests, self.warmup), "warmup-", None)
            results, duration, unfinished = self._drive(manager, requests, "run-", cap)
            if unfinished:
                manager.stop(block=True, timeout=5, hard_stop=True)
        return results, duration

    def _drive(self, manager, requests: list[Request], tag: str, cap) -> tuple[list[RequestResult], float, int]:
        track, t0 = Tracker(), clock()
        admission, deadline = Admission(requests, self.args.max_concurrency, t0), deadline_of(cap, t0)
        while (not admission.done or track.open) and clock() < deadline:
            self._admit(manager, admission, track, tag)
            self._collect(manager, admission, track, tag)
        duration, unfinished = clock() - t0, track.open
        return cut_results(track), duration, unfinished

    def _admit(self, manager, admission: Admission, track: Tracker, tag: str) -> None:
        for req, start in admission.due(clock()):
            manager.add_request(req.prompt_ids, request_id=f"{tag}{req.index}", max_new_tokens=req.output_len,
                                record_timestamps=True, eos_token_id=-1)
            track.start(req, start)

    def _collect(self, manager, admission: Admission, track: Tracker, tag: str) -> None:
        start = admission.next_start()
        out = manager.get_result(timeout=min(0.05, max(0.001, (start or math.inf) - clock())))
        if out is None or not out.is_finished() or not out.request_id.startswith(tag):
            return
        index = int(out.request_id[len(tag):])
        for when in out.timestamps or []:
            track.token(index, when)
        end = out.lifespan[1] if out.lifespan[1] > 0 else clock()
        track.finish(index, end, out.error)
        admission.release(end)

    def close(self) -> None:
        self.model = None


def cut_results(track: Tracker) -> list[RequestResult]:
    results = track.collect()
    for r in results:
        if r.error == PENDING:
            r.error = CUT
    return results


# --- models for the offline engines -----------------------------------------------------------------


class ModelSource:
    """A bench_generate shape (random weights) or a local HF directory: its HF model, its FT stage."""

    def __init__(self, args, device, dtype: str):
        self.args, self.device, self.dtype = args, device, dtype
        self.is_dir = Path(args.model).is_dir()
        name = Path(args.model).resolve().name if self.is_dir else args.model
        self.key = name.replace("/", "_")
        self.work = Path(args.workdir) / self.key
        self.hf_dir = Path(args.model) if self.is_dir else self.work / f"hf-{dtype}"

    def hf_config(self):
        import transformers

        return transformers.AutoConfig.from_pretrained(self.hf_dir) if self.is_dir else bg.hf_config(self.args.model)

    def vocab_and_ends(self) -> tuple[int, list]:
        config = self.hf_config()
        ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        return config.vocab_size, [e for e in ends if e is not None]

    def hf_model(self):
        import torch
        import transformers

        dtype = bg.TORCH_DTYPES[self.dtype]
        if not self.is_dir and not self.args.convert:  # random weights made on the device, nothing saved
            torch.manual_seed(0)
            with torch.device(self.device):
                return transformers.AutoModelForCausalLM.from_config(self.hf_config(), dtype=dtype).eval()
        if not self.is_dir:  # saves the random weights (and the tokenizer) the FT engines convert
            return bg.build_hf(self.args.model, dtype, self.device, self.hf_dir)
        with torch.device(self.device):
            return transformers.AutoModelForCausalLM.from_pretrained(self.hf_dir, dtype=dtype).eval()

    def ft_stage(self, runtime):
        from ft_runner.checkpoint.convert import convert
        from ft_runner.checkpoint.load import load_stage

        quant = quant_config(self.args)
        if not self.is_dir and not self.args.convert:
            return random_stage(self.hf_config(), runtime, self.dtype, quant)
        if not (self.hf_dir / "config.json").exists():
            del_and_collect(self.hf_model())
        ckpt = convert(self.hf_dir, self.work / "ft", 1, self.dtype, log=lambda *_: None)
        return load_stage(Path(ckpt), runtime.grid, runtime.tp_group, self.dtype, runtime.device, quant)


def quant_config(args):
    """--quantization and --kv-cache-dtype, as the server validates them."""
    from ft_runner.config import QuantConfig

    return QuantConfig.from_flags(args.quantization, kv_cache_dtype=args.kv_cache_dtype)


def random_stage(hf_config, runtime, dtype: str, quant=None):
    """An FT stage of the shape's config with random weights made on the device: the engines' speed
    does not depend on the values, and an 8B model skips minutes of saving, converting and loading.
    `quant` (config.QuantConfig) quantizes its projections from those weights, as load_stage would."""
    import dataclasses

    import torch

    from ft_runner.checkpoint.families import family_of
    from ft_runner.config import SECTIONS, ModelConfig, QuantConfig
    from ft_runner.model import quant as q
    from ft_runner.model.decoder import GPTStage

    family = family_of(hf_config)
    keys = {**SECTIONS[family.section], **family.config(hf_config)}
    config = ModelConfig(**{f.name: keys[f.name] for f in dataclasses.fields(ModelConfig) if f.name in keys})
    torch.manual_seed(0)
    with torch.device(runtime.device):
        stage = GPTStage(config, runtime.grid, runtime.tp_group).to(bg.TORCH_DTYPES[dtype])
    for name, p in stage.named_parameters():
        if p.dim() > 1:
            p.normal_(0, 0.02)
        else:
            p.fill_(1.0 if "ln" in name or "norm" in name else 0.0)
    quant = quant or QuantConfig()
    quant.check_device(runtime.device)
    if quant.quantization != "none":
        q.quantize_stage(stage, quant.quantization)
    stage.quant = quant
    return stage


def del_and_collect(*objects) -> None:
    """Drop the references given and give their device memory back."""
    import torch

    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def offline_runners(args, source: ModelSource, runtime):
    """(engine name, runner) in --engines order; the FT stage is shared and freed after its last user."""
    stage = None
    for pos, engine in enumerate(args.engines):
        if engine == "hf-cb":
            runner = HFContinuousRunner(source.hf_model(), args, runtime.device)
        else:
            stage = stage if stage is not None else source.ft_stage(runtime)
            if engine in INFLIGHT:
                runner = InflightRunner(stage, runtime, args, engine)
            else:
                runner = StaticRunner(stage, runtime, args)
        if not any(e in FT_ENGINES for e in args.engines[pos + 1:]):
            stage = None
        yield engine, runner
        runner.close()
        del_and_collect(runner)


def hf_cb_unsupported(device) -> Optional[str]:
    """Why HF's continuous batching cannot run here, or None."""
    try:
        import transformers

        if not hasattr(transformers.GenerationMixin, "generate_batch"):
            return f"transformers {transformers.__version__} has no continuous batching (generate_batch)"
        from transformers import ContinuousBatchingConfig  # noqa: F401
    except ImportError as exc:
        return f"transformers' continuous batching is not importable ({exc})"
    return None


# --- results ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    model: str
    dtype: str
    tp: int
    pp: int
    gpu: str


def make_row(args, info: RunInfo, engine: str, rate: float, summary: dict, extra: dict) -> dict:
    import torch
    import transformers

    hf = engine.startswith("hf")  # HF runs unquantized; the static engine's cache is in the model dtype
    row = dict(kind="serving", engine=engine, backend=args.backend, model=info.model, dtype=info.dtype,
               quantization="none" if hf else args.quantization or "none",
               kv_cache_dtype="auto" if hf or engine == "ft_runner-static" else args.kv_cache_dtype, tp=info.tp, pp=info.pp, gpu=info.gpu, commit=bg.commit(),
               time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, transformers=transformers.__version__, workload=args.workload_name,
               num_requests=args.num_prompts, input_len=range_label(args.input_len),
               shared_prefix_len=args.shared_prefix_len,
               output_len=range_label(args.output_len), seed=args.seed,
               request_rate="inf" if math.isinf(rate) else rate, burstiness=args.burstiness,
               max_concurrency=args.max_concurrency)
    row.update(summary)
    row.update(extra, truncated=summary["completed"] < args.num_prompts)
    return row


def write_rows(rows: list[dict], directory: str, gpu: str) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    path = out / f"serving_{now:%Y-%m-%d}_{gpu.replace(' ', '-').replace('/', '-')}.jsonl"
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    log(f"appended {len(rows)} rows to {path}")
    return path


def fmt(value, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(row: dict) -> None:
    """vLLM's result block, for one (engine, rate)."""
    lines = [f"{' Serving Benchmark Result ':=^60}",
             f"{'Engine / backend:':<44}{row['engine']} / {row['backend']}",
             f"{'Request rate (req/s):':<44}{row['request_rate']}",
             f"{'Successful requests:':<44}{row['completed']} of {row['num_requests']}",
             f"{'Benchmark duration (s):':<44}{row['duration_s']:.2f}",
             f"{'Total input tokens:':<44}{row['total_input_tokens']}",
             f"{'Total generated tokens:':<44}{row['total_output_tokens']}",
             f"{'Request throughput (req/s):':<44}{row['request_throughput']:.2f}",
             f"{'Request goodput (req/s):':<44}{fmt(row['goodput'])}",
             f"{'Output token throughput (tok/s):':<44}{row['output_tok_s']:.2f}",
             f"{'Total token throughput (tok/s):':<44}{row['total_tok_s']:.2f}"]
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2e", "End-to-end Latency")):
        lines.append(f"{' ' + title + ' ':-^60}")
        for stat, label in (("mean", "Mean"), ("p50", "Median"), ("p99", "P99")):
            lines.append(f"{f'{label} {key.upper()} (ms):':<44}{fmt(row[f'{key}_ms_{stat}'])}")
    lines.append("=" * 60)
    for kind, p in row.get("step_profile", {}).items():
        n = p["steps"]
        lines.append(f"Steps {kind + ':':<11}{n:>6} in {p['s']:8.2f} s, {p['ms_per_step']:7.2f} ms each, "
                     f"{p['decode_rows'] / n:6.1f} decode rows, {p['prefill_tokens'] / n:7.1f} prefill tokens")
    print("\n".join(lines), flush=True)


def plot(rows: list[dict], path: str) -> None:
    """Output tok/s against TTFT and TPOT p50, a line per engine, a point per request rate."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("--plot: matplotlib is not importable, no chart drawn")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for engine in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == engine]
        for ax, key in zip(axes, ("ttft_ms_p50", "tpot_ms_p50")):
            points = [(r["output_tok_s"], r[key], r["request_rate"]) for r in mine if r[key] is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=engine)
                for x, y, rate in points:
                    ax.annotate(f"{rate}/s", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for ax, what in zip(axes, ("TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set(xlabel="output tokens/s", ylabel=what, title=f"{what.split()[0]} against throughput")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{rows[0]['model']} {rows[0]['workload']} ({rows[0]['gpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    log(f"wrote {path}")


def log(message: str) -> None:
    print(f"[bench_serving] {message}", flush=True)


# --- drivers ----------------------------------------------------------------------------------------


def run_rates(args, runner, requests: list[Request], info: RunInfo, extra) -> list[dict]:
    """A warm-up, then a row per request rate."""
    if args.warmup_requests and not getattr(runner, "warms_itself", False):
        runner.run(warmup_requests(requests, args.warmup_requests))
    rows = []
    for rate in args.request_rate:
        results, duration = runner.run(with_arrivals(requests, rate, args.burstiness, args.seed), args.max_duration_s)
        engine = runner.name if args.backend == "offline" else (args.engine_name or "ft_runner")
        row = make_row(args, info, engine, rate, summarize(results, duration, args.goodput), extra(runner))
        print_summary(row)
        rows.append(row)
    return rows


def tokenizer_for(args):
    import transformers

    path = args.tokenizer or (args.model if args.model and Path(args.model).is_dir() else bg.TOKENIZER_DIR)
    return transformers.AutoTokenizer.from_pretrained(path)


def run_online(args) -> tuple[list[dict], str]:
    import torch

    tokenizer = tokenizer_for(args)
    avoid = set(tokenizer.all_special_ids) | {tokenizer.eos_token_id} - {None}
    requests = make_workload(args.num_prompts, args.input_len, args.output_len, args.vocab_size or len(tokenizer),
                             avoid, args.seed, args.shared_prefix_len, args.chat)
    backend = (OpenAIBackend if args.backend == "openai" else TritonBackend)(args, tokenizer)
    gpu = args.gpu or bg.gpu_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.backend == "openai":  # the served name is asked for before the first row is labelled
        asyncio.run(_prepare_openai(backend, requests))
    info = RunInfo(args.model or backend.model or "unknown", args.dtype or "server", args.tp, args.pp, gpu)

    def extra(b):
        return {"prompt_mode": "token ids" if getattr(b, "use_ids", False) else "text", "served_model": b.model}

    return run_rates(args, backend, requests, info, extra), gpu


async def _prepare_openai(backend: OpenAIBackend, requests: list[Request]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        await backend._prepare(session, requests[0].prompt_ids[:8])


def run_offline(args) -> tuple[list[dict], str]:
    from ft_runner import parallel

    runtime = parallel.init_runtime(1, 1, args.device)
    device = runtime.device
    dtype = args.dtype or ("fp16" if device.type == "cuda" else "fp32")
    source = ModelSource(args, device, dtype)
    vocab, ends = source.vocab_and_ends()
    requests = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, ends, args.seed,
                             args.shared_prefix_len, args.chat)
    info = RunInfo(source.key, dtype, 1, 1, bg.gpu_name(device))
    args.engines = usable_engines(args.engines, device)
    rows = []
    for _, runner in offline_runners(args, source, runtime):
        rows += run_rates(args, runner, requests, info, lambda r: offline_extra(args, r))
    parallel.shutdown(runtime)
    return rows, info.gpu


def usable_engines(engines: list[str], device) -> list[str]:
    out = []
    for engine in engines:
        reason = hf_cb_unsupported(device) if engine == "hf-cb" else None
        if engine in INFLIGHT and reason is None:
            try:
                import ft_runner.engine.core  # noqa: F401
            except ImportError as exc:
                reason = f"the in-flight engine is not importable ({exc})"
        if reason:
            log(f"skipping engine {engine}: {reason}")
        else:
            out.append(engine)
    return out


def offline_extra(args, runner) -> dict:
    extra = {"engine_config": {k: getattr(args, k) for k in ("max_num_seqs", "max_num_batched_tokens",
                                                            "kv_block_size", "gpu_memory_utilization",
                                                            "kv_cache_blocks")},
             "warmup_requests": args.warmup_requests}
    if isinstance(runner, HFContinuousRunner):
        extra["hf_attn"] = runner.attn
    if isinstance(runner, InflightRunner):
        extra["step_profile"] = runner.profile.summary()
    return extra


# --- command line -----------------------------------------------------------------------------------


def parse_rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates are positive numbers or inf, got {text!r}")
    return rates


def parse_slos(items: Optional[list]) -> Optional[dict]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    if not items:
        return None
    slos = {}
    for item in items:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS or not value:
            raise argparse.ArgumentTypeError(f"--goodput takes KEY:MS with KEY in {SLO_KEYS}, got {item!r}")
        slos[key] = float(value)
    return slos


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("openai", "triton-grpc", "offline"), default="openai")
    p.add_argument("--offline", action="store_true", help="same as --backend offline: in-process engines")
    w = p.add_argument_group("workload")
    w.add_argument("--num-prompts", type=int, default=100)
    w.add_argument("--input-len", type=parse_range, default=parse_range("128"), help="N or A:B (uniform)")
    w.add_argument("--chat", action="store_true",
                   help="--num-prompts turns of one chat, each resending the history plus --input-len new tokens "
                        "(run it with --max-concurrency 1); rows add the first and last turn's TTFT")
    w.add_argument("--shared-prefix-len", type=int, default=0,
                   help="every prompt starts with the same this many tokens (before its --input-len own ones)")
    w.add_argument("--output-len", type=parse_range, default=parse_range("128"), help="N or A:B (uniform)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--request-rate", type=parse_rates, default=[math.inf], help="req/s, comma-separated; inf = "
                   "all at t=0")
    w.add_argument("--burstiness", type=float, default=1.0, help="1 = Poisson; gamma shape of the gaps")
    w.add_argument("--max-concurrency", type=int, default=None)
    w.add_argument("--max-duration-s", type=float, default=None, help="stop a run after this long (rows say "
                   "truncated)")
    w.add_argument("--warmup-requests", type=int, default=8, help="untimed 4-token requests before each engine")
    w.add_argument("--workload-name", default=None, help="default: random-<input>-<output>")
    w.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs: ttft:MS tpot:MS e2e:MS")
    s = p.add_argument_group("servers (openai, triton-grpc)")
    s.add_argument("--base-url", default="http://127.0.0.1:9000")
    s.add_argument("--grpc-url", default="127.0.0.1:8001")
    s.add_argument("--served-model-name", default=None, help="default: the first of /v1/models (openai), "
                   "tiny_gpt2 (triton-grpc)")
    s.add_argument("--stream-model-name", default=None, help="default: <served model name>_stream")
    s.add_argument("--tokenizer", default=None, help="default: --model if a directory, else the embedded one")
    s.add_argument("--vocab-size", type=int, default=0, help="draw prompt ids below this (default: the tokenizer's)")
    s.add_argument("--triton-min-length", action=argparse.BooleanOptionalAction, default=True,
                   help="send min_length = output length (the stream model has no ignore_eos)")
    s.add_argument("--request-timeout-s", type=float, default=600)
    s.add_argument("--engine-name", default=None, help="the row's engine (default: ft_runner)")
    s.add_argument("--tp", type=int, default=1, help="the server's TP (a label)")
    s.add_argument("--pp", type=int, default=1, help="the server's PP (a label)")
    s.add_argument("--gpu", default=None, help="the server's GPU (a label; default: this machine's)")
    o = p.add_argument_group("offline")
    o.add_argument("--model", default=None, help="a bench_generate shape (tiny, gpt2, ..., llama-3-8b) or an HF dir")
    o.add_argument("--engines", default="ft_runner,ft_runner-static,hf-cb", help=f"comma-separated, of {ENGINES}")
    o.add_argument("--dtype", choices=sorted(bg.TORCH_DTYPES), default=None, help="default: fp16 on GPUs, fp32 on CPUs")
    o.add_argument("--quantization", choices=("none", "int8_wo", "fp8"), default=None,
                   help="the FT engines' weight quantization (the server's flag; a label for online backends)")
    o.add_argument("--kv-cache-dtype", choices=("auto", "fp8"), default="auto",
                   help="the in-flight engine's paged KV cache (the server's flag; a label for online backends)")
    o.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    o.add_argument("--workdir", default="/tmp/ft_runner_bench", help="random HF models and FT checkpoints")
    o.add_argument("--convert", action="store_true",
                   help="shapes: save the random HF model and convert it (default: FT weights made on the device)")
    o.add_argument("--max-num-seqs", type=int, default=256)
    o.add_argument("--max-num-batched-tokens", type=int, default=8192)
    o.add_argument("--kv-block-size", type=int, default=16)
    o.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    o.add_argument("--kv-cache-blocks", type=int, default=0, help="0: size the cache from free memory")
    o.add_argument("--hf-attn", default=None, help="hf-cb's attention (sdpa, paged|eager, flash_attention_2; "
                   "default: the model's, which the manager adapts)")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--plot", default=None, metavar="PATH", help="draw throughput against latency (matplotlib)")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.offline:
        args.backend = "offline"
    try:
        args.goodput = parse_slos(args.goodput)
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.engines = [e for e in args.engines.split(",") if e]
    if unknown := [e for e in args.engines if e not in ENGINES]:
        p.error(f"unknown engines {unknown}; known: {ENGINES}")
    if args.backend == "offline" and not args.model:
        p.error("--offline needs --model (a shape name or an HF directory)")
    if args.num_prompts < 1:
        p.error("--num-prompts must be at least 1")
    args.workload_name = args.workload_name or \
        f"random-{range_label(args.input_len)}-{range_label(args.output_len)}"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    rows, gpu = run_offline(args) if args.backend == "offline" else run_online(args)
    if rows:
        write_rows(rows, args.results, gpu)
    if args.plot and rows:
        plot(rows, args.plot)
    return 0 if rows and all(r["completed"] > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
