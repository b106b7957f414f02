"""The text model of PyTriton's FasterTransformer example (ft_format.md §1.3).

inputs:  prompts bytes (1,), request_output_len uint32 (1,), beam_width uint32 (1,) optional
outputs: sentences bytes (-1, 1), sequence_length int64 (-1,), cum_log_probs float32 (-1,)
Each row keeps its own output length (the example took the first row's for the whole batch).
`sentences` hold the prompt followed by the generation, as in the example; `sequence_length`
counts tokens (the example counted characters).
"""

from __future__ import annotations

import numpy as np
from pytriton.model_config import ModelConfig, Tensor

from ft_runner.engine.generator import Batch
from ft_runner.serving.engine import Engine

INPUTS = [
    Tensor(name="prompts", shape=(1,), dtype=bytes),
    Tensor(name="request_output_len", shape=(1,), dtype=np.uint32),
    Tensor(name="beam_width", shape=(1,), dtype=np.uint32, optional=True),
]
OUTPUTS = [
    Tensor(name="sentences", shape=(-1, 1), dtype=bytes),
    Tensor(name="sequence_length", shape=(-1,), dtype=np.int64),
    Tensor(name="cum_log_probs", shape=(-1,), dtype=np.float32),
]


class RequestError(ValueError):
    """A request the server refuses; the message names the input, the value and what is allowed."""


class TextModel:
    def __init__(self, engine: Engine, tokenizer, config, max_batch_size: int = 128):
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.model_config = ModelConfig(max_batch_size=max_batch_size)

    def infer(self, requests):
        """PyTriton callable: a list of requests in, one dict of outputs per request out."""
        rows = [self._rows(request) for request in requests]
        prompts = [p for request_rows in rows for p, _ in request_rows]
        out_lens = [n for request_rows in rows for _, n in request_rows]
        out = self.engine.submit(Batch.make(prompts, out_lens, end_id=self.config.end_id))
        texts = [self.tokenizer.decode(out.output_ids[i, : out.sequence_lengths[i]], skip_special_tokens=True)
                 for i in range(len(prompts))]
        responses, start = [], 0
        for request_rows in rows:
            end = start + len(request_rows)
            responses.append({
                "sentences": np.array([[[t.encode("utf-8")]] for t in texts[start:end]], dtype=object),
                "sequence_length": out.sequence_lengths[start:end, None].astype(np.int64),
                "cum_log_probs": out.cum_log_probs[start:end, None].astype(np.float32),
            })
            start = end
        return responses

    def _rows(self, request) -> list[tuple[list[int], int]]:
        prompts = request["prompts"].reshape(-1)
        out_lens = request["request_output_len"].reshape(-1)
        beams = request["beam_width"].reshape(-1) if "beam_width" in request.keys() else np.ones_like(out_lens)
        return [self._row(i, p, int(n), int(b)) for i, (p, n, b) in enumerate(zip(prompts, out_lens, beams))]

    def _row(self, i: int, prompt: bytes, out_len: int, beam: int) -> tuple[list[int], int]:
        context = self.config.max_pos_seq_len
        try:
            text = prompt.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"prompts[{i}] is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        ids = self.tokenizer(text)["input_ids"]
        if not ids:
            raise RequestError(f"prompts[{i}] is empty: give at least one token of text")
        if beam != 1:
            raise RequestError(f"beam_width[{i}] = {beam} is not supported: only 1 (greedy/sampling)")
        if not 1 <= out_len <= context:
            raise RequestError(f"request_output_len[{i}] = {out_len} must be between 1 and {context}")
        if len(ids) + out_len > context:
            raise RequestError(
                f"prompts[{i}] has {len(ids)} tokens; with request_output_len {out_len} that is "
                f"{len(ids) + out_len}, over the model's context of {context} tokens")
        return ids, out_len
