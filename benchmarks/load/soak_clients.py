"""The soak's requests (soak.py): what each API is sent, and how each answer is judged.

Four kinds of request, both APIs at once: the Triton text model over HTTP (tritonclient's asyncio
client), the Triton streaming model over gRPC (a bidirectional stream), and OpenAI completions plain
and streamed (SSE, aiohttp). A spec says what to send; `send` returns one Record whose outcome is one of
  ok        a full answer whose token count is within 1..max_tokens
  cancelled a stream its client left on purpose after `cancel_after` tokens
  rejected  refused as expected: a bad request's 400 / INVALID_ARG naming its fault, an overload
            refusal (429, UNAVAILABLE "overloaded"), or after `draining` the shutdown refusal
  ended     the job was killed under it (after `killed`): any error (a broken connection, the grid's
            failure, or, for a few requests caught as Triton stops, an error without a message)
  failed    anything else: an unexpected error, a wrong status, a short or malformed answer
  lost      no answer within the client's deadline
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field

import numpy as np

OUTCOMES = ("ok", "cancelled", "rejected", "ended", "failed", "lost")
KINDS = ("triton_http", "triton_grpc_stream", "openai", "openai_stream")
STREAMS = ("triton_grpc_stream", "openai_stream")
OVERLOAD = re.compile(r"overloaded|Exceeds maximum queue size")
SHUTDOWN = re.compile(r"shutting down|server_stopping")

# A bad request per kind: how it is spoilt, and the words its 400 / INVALID_ARG must carry.
BAD = {
    "triton_http": [("empty_prompt", r"prompts\[0\] is empty"),
                    ("top_p", r"runtime_top_p\[0\] = 1.5 is not allowed")],
    "triton_grpc_stream": [("beam", r"beam_width\[0\] = 2 is not allowed here"),
                           ("empty_prompt", r"prompts\[0\] is empty")],
    "openai": [("max_tokens", r"max_tokens|context"), ("temperature", r"temperature")],
    "openai_stream": [("max_tokens", r"max_tokens|context"), ("unknown_model", r"model")],
}


@dataclass
class Spec:
    kind: str
    prompt: str
    prompt_tokens: int
    max_tokens: int
    sampled: bool = False
    bad: str | None = None  # a key of BAD[kind]: the request is spoilt on purpose
    expect: str | None = None  # what its error must say
    cancel_after: int | None = None  # a stream its client leaves after this many tokens


@dataclass
class Record:
    kind: str
    start: float
    end: float = 0.0
    outcome: str = "lost"
    tokens: int = 0
    message: str = ""
    bad: str | None = None
    first_token: float | None = None

    @property
    def latency_s(self) -> float:
        return self.end - self.start


@dataclass
class Context:
    """What every request needs: addresses, model names, the clients, and the job's state."""
    http_url: str
    grpc_url: str
    openai_url: str
    model: str
    stream_model: str
    deadline_s: float = 300.0
    draining: bool = False  # SIGTERM sent: the shutdown refusal is expected
    killed: bool = False  # a rank was killed: broken connections are expected
    clients: dict = field(default_factory=dict)

    async def open(self, concurrency: int) -> None:
        import aiohttp
        import tritonclient.grpc.aio as grpcclient
        import tritonclient.http.aio as httpclient

        self.clients["http"] = httpclient.InferenceServerClient(self.http_url.removeprefix("http://"),
                                                                conn_limit=concurrency, conn_timeout=self.deadline_s)
        self.clients["grpc"] = grpcclient.InferenceServerClient(self.grpc_url.removeprefix("grpc://"))
        self.clients["openai"] = aiohttp.ClientSession(self.openai_url, connector=aiohttp.TCPConnector(limit=concurrency),
                                                       timeout=aiohttp.ClientTimeout(total=self.deadline_s))

    async def close(self) -> None:
        for client in self.clients.values():
            try:
                await client.close()
            except Exception:  # closing after the server was killed may itself fail
                pass


