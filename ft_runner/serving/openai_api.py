"""OpenAI-compatible REST endpoints on rank 0 (FastAPI + uvicorn), beside Triton's.

POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics.
Requests go through the same Frontend as Triton's models, so the other ranks never see a difference.

Overload and deadlines: a request is answered 429 (with Retry-After) when --max-concurrent-requests
are in flight or --max-queue-len rows wait for the engine, and 504 when its deadline (the extra
body field `timeout`, in seconds, or --request-timeout-s: the shorter) passes first, which stops
its generation (504 as for gRPC's DEADLINE_EXCEEDED: the server, not the client, ran out of time).
A stream that times out ends with an error event. A streaming client that stops reading never
holds up the engine (tokens reach its response through an unbounded per-request queue) and loses
its connection SEND_GRACE_S after its deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Optional, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ft_runner.engine.generator import Batch
from ft_runner.engine.sampler import Finish
from ft_runner.serving.frontend import Frontend, QueueFull, RequestTimeout, ServerStopping
from ft_runner.serving.stops import StopWatch

LOG = logging.getLogger("ft_runner")
RETRY_AFTER_S = 1  # the Retry-After of a 429: a hint; the queue drains at the engine's pace
SEND_GRACE_S = 2.0  # past its deadline a stream's client has this long to read the timeout error event


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error",
                 code: Union[int, str, None] = None, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.code = status if code is None else code  # vLLM's convention: the HTTP status
        self.counted = counted  # already in the metrics (the engine counts what it refuses or times out)


def _overloaded(message: str, counted: bool = False) -> APIError:
    return APIError(429, message, kind="server_overloaded", counted=counted)


def _timed_out(exc: RequestTimeout) -> APIError:
    return APIError(504, str(exc), kind="timeout_error", counted=True)


COUNTED_PATHS = ("/v1/completions", "/v1/chat/completions")  # requests for the model: counted in metrics


class _Sampling(BaseModel):
    model: Optional[str] = None
    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extra (vLLM): 0 or -1 = off
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # extra (vLLM)
    logprobs: Optional[Union[bool, int]] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    ignore_eos: bool = False  # extra (vLLM): for benchmarks
    min_tokens: int = 0  # extra (vLLM): no end token before this many new tokens
    stop_token_ids: Optional[list[int]] = None  # extra (vLLM): generating one of these ends the choice
    timeout: Optional[float] = Field(None, gt=0, allow_inf_nan=False)  # extra: its deadline in s (<= the server's)


class CompletionRequest(_Sampling):
    # text, a batch of texts, token ids, or a batch of token-id lists (as OpenAI and vLLM take)
    prompt: Union[str, list[str], list[int], list[list[int]]]


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


class OpenAIServer:
    def __init__(self, engine: Frontend, tokenizer, config, model_name: str, max_concurrent: Optional[int] = None):
        self.engine, self.tokenizer, self.config = engine, tokenizer, config
        self.model_name = model_name
        self.max_concurrent = engine.limits.max_concurrent_requests if max_concurrent is None else max_concurrent
        self.in_flight = 0  # requests whose generation has not ended (changed on the event loop only)
        self.created = int(time.time())
        self.ready = threading.Event()  # set by server.py once Triton serves too: /health answers 200 from then
        self.app = self._build()

    def serve_in_thread(self, host: str, port: int, timeout_s: float = 30.0) -> threading.Thread:
        """Start uvicorn on its own thread and return once its port listens."""
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))
        server.install_signal_handlers = lambda: None  # signals belong to the main thread's engine loop
        self._uvicorn = server
        thread = threading.Thread(target=server.run, name="openai-api", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI API could not start listening on {host}:{port}")
            time.sleep(0.02)
        return thread

    def stop(self) -> None:
        if getattr(self, "_uvicorn", None) is not None:
            self._uvicorn.should_exit = True

    # ---- routes
    def _build(self) -> FastAPI:
        app = FastAPI(title="ft_runner OpenAI-compatible API")

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError):
            if not exc.counted:
                self._count_refusal(request, exc.status)
            response = _error(exc.status, exc.message, exc.param, exc.kind, exc.code)
            if exc.status == 429:
                response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: Request, exc: RequestValidationError):
            self._count_refusal(request, 400)
            message, param = _validation_message(exc.errors()[0])
            return _error(400, message, param)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException):
            self._count_refusal(request, exc.status_code)
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None, kind)

        @app.get("/health")
        async def health():
            if not self.ready.is_set():
                return _error(503, "the server is starting: Triton is not serving yet", None, "server_starting")
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                 "owned_by": "ft_runner", "max_model_len": self.config.max_pos_seq_len}]}

        @app.get("/metrics")
        async def metrics():
            return Response(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest):
            self._check_model(body.model)
            return await self._respond(body, self._prompts(body.prompt), chat=False)

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest):
            self._check_model(body.model)
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise APIError(400, f"model {self.model_name!r} has no chat template: use /v1/completions", "messages")
            if body.max_completion_tokens is not None:
                body.max_tokens = body.max_completion_tokens
            text = self.tokenizer.apply_chat_template([m.model_dump() for m in body.messages], tokenize=False,
                                                      add_generation_prompt=True)
            return await self._respond(body, [self._encode(text, "messages", special=False)], chat=True)

        return app

    # ---- request handling
    def _count_refusal(self, request: Request, status: int) -> None:
        """A refused request for the model counts as `rejected` (the engine counts the ones it runs)."""
        if request.url.path in COUNTED_PATHS and (400 <= status < 500 or status == 503):
            self.engine.metrics.requests.labels("rejected").inc()

    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist: this server serves {self.model_name!r}",
                           "model", code="model_not_found")

    def _prompts(self, prompt) -> list[list[int]]:
        """Every prompt form OpenAI takes -> token-id lists, each checked."""
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        return [self._encode(p, "prompt") if isinstance(p, str) else self._token_ids(p, i) for i, p in enumerate(prompt)]

    def _token_ids(self, ids: list[int], i: int) -> list[int]:
        vocab = self.config.vocab_size
        if not ids:
            raise APIError(400, f"prompt[{i}] is an empty list of token ids: give at least one", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt[{i}] holds token id {bad[0]}, outside the vocabulary [0, {vocab})", "prompt")
        return list(ids)

    def _encode(self, text: str, param: str, special: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=special)["input_ids"]
        if not ids:
            raise APIError(400, f"{param} is empty: give at least one token of text", param)
        return ids

    def _batch(self, body: _Sampling, prompts: list[list[int]]) -> Batch:
        context = self.config.max_pos_seq_len
        longest = max(len(p) for p in prompts)
        max_tokens = body.max_tokens if body.max_tokens is not None else context - longest
        checks = [
            (max_tokens < 1, "max_tokens", f"max_tokens must be at least 1, got {max_tokens}"),
            (longest + max_tokens > context, "max_tokens",
             f"this model's maximum context length is {context} tokens; the prompt has {longest} and max_tokens "
             f"asks for {max_tokens} more"),
            (body.temperature < 0 or body.temperature > 2, "temperature",
             f"temperature must be in [0, 2], got {body.temperature}"),
            (not 0 < body.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {body.top_p}"),
            (body.top_k < -1 or body.top_k > self.config.vocab_size, "top_k",
             f"top_k must be -1, 0 or up to the vocabulary size {self.config.vocab_size}, got {body.top_k}"),
            (not 1 <= body.n <= 16, "n", f"n must be between 1 and 16, got {body.n}"),
            (not -2 <= body.frequency_penalty <= 2, "frequency_penalty",
             f"frequency_penalty must be in [-2, 2], got {body.frequency_penalty}"),
            (not -2 <= body.presence_penalty <= 2, "presence_penalty",
             f"presence_penalty must be in [-2, 2], got {body.presence_penalty}"),
            (body.repetition_penalty <= 0, "repetition_penalty",
             f"repetition_penalty must be positive, got {body.repetition_penalty}"),
            (body.presence_penalty != 0 and body.repetition_penalty != 1, "presence_penalty",
             "presence_penalty and repetition_penalty cannot be combined"),
            (body.seed is not None and not 0 <= body.seed < 2**63, "seed", f"seed must be in [0, 2^63), got {body.seed}"),
            (isinstance(body.logprobs, int) and not isinstance(body.logprobs, bool) and not 0 <= body.logprobs <= 1,
             "logprobs", "only the sampled token's log-probability is available: logprobs must be 0 or 1"),
            (not 0 <= body.min_tokens <= max_tokens, "min_tokens",
             f"min_tokens must be between 0 and max_tokens ({max_tokens}), got {body.min_tokens}"),
            (any(not 0 <= t < self.config.vocab_size for t in body.stop_token_ids or []), "stop_token_ids",
             f"stop_token_ids must be token ids in [0, {self.config.vocab_size}), got {body.stop_token_ids}"),
        ]
        for failed, param, message in checks:
            if failed:
                raise APIError(400, message, param)
        greedy = body.temperature == 0
        rows = [p for p in prompts for _ in range(body.n)]
        seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little")
        seeds = [seed + i for _ in prompts for i in range(body.n)]
        end_id = -1 if body.ignore_eos else self.config.end_id
        stop_ids = [[[t] for t in body.stop_token_ids or []]] * len(rows)  # one-token FT stop words
        return Batch.make(rows, max_tokens, end_id=end_id, top_k=1 if greedy else max(body.top_k, 0),
                          top_p=0.0 if greedy else float(body.top_p), temperature=max(body.temperature, 1e-6),
                          repetition_penalty=float(body.repetition_penalty),
                          presence_penalty=float(body.presence_penalty),
                          frequency_penalty=float(body.frequency_penalty), seed=seeds,
                          min_length=body.min_tokens, stop_words=stop_ids)

    async def _respond(self, body: _Sampling, prompts: list[list[int]], chat: bool):
        batch = self._batch(body, prompts)
        if self.in_flight >= self.max_concurrent:
            raise _overloaded(f"the server is overloaded: {self.in_flight} requests are in flight "
                              f"(--max-concurrent-requests {self.max_concurrent}); retry later")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        stream = _Stream(self, batch, stops, chat, body)
        try:
            stream.start()  # in flight until its generation ends (not until a slow client has read it)
        except ServerStopping as exc:
            raise APIError(503, str(exc), kind="server_stopping") from None
        except QueueFull as exc:
            raise _overloaded(str(exc), counted=True) from None
        if body.stream:
            return _StreamingResponse(stream.sse(), stream.deadline, stream.id)
        return await stream.complete()


class _StreamingResponse(StreamingResponse):
    """SSE that drops a client still not reading SEND_GRACE_S after the request's deadline: the engine
    stopped the request at the deadline; this frees the connection and the chunks queued for it."""

    def __init__(self, content, deadline: Optional[float], request_id: str):
        super().__init__(content, media_type="text/event-stream")
        self.deadline, self.request_id = deadline, request_id

    async def __call__(self, scope, receive, send) -> None:
        if self.deadline is None:
            return await super().__call__(scope, receive, send)
        left = self.deadline + SEND_GRACE_S - time.monotonic()
        try:
            await asyncio.wait_for(super().__call__(scope, receive, send), max(left, 0.0))
        except asyncio.TimeoutError:
            LOG.info("request %s: its client stopped reading its stream; dropping the connection", self.request_id)
            await self.body_iterator.aclose()


class _Stream:
    """One request in flight: engine tokens -> per-choice text deltas, stop strings (stops.py), usage."""

    def __init__(self, server: OpenAIServer, batch: Batch, stops: list[str], chat: bool, body: _Sampling):
        self.server, self.batch, self.chat, self.body = server, batch, chat, body
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        n = batch.size
        self.watch = StopWatch(server.tokenizer, [stops] * n)
        self.tokens, self.texts = self.watch.tokens, self.watch.texts
        self.logprobs = [[] for _ in range(n)]
        self.sent = [0] * n  # characters of texts already sent
        self.finish = [None] * n
        self.queue: asyncio.Queue = asyncio.Queue()

    def start(self) -> None:
        """Submit the job (raises QueueFull or ServerStopping); it counts as in flight until it ends."""
        loop = asyncio.get_running_loop()
        server = self.server
        running = np.ones(self.batch.size, dtype=bool)

        def on_token(step, tokens, reasons):  # a row's token counts if the row was running before it
            loop.call_soon_threadsafe(self.queue.put_nowait, ("token", (tokens.copy(), reasons.copy()), running.copy()))
            running[:] = reasons == 0

        def ended(future):  # on the event loop
            server.in_flight -= 1
            self.queue.put_nowait(("done", future, None))

        timeout = server.engine.limits.timeout_for(self.body.timeout)
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.future = server.engine.submit_async(self.batch, on_token, timeout_s=self.body.timeout)
        server.in_flight += 1
        self.future.add_done_callback(lambda f: loop.call_soon_threadsafe(ended, f))

    async def _events(self):
        """Yield (row, delta, finish) as text becomes final, then finish reasons; returns when the engine is done."""
        while True:
            kind, payload, counts = await self.queue.get()
            if kind == "done":
                self._finish(None if payload.cancelled() else payload.result())  # raises the engine's error
                for row in range(self.batch.size):
                    delta = self.texts[row][self.sent[row]:]
                    self.sent[row] = len(self.texts[row])
                    yield row, delta, self.finish[row]
                return
            tokens, reasons = payload
            self.watch.step(tokens, reasons, counts)
            if self.watch.should_give_up() and not self.body.logprobs:
                self.future.cancel()  # every choice is done: stop generating (stops.py)
            for row in range(self.batch.size):
                delta = self._advance(row)
                if delta:
                    yield row, delta, None

    def _advance(self, row: int) -> str:
        """The row's new final text: none that a stop string may still claim or that ends mid-character."""
        text = self.texts[row]
        safe = len(text) if self.watch.done(row) else len(text.rstrip("\ufffd"))
        safe = max(self.sent[row], safe - self.watch.held_back(row))
        delta = text[self.sent[row]:safe]
        self.sent[row] = safe
        return delta

    def _finish(self, output) -> None:
        """Finish reasons and log-probs; `output` is None when the job was stopped on stop strings."""
        for row in range(self.batch.size):
            n = len(self.tokens[row])
            if self.watch.stopped[row] or output is None:
                self.finish[row] = "length" if not self.watch.stopped[row] and not self.watch.end_tokens[row] \
                    and n >= self.batch.output_lens[row] else "stop"
            else:
                self.finish[row] = "length" if output.finish_reason[row] == Finish.LENGTH else "stop"
            if output is not None:
                self.logprobs[row] = output.output_log_probs[row, :n].tolist()

    def _usage(self) -> dict:
        prompt = int(self.batch.lengths[:: self.body.n].sum())
        completion = sum(len(t) for t in self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _choice(self, row: int, text: str, finish, delta: bool) -> dict:
        choice = {"index": row, "finish_reason": finish}
        if self.chat:
            choice["delta" if delta else "message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        if self.body.logprobs and finish is not None:
            lps = self.logprobs[row]
            toks = [self.server.tokenizer.decode([t]) for t in self.tokens[row]]
            if self.chat:
                choice["logprobs"] = {"content": [{"token": t, "logprob": lp, "top_logprobs": []}
                                                  for t, lp in zip(toks, lps)]}
            else:
                choice["logprobs"] = {"tokens": toks, "token_logprobs": lps, "top_logprobs": None,
                                      "text_offset": None}
        return choice

    async def complete(self) -> dict:
        try:
            async for _ in self._events():
                pass
        except RequestTimeout as exc:
            raise _timed_out(exc) from None
        except RuntimeError as exc:
            raise APIError(500, str(exc), kind="server_error") from None
        choices = [self._choice(row, self.texts[row], self.finish[row], delta=False) for row in range(self.batch.size)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.model_name, "choices": choices, "usage": self._usage()}

    async def sse(self):
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.server.model_name}
        try:
            async for row, delta, finish in self._events():
                if delta or finish is not None:
                    chunk = dict(head, choices=[self._choice(row, delta, finish, delta=True)])
                    yield f"data: {json.dumps(chunk)}\n\n"
            if (self.body.stream_options or {}).get("include_usage"):
                yield f"data: {json.dumps(dict(head, choices=[], usage=self._usage()))}\n\n"
        except RequestTimeout as exc:
            yield f"data: {json.dumps(_error_body(_timed_out(exc)))}\n\n"
        except RuntimeError as exc:
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'server_error'}})}\n\n"
        finally:  # also when the client has gone: Starlette then closes this generator
            if self.future.cancel() and None in self.finish:
                LOG.info("request %s cancelled by its client", self.id)
        yield "data: [DONE]\n\n"


def _error(status: int, message: str, param: Optional[str], kind: str = "invalid_request_error",
           code: Union[int, str, None] = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=_error_body(APIError(status, message, param, kind, code)))


def _error_body(exc: APIError) -> dict:
    """OpenAI's error object, as a response body or a stream's error event."""
    return {"error": {"message": exc.message, "type": exc.kind, "param": exc.param, "code": exc.code}}


def _validation_message(error: dict) -> tuple[str, Optional[str]]:
    """FastAPI's first validation error as one sentence, and the request field it is about."""
    if error.get("type") == "json_invalid":
        where = error.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({where})" if where else "the request body is not valid JSON", None
    loc = [str(p) for p in error.get("loc", ()) if p != "body"]
    if not loc:
        return f"the request body {error.get('msg', 'is invalid').lower()}", None
    return f"{'.'.join(loc)}: {error.get('msg')}", loc[0]

