"""The text model of PyTriton's FasterTransformer example (ft_format.md §1.3), with FT's sampling inputs.

inputs:  prompts bytes (1,), request_output_len uint32 (1,), beam_width uint32 (1,) optional,
         the optional per-row inputs of validation.py (FT's names: runtime_top_k, temperature, ...),
         stop_words bytes (-1,) optional: per row stop strings, matched on the decoded text whatever its
         tokenization and cut off as OpenAI does (stops.py); bad_words bytes (-1,) optional: per row strings,
         each tokenized into one word that is never generated.
outputs: sentences bytes (-1, 1), sequence_length int64 (-1,), cum_log_probs float32 (-1,): one per beam;
         output_log_probs float32 (-1, -1) (beam x new tokens) when a row sets is_return_log_probs.
Every row keeps its own parameters and output length (the example took the first row's for the
whole batch). A bad request is answered with its own error, even when Triton batched it with
good ones (`answer_each`; its text travels in the `error` output, which the client never sees). `sentences` hold the prompt followed by the generation, as in the example;
`sequence_length` counts tokens (the example counted characters). A row cut by a stop string counts
the tokens up to the one that completed it; when every row of its request is done the request's
generation is stopped (stops.py), and then its `cum_log_probs` are NaN unless is_return_log_probs
was set (which lets it run to its end and sums the kept tokens' log-probs).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import numpy as np
from pytriton.model_config import DynamicBatcher, ModelConfig, QueuePolicy, Tensor, TimeoutAction

from ft_runner.config import ServingConfig
from ft_runner.engine.beam import with_beam_axis
from ft_runner.serving.frontend import EngineFailed, Frontend, QueueFull, RequestTimeout, ServerStopping
from ft_runner.serving.stops import StopWatch
from ft_runner.serving.triton_stub import ERROR_CODE_OUTPUT, ERROR_OUTPUT
from ft_runner.serving.validation import (
    Limits,
    RequestError,
    Rows,
    check_prompt_bytes,
    check_rows,
    make_batch,
    param_inputs,
    per_row,
    request_slices,
    request_timeout_s,
    row_params,
    text_strings,
    text_word_lists,
)

WORD_INPUTS = ("stop_words", "bad_words")
INPUTS = [
    Tensor(name="prompts", shape=(1,), dtype=bytes),
    Tensor(name="request_output_len", shape=(1,), dtype=np.uint32),
    *param_inputs(),
    *[Tensor(name=name, shape=(-1,), dtype=bytes, optional=True) for name in WORD_INPUTS],
]
ERROR = Tensor(name=ERROR_OUTPUT, shape=(1,), dtype=bytes)  # a bad request's message (triton_stub.py)
ERROR_CODE = Tensor(name=ERROR_CODE_OUTPUT, shape=(1,), dtype=bytes)  # its Triton error code, when not INVALID_ARG
OUTPUTS = [
    Tensor(name="sentences", shape=(-1, 1), dtype=bytes),
    Tensor(name="sequence_length", shape=(-1,), dtype=np.int64),
    Tensor(name="cum_log_probs", shape=(-1,), dtype=np.float32),
    Tensor(name="output_log_probs", shape=(-1, -1), dtype=np.float32),
    ERROR,
    ERROR_CODE,
]

__all__ = ["ERROR", "ERROR_CODE", "INPUTS", "OUTPUTS", "RequestError", "TextModel", "answer_each", "error_response",
           "text_rows", "triton_batcher"]


def triton_batcher(limits: ServingConfig) -> DynamicBatcher:
    """Triton's own queue, where a request waits until the model's one instance takes it in (at once:
    triton_stub.py answers calls through response senders), a backstop that refuses as the engine
    does: past --max-queue-len requests, and once a request's timeout (its `timeout`, or
    --request-timeout-s) passes in it; both UNAVAILABLE, with Triton's own messages."""
    policy = QueuePolicy(timeout_action=TimeoutAction.REJECT, allow_timeout_override=True,
                         default_timeout_microseconds=int(limits.request_timeout_s * 1e6),
                         max_queue_size=limits.max_queue_len)
    return DynamicBatcher(default_queue_policy=policy)


