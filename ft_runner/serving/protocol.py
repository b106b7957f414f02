"""The control channel from rank 0 to the other ranks: fixed numpy buffers over MPI, no pickle.

A message is a header (command, batch size, prompt width, stop-word width, bad-word width)
followed, for GENERATE, by: token ids (B, S), the integer per-row fields and the float per-row
fields of a Batch, then its stop and bad word lists (B, 2, L) when their L is not 0.
Idle workers wait in a non-blocking broadcast polled every half millisecond: a blocking MPI
receive would spin a core at 100% and starve rank 0's server on small machines.
"""

from __future__ import annotations

import dataclasses
import enum
import time

import numpy as np

from ft_runner.engine.generator import WORD_LISTS, Batch

INT_FIELDS = ("lengths", "output_lens", "end_id", "top_k", "min_length", "seed", "beam_width")
FLOAT_FIELDS = ("top_p", "temperature", "repetition_penalty", "presence_penalty", "len_penalty", "diversity_rate")
POLL_S = 0.0005
HEADER = 5
assert {f.name for f in dataclasses.fields(Batch)} == {"input_ids", *INT_FIELDS, *FLOAT_FIELDS, *WORD_LISTS}, \
    "every Batch field must travel to the other ranks"


class Command(enum.IntEnum):
    GENERATE = 1
    STOP = 2


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

    def send_stop(self) -> None:
        self._header(Command.STOP, 0, 0, 0, 0)

    def _header(self, command: Command, B: int, S: int, *widths: int) -> None:
        # Ibcast on both sides: MPI never matches a blocking broadcast with a non-blocking one
        self.comm.Ibcast(np.array([command, B, S, *widths], dtype=np.int64), root=0).Wait()

    # every other rank
    def receive(self) -> tuple[Command, Batch | None]:
        header = np.zeros(HEADER, dtype=np.int64)
        request = self.comm.Ibcast(header, root=0)
        while not request.Test():
            time.sleep(POLL_S)
        command, B, S = Command(int(header[0])), int(header[1]), int(header[2])
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
