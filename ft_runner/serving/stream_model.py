"""The streaming text model: decoupled, one response per generated token.

inputs:  those of the text model (text_model.py); beam_width must be 1.
outputs, one value per row of the request in every response:
  token_id int32 (1,): this step's token, -1 for a row that had already finished;
  text bytes (1,): the new text (a token that ends inside a UTF-8 character waits for the next);
  finish_reason bytes (1,): "" while the row runs, then why it stopped: "length", "end_id" or
    "stop_word" (kept in the row's later responses);
  sequence_length int64 (1,), cum_log_probs float32 (1,): in the last response only.
The prompt followed by the concatenated texts equals the text model's sentence. With stop_words
(strings, matched on the text: stops.py) text that a stop string may still claim waits, a row that
meets one finishes as "stop_word" with its text cut before it, and once every row is done the last
response comes at once (cum_log_probs NaN then) and the generation is stopped. Clients: PyTriton's
DecoupledModelClient, tritonclient gRPC `start_stream`, or Triton's HTTP
`POST /v2/models/<name>/generate_stream` (server-sent events, one per response).
A client that leaves (gRPC cancel, closed HTTP stream) gets its generation stopped within a few
steps (triton_stub.py tells the engine). A request refused for a full queue, or past its deadline
(its `timeout` parameter or --request-timeout-s), a server that is stopping or whose rank grid failed,
ends its stream with an UNAVAILABLE error carrying the message.
The callable is an async generator: PyTriton runs every stream of this model on one event loop,
and a synchronous wait for one stream's next token (a queued one waits long) would hold back the
responses of all the others.
"""

from __future__ import annotations

import asyncio

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from ft_runner.engine.sampler import Finish
from ft_runner.serving.frontend import EngineFailed, Frontend, QueueFull, RequestTimeout, ServerStopping
from ft_runner.serving.stops import StopWatch
from ft_runner.serving.text_model import ERROR, ERROR_CODE, INPUTS, error_response, text_rows
from ft_runner.serving.triton_stub import KEY_PARAMETER
from ft_runner.serving.validation import Limits, RequestError, make_batch, request_timeout_s

OUTPUTS = [
    Tensor(name="token_id", shape=(1,), dtype=np.int32),
    Tensor(name="text", shape=(1,), dtype=bytes),
    Tensor(name="finish_reason", shape=(1,), dtype=bytes),
    Tensor(name="sequence_length", shape=(1,), dtype=np.int64),
    Tensor(name="cum_log_probs", shape=(1,), dtype=np.float32),
    ERROR,
    ERROR_CODE,
]

__all__ = ["INPUTS", "OUTPUTS", "StreamModel"]


class _Detokenizer:
    """Each row's text so far; `add` returns the text a new token adds."""

    def __init__(self, tokenizer, prompts: list[list[int]]):
        self.tokenizer = tokenizer
        self.ids = [list(p) for p in prompts]
        self.sent = [self._decode(p) for p in prompts]

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, row: int, token: int, last: bool) -> str:
        self.ids[row].append(int(token))
        text = self._decode(self.ids[row])
        if text.endswith("\ufffd") and not last:  # a UTF-8 character split across tokens
            return ""
        delta = text[len(self.sent[row]):]
        self.sent[row] = text
        return delta