async def answer_each(requests, check, engine: Frontend, respond, tokenizer=None) -> list[dict]:
    """One response per request: `check(request)` gives its Rows or raises RequestError, which
    becomes that request's own error (counted as rejected). Each good request is its own job on
    `engine` (which batches rows step by step anyway), so each is refused for a full queue, times out
    or is answered alone; beam requests share one job (the static engine runs one at a time), under
    the shortest of their timeouts. `respond(rows, output, rows_slice, watch)` makes a response from
    its slice of its job's output. A request with stop strings is watched on its text (stops.py):
    `watch` is its StopWatch (else None) and `output` None when it was stopped early.
    A coroutine: PyTriton runs a model's calls on one event loop, and the stub answers a call's
    requests as soon as it ends (triton_stub.py), so calls run side by side while they wait."""
    checked = []
    for request in requests:
        try:
            checked.append(check(request))
            checked[-1].timeout_s = request_timeout_s(request)
        except RequestError as exc:
            checked.append(exc)
    rejected = sum(isinstance(rows, RequestError) for rows in checked)
    if rejected:
        engine.metrics.requests.labels("rejected").inc(rejected)
    good = [rows for rows in checked if isinstance(rows, Rows)]
    beams = [rows for rows in good if rows.beam_width > 1]
    jobs = [[rows] for rows in good if rows.beam_width == 1] + ([beams] if beams else [])
    submitted = [(group, _submit(engine, group, tokenizer)) for group in jobs]  # all in flight, then wait
    answers = {}
    for group, job in submitted:
        if not isinstance(job, QueueFull):
            await _ended(job[0])
        answers.update(_answers(group, job, respond))
    return [answers[id(rows)] if isinstance(rows, Rows) else error_response(rows) for rows in checked]


def _submit(engine: Frontend, group: list[Rows], tokenizer):
    """A job for `group`: (its future, its StopWatch or None), or the QueueFull that refused it."""
    timeouts = [rows.timeout_s for rows in group if rows.timeout_s]
    try:
        if any(group[0].stop_texts):
            return _submit_watched(engine, group[0], tokenizer)
        return engine.submit_async(make_batch(group), timeout_s=min(timeouts, default=None)), None
    except QueueFull as exc:
        return exc


async def _ended(future: concurrent.futures.Future) -> None:
    """Wait for a job to end without blocking the event loop (its outcome is read from `future`)."""
    waiter = asyncio.wrap_future(future)
    await asyncio.wait([waiter])
    if not waiter.cancelled():
        waiter.exception()  # retrieved: asyncio would log it as never retrieved


def _answers(group: list[Rows], job, respond) -> dict:
    """id(rows) -> response, for each request of a job once it ends."""
    if isinstance(job, QueueFull):
        return {id(rows): error_response(job) for rows in group}
    future, watch = job
    try:
        out = with_beam_axis(future.result())
    except concurrent.futures.CancelledError:  # stopped on its stop strings
        out = None
    except RequestTimeout as exc:  # (a failed grid's error is raised: the job is ending, PyTriton answers it)
        return {id(rows): error_response(exc) for rows in group}
    if watch is not None:
        return {id(group[0]): respond(group[0], out, slice(0, len(watch.tokens)), watch)}
    return {id(rows): respond(rows, out, s, None) for rows, s in zip(group, request_slices(group))}


def _submit_watched(engine: Frontend, rows: Rows, tokenizer):
    """Submit one request whose stop strings are matched on its text; stop it once every row is done."""
    watch = StopWatch(tokenizer, rows.stop_texts)
    running = np.ones(len(rows), dtype=bool)
    box = {}

    def on_token(step, tokens, reasons):  # on the engine thread
        watch.step(tokens, reasons, running)
        running[:] = reasons == 0
        if watch.should_give_up() and not rows.return_log_probs:
            box["future"].cancel()

    box["future"] = engine.submit_async(make_batch([rows]), on_token, timeout_s=rows.timeout_s)
    return box["future"], watch


def error_response(exc: Exception) -> dict:
    """A request's own error (triton_stub.py): INVALID_ARG for a bad request; UNAVAILABLE, as Triton's
    own queue answers, for a full queue or a passed deadline, and for a server that is stopping or
    whose rank grid failed."""
    response = {ERROR_OUTPUT: np.array([[str(exc).encode("utf-8")]], dtype=object)}
    if isinstance(exc, (QueueFull, RequestTimeout, ServerStopping, EngineFailed)):
        response[ERROR_CODE_OUTPUT] = np.array([[b"UNAVAILABLE"]], dtype=object)
    return response


