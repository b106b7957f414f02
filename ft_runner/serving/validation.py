"""Request checking shared by every served model, on rank 0, before anything reaches the others.

A request's optional per-row inputs carry fastertransformer_backend's names (ft_format.md §4.1),
one value per row (shape (1,) per row, i.e. [B, 1] per request). Every value is checked and a bad
one is refused with one sentence naming the input, the row, the value and what is allowed.
Absent inputs take FT's defaults: greedy (top_k 0, top_p 0), temperature 1, no penalties,
random_seed 0, beam_width 1, len_penalty 0, the model's start_id and end_id.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import numpy as np
from pytriton.model_config import Tensor

from ft_runner.engine.generator import Batch
from ft_runner.engine.sampler import parse_word_list
from ft_runner.serving.triton_stub import TIMEOUT_PARAMETER

MAX_BEAM_WIDTH = 32  # FT's largest beam width
# A text prompt over context x this many bytes cannot fit (no token is that long): refused before the
# tokenizer spends time on it.
MAX_BYTES_PER_TOKEN = 256


class RequestError(ValueError):
    """A request the server refuses; the message names the input, the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Limits:
    vocab_size: int
    context: int  # max_pos_seq_len: prompt + output tokens
    start_id: int
    end_id: int

    @classmethod
    def of(cls, config) -> "Limits":
        return cls(config.vocab_size, config.max_pos_seq_len, config.start_id, config.end_id)


@dataclasses.dataclass(frozen=True)
class Param:
    """One optional per-row input: its name, the Batch field it fills, its dtype and its rule."""

    name: str
    field: Optional[str]  # None: used by the serving layer only
    dtype: type
    default: Callable[[Limits], object]
    allowed: Callable[[float, Limits], Optional[str]]  # None when the value is fine, else what is allowed


def _finite(v, _):
    return None if math.isfinite(v) else "a finite number"


def _token(v, lim):
    return None if 0 <= v < lim.vocab_size else f"a token id in [0, {lim.vocab_size})"


PARAMS = (
    Param("runtime_top_k", "top_k", np.uint32, lambda lim: 0,
          lambda v, lim: None if 0 <= v <= lim.vocab_size else f"between 0 and the vocabulary size {lim.vocab_size} "
          "(0 and 1 with runtime_top_p 0 mean greedy)"),
    Param("runtime_top_p", "top_p", np.float32, lambda lim: 0.0,
          lambda v, _: None if 0 <= v <= 1 else "in [0, 1] (0 = no top-p filter)"),
    Param("temperature", "temperature", np.float32, lambda lim: 1.0,
          lambda v, _: None if math.isfinite(v) and v > 0 else "> 0 (for greedy decoding leave top-k/top-p at 0)"),
    Param("repetition_penalty", "repetition_penalty", np.float32, lambda lim: 1.0,
          lambda v, _: None if math.isfinite(v) and v > 0 else "> 0 (1 = off)"),
    Param("presence_penalty", "presence_penalty", np.float32, lambda lim: 0.0, _finite),
    Param("min_length", "min_length", np.uint32, lambda lim: 0,
          lambda v, lim: None if 0 <= v <= lim.context else f"between 0 and the model's context {lim.context}"),
    Param("random_seed", "seed", np.uint64, lambda lim: 0, lambda v, _: None),
    Param("beam_width", "beam_width", np.uint32, lambda lim: 1,
          lambda v, lim: None if 1 <= v <= min(MAX_BEAM_WIDTH, lim.vocab_size)
          else f"between 1 and {min(MAX_BEAM_WIDTH, lim.vocab_size)}"),
    Param("len_penalty", "len_penalty", np.float32, lambda lim: 0.0, _finite),
    Param("beam_search_diversity_rate", "diversity_rate", np.float32, lambda lim: 0.0, _finite),
    Param("start_id", None, np.uint32, lambda lim: lim.start_id, _token),
    Param("end_id", "end_id", np.uint32, lambda lim: lim.end_id, _token),
    Param("is_return_log_probs", None, np.bool_, lambda lim: False, lambda v, _: None),
)
PARAM_BY_NAME = {p.name: p for p in PARAMS}


