"""The text model of PyTriton's FasterTransformer example (ft_format.md §1.3), with FT's sampling inputs.

inputs:  prompts bytes (1,), request_output_len uint32 (1,), beam_width uint32 (1,) optional,
         the optional per-row inputs of validation.py (FT's names: runtime_top_k, temperature, ...),
         stop_words / bad_words bytes (-1,) optional: per row a list of strings, each one word.
outputs: sentences bytes (-1, 1), sequence_length int64 (-1,), cum_log_probs float32 (-1,): one per beam;
         output_log_probs float32 (-1, -1) (beam x new tokens) when a row sets is_return_log_probs.
Every row keeps its own parameters and output length (the example took the first row's for the
whole batch). A bad request is answered with its own error, even when Triton batched it with
good ones (`answer_each`; its text travels in the `error` output, which the client never sees). `sentences` hold the prompt followed by the generation, as in the example;
`sequence_length` counts tokens (the example counted characters).
"""

from __future__ import annotations

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from ft_runner.engine.beam import with_beam_axis
from ft_runner.serving.frontend import Frontend
from ft_runner.serving.triton_stub import ERROR_OUTPUT
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
    row_params,
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
OUTPUTS = [
    Tensor(name="sentences", shape=(-1, 1), dtype=bytes),
    Tensor(name="sequence_length", shape=(-1,), dtype=np.int64),
    Tensor(name="cum_log_probs", shape=(-1,), dtype=np.float32),
    Tensor(name="output_log_probs", shape=(-1, -1), dtype=np.float32),
    ERROR,
]

__all__ = ["ERROR", "INPUTS", "OUTPUTS", "RequestError", "TextModel", "answer_each", "text_rows"]


def answer_each(requests, check, engine: Frontend, respond) -> list[dict]:
    """One response per request: `check(request)` gives its Rows or raises RequestError, which
    becomes that request's own error; the good ones run as one batch on `engine`, and
    `respond(rows, output, rows_slice)` makes each one's response from its slice of the output."""
    checked = []
    for request in requests:
        try:
            checked.append(check(request))
        except RequestError as exc:
            checked.append(exc)
    good = [rows for rows in checked if isinstance(rows, Rows)]
    answers = []
    if good:
        out = with_beam_axis(engine.submit(make_batch(good)))
        answers = [respond(rows, out, s) for rows, s in zip(good, request_slices(good))]
    answers = iter(answers)
    return [next(answers) if isinstance(rows, Rows) else _error(rows) for rows in checked]


def _error(exc: RequestError) -> dict:
    return {ERROR_OUTPUT: np.array([[str(exc).encode("utf-8")]], dtype=object)}


def text_rows(request, tokenizer, limits: Limits) -> Rows:
    """A text request's rows, tokenized and checked."""
    prompts = np.asarray(request["prompts"]).reshape(-1)
    check_prompt_bytes(prompts, limits)
    rows = len(prompts)
    out_lens = per_row(request, "request_output_len", rows)
    params = row_params(request, rows, limits)
    start_ids = params["start_id"] if "start_id" in request.keys() else None
    ids = [_tokenize(tokenizer, i, p, start_ids) for i, p in enumerate(prompts)]
    words = {name: text_word_lists(request, name, rows, tokenizer) for name in WORD_INPUTS}
    return check_rows(ids, out_lens, params, limits, "prompts", words["stop_words"], words["bad_words"])


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
        self.model_config = ModelConfig(max_batch_size=max_batch_size)

    def infer(self, requests):
        """PyTriton callable: a list of requests in, one dict of outputs per request out."""
        return answer_each(requests, lambda request: text_rows(request, self.tokenizer, self.limits), self.engine,
                           self._response)

    def _response(self, rows: Rows, out, rows_slice: slice) -> dict:
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