def text_rows(request, tokenizer, limits: Limits) -> Rows:
    """A text request's rows, tokenized and checked."""
    prompts = np.asarray(request["prompts"]).reshape(-1)
    check_prompt_bytes(prompts, limits)
    rows = len(prompts)
    out_lens = per_row(request, "request_output_len", rows)
    params = row_params(request, rows, limits)
    start_ids = params["start_id"] if "start_id" in request.keys() else None
    ids = [_tokenize(tokenizer, i, p, start_ids) for i, p in enumerate(prompts)]
    bad = text_word_lists(request, "bad_words", rows, tokenizer)
    checked = check_rows(ids, out_lens, params, limits, "prompts", None, bad)
    checked.stop_texts = text_strings(request, "stop_words", rows)
    if any(checked.stop_texts) and checked.beam_width != 1:
        raise RequestError(f"stop_words with beam_width {checked.beam_width} are not supported: stop strings are "
                           "matched on one text per row; use beam_width 1")
    return checked


def _tokenize(tokenizer, i: int, prompt: bytes, start_ids) -> list[int]:
    try:
        text = prompt.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"prompts[{i}] is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    ids = tokenizer(text)["input_ids"]
    if not ids:
        if start_ids is None:
            raise RequestError(f"prompts[{i}] is empty: give at least one token of text (or a start_id to start from)")
        ids = [int(start_ids[i])]
    return ids


def pad_last(array: np.ndarray, width: int, fill=0) -> np.ndarray:
    """`array` cut or padded with `fill` to `width` along its last axis."""
    out = np.full((*array.shape[:-1], width), fill, dtype=array.dtype)
    n = min(width, array.shape[-1])
    out[..., :n] = array[..., :n]
    return out


class TextModel:
    def __init__(self, engine: Frontend, tokenizer, config, max_batch_size: int = 128):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = Limits.of(config)
        self.model_config = ModelConfig(max_batch_size=max_batch_size, batcher=triton_batcher(engine.limits))

    async def infer(self, requests):
        """PyTriton callable: a list of requests in, one dict of outputs per request out."""
        return await answer_each(requests, lambda request: text_rows(request, self.tokenizer, self.limits),
                                 self.engine, self._response, self.tokenizer)

    def _response(self, rows: Rows, out, rows_slice: slice, watch=None) -> dict:
        if watch is not None:
            return self._cut_response(rows, out, watch)
        W = rows.beam_width
        ids, lengths = out.output_ids[rows_slice, :W], out.sequence_lengths[rows_slice, :W]
        sentences = [[[self.tokenizer.decode(ids[b, w, : lengths[b, w]], skip_special_tokens=True).encode("utf-8")]
                      for w in range(W)] for b in range(len(rows))]
        response = {
            "sentences": np.array(sentences, dtype=object),
            "sequence_length": lengths.astype(np.int64),
            "cum_log_probs": out.cum_log_probs[rows_slice, :W].astype(np.float32),
        }
        if rows.return_log_probs:
            response["output_log_probs"] = pad_last(out.output_log_probs[rows_slice, :W], max(rows.output_lens))
        return response

    def _cut_response(self, rows: Rows, out, watch) -> dict:
        """A watched request (beam 1): each row's text cut before its stop string (stops.py)."""
        kept = [len(t) + e for t, e in zip(watch.tokens, watch.end_tokens)]  # an end token counts, as in FT
        sentences = [[[(self.tokenizer.decode(p, skip_special_tokens=True) + text).encode("utf-8")]]
                     for p, text in zip(rows.prompts, watch.texts)]
        cum = np.full((len(rows), 1), np.nan, dtype=np.float32)
        response = {"sentences": np.array(sentences, dtype=object),
                    "sequence_length": np.array([[len(p) + k] for p, k in zip(rows.prompts, kept)], dtype=np.int64)}
        if out is not None:
            log_probs = out.output_log_probs[:, 0]
            cum[:, 0] = [log_probs[b, :k].sum() for b, k in enumerate(kept)]
            if rows.return_log_probs:
                mask = np.arange(log_probs.shape[-1])[None, :] < np.array(kept)[:, None]
                response["output_log_probs"] = pad_last(np.where(mask, log_probs, 0)[:, None], max(rows.output_lens))
        response["cum_log_probs"] = cum
        return response
