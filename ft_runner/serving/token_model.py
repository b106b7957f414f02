"""The token model: fastertransformer_backend's GPT contract (ft_format.md §4.1), served as
"fastertransformer" by default, so clients written for FT's Triton backend work unchanged.

inputs:  input_ids UINT32 [-1] (right-padded rows), input_lengths UINT32 [1], request_output_len
         UINT32 [-1] (the first value of each row counts); optional per row (validation.py):
         runtime_top_k, runtime_top_p, temperature, repetition_penalty | presence_penalty,
         min_length, random_seed, beam_width, len_penalty, beam_search_diversity_rate, start_id,
         end_id, is_return_log_probs, is_return_context_embeddings (false only);
         stop_words_list / bad_words_list INT32 [2, -1] (FT's word-list format).
outputs: output_ids UINT32 [beam, max_input_len + max_output_len] (prompt, generation, end_id
         padding), sequence_length UINT32 [beam], response_input_lengths INT32 [beam], and, when a
         row sets is_return_log_probs, cum_log_probs FP32 [beam] and output_log_probs FP32
         [beam, max_output_len].
A row with input_lengths 0 starts from its start_id (FT's unconditional generation).
"""

from __future__ import annotations

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from ft_runner.serving.frontend import Frontend
from ft_runner.serving.text_model import ERROR, ERROR_CODE, answer_each, pad_last, triton_batcher
from ft_runner.serving.validation import (
    Limits,
    RequestError,
    Rows,
    check_rows,
    ft_word_lists,
    param_inputs,
    per_row,
    row_params,
)

NAME = "fastertransformer"
WORD_INPUTS = ("stop_words_list", "bad_words_list")
INPUTS = [
    Tensor(name="input_ids", shape=(-1,), dtype=np.uint32),
    Tensor(name="input_lengths", shape=(1,), dtype=np.uint32),
    Tensor(name="request_output_len", shape=(-1,), dtype=np.uint32),
    *param_inputs(),
    Tensor(name="is_return_context_embeddings", shape=(1,), dtype=np.bool_, optional=True),
    *[Tensor(name=name, shape=(2, -1), dtype=np.int32, optional=True) for name in WORD_INPUTS],
]
OUTPUTS = [
    Tensor(name="output_ids", shape=(-1, -1), dtype=np.uint32),
    Tensor(name="sequence_length", shape=(-1,), dtype=np.uint32),
    Tensor(name="response_input_lengths", shape=(-1,), dtype=np.int32),
    Tensor(name="cum_log_probs", shape=(-1,), dtype=np.float32),
    Tensor(name="output_log_probs", shape=(-1, -1), dtype=np.float32),
    ERROR,
    ERROR_CODE,
]


def token_rows(request, limits: Limits) -> Rows:
    """A token request's rows, checked."""
    ids = np.asarray(request["input_ids"])
    rows = ids.shape[0]
    lengths = per_row(request, "input_lengths", rows)
    out_lens = np.asarray(request["request_output_len"]).reshape(rows, -1)
    if out_lens.shape[1] == 0:
        raise RequestError("request_output_len is empty: send the number of new tokens for every row")
    params = row_params(request, rows, limits)
    embeddings = per_row(request, "is_return_context_embeddings", rows)
    if embeddings is not None and embeddings.any():
        raise RequestError("is_return_context_embeddings = true is not supported: context embeddings are not "
                           "returned by this server")
    prompts = []
    for i, n in enumerate(lengths):
        if n > ids.shape[1]:
            raise RequestError(f"input_lengths[{i}] = {n} is longer than the {ids.shape[1]} input_ids sent")
        prompts.append(ids[i, :n].astype(np.int64).tolist() or [int(params["start_id"][i])])
    stop, bad = (ft_word_lists(request, name, rows, limits) for name in WORD_INPUTS)
    return check_rows(prompts, out_lens[:, 0], params, limits, "input_ids", stop, bad)


class TokenModel:
    def __init__(self, engine: Frontend, config, max_batch_size: int = 128):
        self.engine = engine
        self.limits = Limits.of(config)
        self.model_config = ModelConfig(max_batch_size=max_batch_size, batcher=triton_batcher(engine.limits))

    async def infer(self, requests):
        """PyTriton callable: a list of requests in, one dict of outputs per request out."""
        return await answer_each(requests, lambda request: token_rows(request, self.limits), self.engine, self._response)

    def _response(self, rows: Rows, out, rows_slice: slice, watch=None) -> dict:
        W, new = rows.beam_width, max(rows.output_lens)
        width = max(len(p) for p in rows.prompts) + new
        end_ids = rows.params["end_id"].astype(np.int64)[:, None, None]
        ids = out.output_ids[rows_slice, :W]
        ids = np.where(np.arange(width)[None, None, :] < ids.shape[2], pad_last(ids, width), end_ids)
        input_lengths = np.array([len(p) for p in rows.prompts], dtype=np.int32)
        response = {
            "output_ids": ids.astype(np.uint32),
            "sequence_length": out.sequence_lengths[rows_slice, :W].astype(np.uint32),
            "response_input_lengths": np.repeat(input_lengths[:, None], W, axis=1),
        }
        if rows.return_log_probs:
            response["cum_log_probs"] = out.cum_log_probs[rows_slice, :W].astype(np.float32)
            response["output_log_probs"] = pad_last(out.output_log_probs[rows_slice, :W], new)
        return response