class Prompts:
    """Random prompts of at most a given token length from the embedded tokenizer's vocabulary."""

    def __init__(self, tokenizer, seed: int):
        self.tokenizer = tokenizer
        self.rng = np.random.default_rng(seed)
        special = set(tokenizer.all_special_ids)
        self.ids = np.array([i for i in range(len(tokenizer)) if i not in special])

    def make(self, n: int) -> tuple[str, int]:
        """A text of at most `n` tokens (decoded ids may re-encode longer: cut until they do not)."""
        ids = self.rng.choice(self.ids, n).tolist()
        for cut in range(n, 0, -1):
            text = self.tokenizer.decode(ids[:cut]).strip() or "hello"
            count = len(self.tokenizer.encode(text))
            if count <= n:
                return text, count
        return "hello", len(self.tokenizer.encode("hello"))


def make_spec(rng: random.Random, prompts: Prompts, context: int, bad_rate: float, cancel_rate: float) -> Spec:
    """Prompt 8-200 tokens, output 1-128 (less where the context ends first), a kind, maybe spoilt."""
    kind = rng.choice(KINDS)
    prompt, n = prompts.make(rng.randint(8, 200))
    spec = Spec(kind, prompt, n, rng.randint(1, max(1, min(128, context - n))), sampled=rng.random() < 0.5)
    if rng.random() < bad_rate:
        spec.bad, spec.expect = rng.choice(BAD[kind])
    elif kind in STREAMS and spec.max_tokens >= 4 and rng.random() < cancel_rate:
        spec.cancel_after = rng.randint(1, spec.max_tokens // 2)
    return spec


async def send(ctx: Context, spec: Spec) -> Record:
    record = Record(spec.kind, time.perf_counter(), bad=spec.bad)
    try:
        await asyncio.wait_for(SENDERS[spec.kind](ctx, spec, record), ctx.deadline_s)
    except asyncio.TimeoutError:
        record.outcome, record.message = "lost", f"no answer in {ctx.deadline_s:g} s"
    except Exception as exc:  # judged by what it says
        judge_error(ctx, spec, record, _describe(exc))
    record.end = time.perf_counter()
    return record


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    status = status() if callable(status) else status
    text = (exc.message() if callable(getattr(exc, "message", None)) else str(exc)) or type(exc).__name__
    return f"[{status}] {text}" if status else f"{type(exc).__name__}: {text}"


def judge_error(ctx: Context, spec: Spec, record: Record, message: str, code: str = "") -> None:
    record.message = message.splitlines()[0][:300] if message else "(empty error)"
    if spec.bad and re.search(spec.expect, message) and re.search(r"400|404|INVALID|invalid", code + message):
        record.outcome = "rejected"
    elif not spec.bad and OVERLOAD.search(message):
        record.outcome = "rejected"
    elif ctx.draining and SHUTDOWN.search(message):
        record.outcome = "rejected"
    elif ctx.killed:  # answered, with whatever the dying job could say (soak.py lists what it said)
        record.outcome = "ended"
    else:
        record.outcome = "failed"


def judge_answer(spec: Spec, record: Record, tokens: int, finish: str, ok_finishes: tuple[str, ...]) -> None:
    """`finish` "left": the client left a stream on purpose (it may also have ended first, naturally)."""
    record.tokens = tokens
    if spec.bad:
        record.outcome, record.message = "failed", f"a bad request ({spec.bad}) was answered"
    elif finish == "left" and spec.cancel_after is not None and tokens >= 1:
        record.outcome = "cancelled"
    elif 1 <= tokens <= spec.max_tokens and finish in ok_finishes:
        record.outcome = "ok"
    else:
        record.outcome = "failed"
        record.message = f"{tokens} tokens for max_tokens {spec.max_tokens}, finish {finish!r}"


# -- Triton ----------------------------------------------------------------------------------------------


def _triton_inputs(module, spec: Spec) -> list:
    values = {"prompts": np.array([[b"" if spec.bad == "empty_prompt" else spec.prompt.encode()]], dtype=object),
              "request_output_len": np.array([[spec.max_tokens]], dtype=np.uint32)}
    if spec.sampled:
        values["runtime_top_k"] = np.array([[40]], dtype=np.uint32)
        values["temperature"] = np.array([[0.8]], dtype=np.float32)
    if spec.bad == "top_p":
        values["runtime_top_p"] = np.array([[1.5]], dtype=np.float32)
    if spec.bad == "beam":
        values["beam_width"] = np.array([[2]], dtype=np.uint32)
    inputs = []
    for name, value in values.items():
        tensor = module.InferInput(name, list(value.shape), "BYTES" if value.dtype == object else
                                   {np.uint32: "UINT32", np.float32: "FP32"}[value.dtype.type])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


async def triton_http(ctx: Context, spec: Spec, record: Record) -> None:
    import tritonclient.http.aio as httpclient

    result = await ctx.clients["http"].infer(ctx.model, _triton_inputs(httpclient, spec))
    generated = int(result.as_numpy("sequence_length").reshape(-1)[0]) - spec.prompt_tokens
    sentence = result.as_numpy("sentences").reshape(-1)[0].decode("utf-8", "replace")
    judge_answer(spec, record, generated, "done" if sentence else "", ("done",))


async def triton_grpc_stream(ctx: Context, spec: Spec, record: Record) -> None:
    import tritonclient.grpc.aio as grpcclient

    async def requests():
        yield {"model_name": ctx.stream_model, "inputs": _triton_inputs(grpcclient, spec)}

    responses = ctx.clients["grpc"].stream_infer(requests())
    tokens, finish = 0, ""
    try:
        async for result, error in responses:
            if error is not None:  # a stream's error carries its message, no status: "INVALID" lets it be judged
                return judge_error(ctx, spec, record, str(error.message()) or "(empty error)", "INVALID")
            tokens += int(result.as_numpy("token_id").reshape(-1)[0] >= 0)
            record.first_token = record.first_token or time.perf_counter()
            finish = result.as_numpy("finish_reason").reshape(-1)[0].decode()
            if spec.cancel_after is not None and tokens >= spec.cancel_after:
                finish = "left"
                break
            if finish:  # the last response of the stream's one request
                break
    finally:
        responses.cancel()  # a stream left part-way, or done: close the call either way
    judge_answer(spec, record, tokens, finish, ("length", "end_id"))


# -- OpenAI ----------------------------------------------------------------------------------------------


def _openai_body(ctx: Context, spec: Spec, stream: bool) -> dict:
    body = {"model": "no-such-model" if spec.bad == "unknown_model" else ctx.model, "prompt": spec.prompt,
            "max_tokens": 100_000 if spec.bad == "max_tokens" else spec.max_tokens,
            "temperature": -1.0 if spec.bad == "temperature" else (0.8 if spec.sampled else 0.0)}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


async def openai(ctx: Context, spec: Spec, record: Record) -> None:
    async with ctx.clients["openai"].post("/v1/completions", json=_openai_body(ctx, spec, False)) as response:
        text = await response.text()
    if response.status != 200:
        return judge_error(ctx, spec, record, f"[{response.status}] {text}", str(response.status))
    body = json.loads(text)
    judge_answer(spec, record, body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"],
                 ("length", "stop"))


async def openai_stream(ctx: Context, spec: Spec, record: Record) -> None:
    async with ctx.clients["openai"].post("/v1/completions", json=_openai_body(ctx, spec, True)) as response:
        if response.status != 200:
            text = await response.text()
            return judge_error(ctx, spec, record, f"[{response.status}] {text}", str(response.status))
        tokens, finish, usage, done = 0, "", None, False
        async for raw in response.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return judge_error(ctx, spec, record, json.dumps(event["error"]))
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                tokens += 1
                record.first_token = record.first_token or time.perf_counter()
                finish = choice.get("finish_reason") or finish
            if spec.cancel_after is not None and tokens >= spec.cancel_after:
                response.close()  # leaving: the connection is dropped, the server stops the generation
                return judge_answer(spec, record, tokens, "left", ("left",))
    if not done or usage is None:
        record.outcome, record.message = "failed", f"the stream ended without its usage and [DONE] ({tokens} events)"
        return
    judge_answer(spec, record, usage, finish, ("length", "stop"))


SENDERS = {"triton_http": triton_http, "triton_grpc_stream": triton_grpc_stream, "openai": openai,
           "openai_stream": openai_stream}