def param_inputs(exclude: tuple = ()) -> list[Tensor]:
    """The optional per-row inputs as PyTriton tensors, shape (1,) per row."""
    return [Tensor(name=p.name, shape=(1,), dtype=p.dtype, optional=True) for p in PARAMS if p.name not in exclude]


@dataclasses.dataclass
class Rows:
    """One request's rows, checked: what a Batch needs, and what its response needs."""

    prompts: list[list[int]]
    output_lens: list[int]
    params: dict  # name -> (n,) values, for every name in PARAMS
    stop_words: list  # per row, a list of words (token lists): FT's, matched by the engine
    bad_words: list
    stop_texts: list = dataclasses.field(default_factory=list)  # per row, stop strings matched on text (stops.py)
    timeout_s: Optional[float] = None  # the request's own deadline (request_timeout_s)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def beam_width(self) -> int:
        return int(self.params["beam_width"][0])

    @property
    def return_log_probs(self) -> bool:
        return bool(self.params["is_return_log_probs"].any())


def request_timeout_s(request) -> Optional[float]:
    """The request's own deadline in seconds: Triton's `timeout` parameter (microseconds, as Triton
    defines it; triton_stub.py hands it on), or None."""
    timeout_us = (request.parameters or {}).get(TIMEOUT_PARAMETER)
    return timeout_us / 1e6 if timeout_us else None


def per_row(request, name: str, rows: int) -> Optional[np.ndarray]:
    """An input's one value per row, or None when absent; refuses other shapes."""
    if name not in request.keys():
        return None
    value = np.asarray(request[name])
    if value.shape[0] != rows or value.size != rows:
        raise RequestError(f"{name} has shape {list(value.shape)} but the request has {rows} rows: "
                           f"send one value per row, shape [{rows}, 1]")
    return value.reshape(rows)


def row_params(request, rows: int, limits: Limits, exclude: tuple = ()) -> dict:
    """Every optional per-row input of a request, checked, with defaults for the absent ones."""
    present = [p.name for p in PARAMS if p.name in request.keys()]
    unsupported = sorted(set(present) & set(exclude))
    if unsupported:
        raise RequestError(f"{unsupported[0]} is not supported by this model")
    params = check_params({name: per_row(request, name, rows) for name in present}, rows, limits)
    widths = sorted(set(params["beam_width"].tolist()))
    if len(widths) > 1:
        raise RequestError(f"beam_width must be the same for every row of a request (got {widths}); "
                           "send rows with other widths as separate requests")
    return params


def check_params(given: dict, rows: int, limits: Limits) -> dict:
    """Checked values (rows,) for every name in PARAMS, from `given` (name -> values, any numeric
    dtype) or the defaults."""
    if given.get("repetition_penalty") is not None and given.get("presence_penalty") is not None:
        raise RequestError("repetition_penalty and presence_penalty are mutually exclusive (as in FT): "
                           "give only one of them")
    params = {}
    for p in PARAMS:
        values = given.get(p.name)
        if values is None:
            params[p.name] = np.full(rows, p.default(limits), dtype=p.dtype)
            continue
        values = np.asarray(values).reshape(rows)
        for i, v in enumerate(values):
            rule = p.allowed(int(v) if p.dtype in (np.uint32, np.uint64) else float(v), limits)
            if rule is not None:
                raise RequestError(f"{p.name}[{i}] = {_show(v)} is not allowed: it must be {rule}")
        params[p.name] = values.astype(np.int64).astype(p.dtype) if p.dtype == np.uint64 else values.astype(p.dtype)
    return params


def _show(v) -> str:
    return f"{float(v):g}" if isinstance(v, (float, np.floating)) else str(v)


def check_rows(prompts: list[list[int]], output_lens, params: dict, limits: Limits, prompt_name: str,
               stop_words=None, bad_words=None) -> Rows:
    """The per-row checks every model shares: prompt ids, lengths against the context."""
    context = limits.context
    for i, (ids, n) in enumerate(zip(prompts, output_lens)):
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise RequestError(f"{prompt_name}[{i}] holds token id {bad[0]}, outside the vocabulary "
                               f"[0, {limits.vocab_size})")
        if not 1 <= n <= context:
            raise RequestError(f"request_output_len[{i}] = {n} must be between 1 and {context}")
        if len(ids) + n > context:
            raise RequestError(
                f"{prompt_name}[{i}] has {len(ids)} tokens; with request_output_len {n} that is "
                f"{len(ids) + n}, over the model's context of {context} tokens")
    rows = len(prompts)
    return Rows(prompts, [int(n) for n in output_lens], params, stop_words or [[]] * rows, bad_words or [[]] * rows)


