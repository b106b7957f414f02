"""The control channel from rank 0 to the other ranks: fixed numpy buffers over MPI, no pickle.

A message is a header of five int64s. STEP (the in-flight engine's step, once per step): the
header holds (STEP, tokens N, sequences B, block-table width W, decodes) and one int64 buffer
follows: tokens (N), positions (N), cu_seqlens (B+1), context_lens (B), the sampled rows as a
0/1 mask (B), prompt lengths (B), block tables (B, W). GENERATE (a beam-search batch for the static engine): the
header holds (GENERATE, batch size, prompt width, stop-word width, bad-word width), then token
ids (B, S), the integer per-row fields and the float per-row fields of a Batch, then its stop and
bad word lists (B, 2, L) when their L is not 0.
Idle workers wait in a non-blocking broadcast polled every half millisecond: a blocking MPI
receive would spin a core at 100% and starve rank 0's server on small machines.
"""

from __future__ import annotations

import dataclasses
import enum
import time

import numpy as np

from ft_runner.engine.generator import WORD_LISTS, Batch
from ft_runner.engine.model_runner import StepPlan

INT_FIELDS = ("lengths", "output_lens", "end_id", "top_k", "min_length", "seed", "beam_width")
FLOAT_FIELDS = ("top_p", "temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "len_penalty",
                "diversity_rate")
POLL_S = 0.0005
HEADER = 5
assert {f.name for f in dataclasses.fields(Batch)} == {"input_ids", *INT_FIELDS, *FLOAT_FIELDS, *WORD_LISTS}, \
    "every Batch field must travel to the other ranks"


class Command(enum.IntEnum):
    GENERATE = 1
    STOP = 2
    STEP = 3


class Channel:
    def __init__(self, comm):
        self.comm = comm

    # rank 0
    def send_generate(self, batch: Batch) -> None:
        B, S = batch.input_ids.shape
        widths = [getattr(batch, f).shape[2] for f in WORD_LISTS]
        self._header(Command.GENERATE, B, S, *widths)
        self.comm.Bcast(np.ascontiguousarray(batch.input_ids, dtype=np.int64), root=0)
        self.comm.Bcast(np.stack([getattr(batch, f) for f in INT_FIELDS], axis=1).astype(np.int64), root=0)
        self.comm.Bcast(np.stack([getattr(batch, f) for f in FLOAT_FIELDS], axis=1).astype(np.float32), root=0)
        for name, width in zip(WORD_LISTS, widths):
            if width:
                self.comm.Bcast(np.ascontiguousarray(getattr(batch, name), dtype=np.int64), root=0)

    def send_step(self, plan: StepPlan) -> None:
        B, W = plan.block_tables.shape
        self._header(Command.STEP, len(plan.tokens), B, W, plan.num_decode)
        sampled = np.zeros(B, dtype=np.int64)
        sampled[plan.sample_rows] = 1
        self.comm.Bcast(np.concatenate([plan.tokens, plan.positions, plan.cu_seqlens, plan.context_lens, sampled,
                                        plan.prompt_lens, plan.block_tables.ravel()]).astype(np.int64), root=0)

    def send_stop(self) -> None:
        self._header(Command.STOP, 0, 0, 0, 0)

    def _header(self, command: Command, B: int, S: int, *widths: int) -> None:
        # Ibcast on both sides: MPI never matches a blocking broadcast with a non-blocking one
        self.comm.Ibcast(np.array([command, B, S, *widths], dtype=np.int64), root=0).Wait()

    # every other rank
    def receive(self) -> tuple[Command, Batch | StepPlan | None]:
        header = np.zeros(HEADER, dtype=np.int64)
        request = self.comm.Ibcast(header, root=0)
        while not request.Test():
            time.sleep(POLL_S)
        command, B, S = Command(int(header[0])), int(header[1]), int(header[2])
        if command == Command.STEP:
            return command, self._receive_step(*(int(v) for v in header[1:]))
        if command != Command.GENERATE:
            return command, None
        ids = np.empty((B, S), dtype=np.int64)
        ints = np.empty((B, len(INT_FIELDS)), dtype=np.int64)
        floats = np.empty((B, len(FLOAT_FIELDS)), dtype=np.float32)
        for array in (ids, ints, floats):
            self.comm.Bcast(array, root=0)
        fields = {f: ints[:, i].copy() for i, f in enumerate(INT_FIELDS)}
        fields.update({f: floats[:, i].copy() for i, f in enumerate(FLOAT_FIELDS)})
        for name, width in zip(WORD_LISTS, header[3:]):
            fields[name] = np.zeros((B, 2, int(width)), dtype=np.int64)
            if width:
                self.comm.Bcast(fields[name], root=0)
        return command, Batch(input_ids=ids, **fields)

    def _receive_step(self, N: int, B: int, W: int, decodes: int) -> StepPlan:
        flat = np.empty(2 * N + (B + 1) + 3 * B + B * W, dtype=np.int64)
        self.comm.Bcast(flat, root=0)
        tokens, positions, cu, context, sampled, prompts, tables = np.split(flat, np.cumsum([N, N, B + 1, B, B, B]))
        return StepPlan(tokens=tokens, positions=positions, cu_seqlens=cu.astype(np.int32),
                        context_lens=context.astype(np.int32), block_tables=tables.reshape(B, W).astype(np.int32),
                        num_decode=decodes, sample_rows=np.flatnonzero(sampled), prompt_lens=prompts)