class _Events:
    """One stream's events from the engine thread (a step's (step, tokens, reasons), then None once
    its job has ended), awaited on PyTriton's event loop without blocking it."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:  # any thread: the engine's delivery never waits for the stream
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed (Triton is stopping): nobody listens any more
            pass

    async def get(self):
        return await self.queue.get()


class StreamModel:
    def __init__(self, engine: Frontend, tokenizer, config, max_batch_size: int = 128):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = Limits.of(config)
        # no dynamic batcher: every call holds one request, so every response belongs to it alone
        self.model_config = ModelConfig(max_batch_size=max_batch_size, batcher=None, decoupled=True)

    async def infer(self, requests):
        """PyTriton decoupled callable: yields one list of responses (one per request) per step."""
        if len(requests) != 1:
            self.engine.metrics.requests.labels("rejected").inc(len(requests))
            raise RequestError(f"the streaming model takes one request per call, got {len(requests)}")
        async for response in self._stream(requests[0]):
            yield [response]

    def _check(self, request):
        try:
            rows = text_rows(request, self.tokenizer, self.limits)
            if rows.beam_width != 1:
                raise RequestError(f"beam_width[0] = {rows.beam_width} is not allowed here: streaming sends one "
                                   "token per step, so it needs beam_width 1 (use the non-streaming model for beams)")
        except RequestError:
            self.engine.metrics.requests.labels("rejected").inc()
            raise
        return rows

    async def _stream(self, request):
        rows = self._check(request)
        key = (request.parameters or {}).get(KEY_PARAMETER)  # the stub reports the client leaving under it
        events = _Events()
        try:
            future = self.engine.submit_async(make_batch([rows]), on_token=lambda *event: events.put(event), key=key,
                                              timeout_s=request_timeout_s(request))
        except (QueueFull, ServerStopping) as exc:
            yield error_response(exc)
            return
        future.add_done_callback(lambda _: events.put(None))
        responses = (self._stream_cut if any(rows.stop_texts) else self._stream_plain)(rows, key, future, events)
        try:
            async for response in responses:
                yield response
        except (RequestTimeout, EngineFailed, ServerStopping) as exc:  # a deadline, or the grid failed: the stream
            yield error_response(exc)  # ends with its message (raised, it reached the client as a traceback)

    async def _stream_plain(self, rows, key, future, events: _Events):
        texts = _Detokenizer(self.tokenizer, rows.prompts)
        before = np.zeros(len(rows), dtype=np.int64)  # Finish codes before this step
        while (event := await events.get()) is not None:
            _, tokens, reasons = event
            response = self._response(texts, tokens, before, reasons)
            if (reasons != Finish.RUNNING).all():
                out = await _settled(future)  # the engine settles it just after its last step
                if out is None:  # its client left: the stub has answered it
                    return
                response["sequence_length"] = out.sequence_lengths[:, None].astype(np.int64)
                response["cum_log_probs"] = out.cum_log_probs[:, None].astype(np.float32)
            yield response
            before = reasons
        if future.cancelled():  # its client left: the stub has answered it (triton_stub.py)
            return
        future.result()  # a failed or timed-out generation ends the stream with its error

    async def _stream_cut(self, rows, key, future, events: _Events):
        """_stream for rows with stop strings: each step's text once no stop string can claim it."""
        watch = StopWatch(self.tokenizer, rows.stop_texts)
        sent = [0] * len(rows)
        running = np.ones(len(rows), dtype=bool)
        while (event := await events.get()) is not None:
            _, tokens, reasons = event
            counts = [r and not watch.done(b) for b, r in enumerate(running)]  # -1 once a row has finished
            watch.step(tokens, reasons, running)
            token_ids = [int(t) if c else -1 for t, c in zip(tokens, counts)]
            running = reasons == Finish.RUNNING
            labels = ["stop_word" if watch.stopped[b] else Finish(int(reasons[b])).label for b in range(len(rows))]
            deltas = [self._delta(watch, b, sent) for b in range(len(rows))]
            response = _outputs(token_ids, deltas, labels)
            if all(watch.done(b) for b in range(len(rows))):
                if key is not None and future.cancelled():  # its client left: the stub has answered it
                    return
                future.cancel()  # nothing more is sent: stop generating (a no-op once it has finished)
                out = None if future.cancelled() else future.result()
                kept = [len(p) + len(t) + e for p, t, e in zip(rows.prompts, watch.tokens, watch.end_tokens)]
                response["sequence_length"] = np.array(kept, dtype=np.int64)[:, None]
                response["cum_log_probs"] = (np.full((len(rows), 1), np.nan, np.float32) if out is None else
                                             out.cum_log_probs[:, None].astype(np.float32))
                yield response
                return
            yield response
        if not future.cancelled():  # else its client left: the stub has answered it
            future.result()  # a failed generation ends the stream with its error

    @staticmethod
    def _delta(watch, row: int, sent: list) -> bytes:
        text = watch.texts[row]
        safe = len(text) if watch.done(row) else len(text.rstrip("\ufffd"))
        safe = max(sent[row], safe - watch.held_back(row))
        delta, sent[row] = text[sent[row]:safe], safe
        return delta.encode("utf-8")

    def _response(self, texts: _Detokenizer, tokens, before, reasons) -> dict:
        token_ids, deltas, labels = [], [], []
        for row, (token, was, now) in enumerate(zip(tokens, before, reasons)):
            running = was == Finish.RUNNING
            token_ids.append(int(token) if running else -1)
            deltas.append(texts.add(row, token, now != Finish.RUNNING).encode("utf-8") if running else b"")
            labels.append(Finish(int(now)).label.encode("utf-8"))
        return _outputs(token_ids, deltas, labels)


async def _settled(future):
    """A job's Output once it is settled, without blocking the event loop; None if it was cancelled."""
    await asyncio.wait([asyncio.wrap_future(future)])
    return None if future.cancelled() else future.result()


def _outputs(token_ids, deltas, labels) -> dict:
    return {
        "token_id": np.array(token_ids, dtype=np.int32)[:, None],
        "text": np.array(deltas, dtype=object)[:, None],
        "finish_reason": np.array([label.encode("utf-8") if isinstance(label, str) else label for label in labels],
                                  dtype=object)[:, None],
    }