def ft_word_lists(request, name: str, rows: int, limits: Limits) -> list:
    """FT word lists, INT32 [2, L] per row -> per row a list of words; checks ids and offsets."""
    if name not in request.keys():
        return [[] for _ in range(rows)]
    value = np.asarray(request[name])
    if value.ndim != 3 or value.shape[0] != rows or value.shape[1] != 2:
        raise RequestError(f"{name} has shape {list(value.shape)}; FT's word-list format is [{rows}, 2, L]: "
                           "row 0 the token ids of all words, row 1 their cumulative end offsets padded with -1")
    out = []
    for i, (ids, offsets) in enumerate(value.astype(np.int64)):
        real = offsets[offsets >= 0]
        if (np.diff(np.concatenate([[0], real])) < 0).any() or (real > ids.size).any() \
                or (offsets[real.size:] >= 0).any():
            raise RequestError(f"{name}[{i}] offsets {offsets.tolist()} must rise, stay within {ids.size} and "
                               "be padded with -1 at the end")
        words = parse_word_list(np.stack([ids, offsets]))
        bad = [t for w in words for t in w if not 0 <= t < limits.vocab_size]
        if bad:
            raise RequestError(f"{name}[{i}] holds token id {bad[0]}, outside the vocabulary [0, {limits.vocab_size})")
        out.append(words)
    return out


def text_word_lists(request, name: str, rows: int, tokenizer) -> list:
    """Words as strings, BYTES (-1,) per row -> per row a list of words (each string one word)."""
    if name not in request.keys():
        return [[] for _ in range(rows)]
    value = np.asarray(request[name], dtype=object).reshape(rows, -1)
    out = []
    for i, row in enumerate(value):
        words = []
        for j, item in enumerate(row):
            text = _utf8(item, f"{name}[{i}][{j}]")
            if text:
                words.append(tokenizer(text)["input_ids"])
        out.append(words)
    return out


def text_strings(request, name: str, rows: int) -> list[list[str]]:
    """Strings, BYTES (-1,) per row -> per row a list of the non-empty strings."""
    if name not in request.keys():
        return [[] for _ in range(rows)]
    value = np.asarray(request[name], dtype=object).reshape(rows, -1)
    return [[t for j, item in enumerate(row) if (t := _utf8(item, f"{name}[{i}][{j}]"))] for i, row in enumerate(value)]


def check_prompt_bytes(prompts, limits: Limits, name: str = "prompts") -> None:
    """Refuse a text prompt too large to fit the context whatever its tokens, before tokenizing it."""
    limit = limits.context * MAX_BYTES_PER_TOKEN
    for i, prompt in enumerate(prompts):
        if len(prompt) > limit:
            raise RequestError(f"{name}[{i}] is {len(prompt)} bytes, over the limit of {limit} bytes "
                               f"({MAX_BYTES_PER_TOKEN} per token of the model's context of {limits.context}): "
                               "it cannot fit; shorten it")


def _utf8(item, where: str) -> str:
    try:
        return item.decode("utf-8") if isinstance(item, bytes) else str(item)
    except UnicodeDecodeError as exc:
        raise RequestError(f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def make_batch(requests: list[Rows]) -> Batch:
    """One Batch from the checked rows of several requests, in order."""
    prompts = [p for r in requests for p in r.prompts]
    fields = {}
    for p in PARAMS:
        if p.field is not None:
            fields[p.field] = np.concatenate([r.params[p.name] for r in requests])
    fields["seed"] = fields["seed"].astype(np.uint64).view(np.int64)  # FT's seeds are uint64
    return Batch.make(prompts, [n for r in requests for n in r.output_lens], end_id=fields.pop("end_id"),
                      stop_words=[w for r in requests for w in r.stop_words],
                      bad_words=[w for r in requests for w in r.bad_words], **fields)


def request_slices(requests: list[Rows]) -> list[slice]:
    out, start = [], 0
    for r in requests:
        out.append(slice(start, start + len(r)))
        start += len(r)
    return out
