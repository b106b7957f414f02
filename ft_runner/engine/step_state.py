"""Everything one decode step reads and writes, as device tensors at fixed addresses.

A step is: logits of the rows' current tokens -> next tokens -> `record`. Nothing in it reads host
values that change from step to step (the step counter lives on the device), so on a GPU the
whole step is captured once in a CUDA graph and replayed. The bookkeeping is the sampling path's
(generator.py): a row's token counts while its Finish code is RUNNING; finished rows emit end_id
with log-prob 0 and idle in the cache's last slot.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ft_runner.engine.sampler import Finish, SamplingParams, finish_codes

_PER_ROW = ("lengths", "output_lens", "end_id", *(f.name for f in dataclasses.fields(SamplingParams)))


@dataclasses.dataclass
class StepState:
    """Rows [0, B) are the batch; rows [B, R) are padding, finished from the start."""

    lengths: torch.Tensor  # int64 (R,): prompt lengths
    out_lens: torch.Tensor  # int64 (R,): new tokens wanted
    end_id: torch.Tensor  # int64 (R,)
    params: SamplingParams  # (R,) each
    next_tokens: torch.Tensor  # int64 (R,): the tokens the next forward pass reads
    positions: torch.Tensor  # int64 (R,): their positions (cache slots)
    reasons: torch.Tensor  # int64 (R,): Finish codes, RUNNING (0) while running
    produced: torch.Tensor  # int64 (R,): new tokens that count (an end token included)
    step: torch.Tensor  # int64 (): steps recorded so far
    history: torch.Tensor  # int64 (max_new, 2, R): per step, the tokens and the Finish codes after it
    logprobs: torch.Tensor  # float32 (max_new, R)
    max_pos: int  # the last cache slot
    other_ends: torch.Tensor | None = None  # int64 (E,): the model's other end tokens (ModelConfig.other_end_ids)
    model_end: int = -1  # the model's end_id: other end tokens end only the rows that keep it

    @classmethod
    def allocate(cls, rows: int, max_new: int, max_pos: int, device, other_ends=(), model_end: int = -1) -> StepState:
        def z(*shape, dtype=torch.int64):
            return torch.zeros(shape, dtype=dtype, device=device)

        f32 = torch.float32
        params = SamplingParams(top_k=z(rows), top_p=z(rows, dtype=f32), temperature=z(rows, dtype=f32),
                                repetition_penalty=z(rows, dtype=f32), presence_penalty=z(rows, dtype=f32),
                                min_length=z(rows), seed=z(rows))
        return cls(lengths=z(rows), out_lens=z(rows), end_id=z(rows), params=params, next_tokens=z(rows),
                   positions=z(rows), reasons=z(rows), produced=z(rows), step=z(), history=z(max_new, 2, rows),
                   logprobs=z(max_new, rows, dtype=f32), max_pos=max_pos,
                   other_ends=torch.tensor(other_ends, dtype=torch.int64, device=device) if other_ends else None,
                   model_end=model_end)

    @property
    def rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def temperature(self) -> torch.Tensor:
        return self.params.temperature

    @property
    def tokens(self) -> torch.Tensor:
        """(max_new, R) tokens, step-major."""
        return self.history[:, 0]

    def load(self, batch) -> None:
        """Reset for a new batch (padding rows finished), through pinned memory, without blocking."""
        B, R = batch.size, self.rows
        fields = [(name, getattr(batch, name)) for name in _PER_ROW]
        ints = [(n, a) for n, a in fields if a.dtype.kind in "iu"] + [("reasons", None)]
        floats = [(n, a) for n, a in fields if a.dtype.kind == "f"]
        for kind, group in ((np.int64, ints), (np.float32, floats)):
            host = np.zeros((len(group), R), dtype=kind)
            for i, (name, array) in enumerate(group):
                if array is not None:
                    host[i, :B] = array
                elif name == "reasons":
                    host[i, B:] = int(Finish.LENGTH)
                if name == "temperature":
                    host[i, B:] = 1.0
            staged = torch.from_numpy(host)
            staged = staged.pin_memory() if self.lengths.is_cuda else staged
            staged = staged.to(self.lengths.device, non_blocking=True)
            for row, (name, _) in zip(staged, group, strict=True):
                self._field(name).copy_(row)
        self.produced.zero_()
        self.step.zero_()

    def _field(self, name: str) -> torch.Tensor:
        own = {"output_lens": self.out_lens, "lengths": self.lengths, "end_id": self.end_id, "reasons": self.reasons}
        return own[name] if name in own else getattr(self.params, name)

    def record(self, tokens: torch.Tensor, logprobs: torch.Tensor, decode_state=None) -> None:
        """Store this step's sampled tokens (R,) and log-probs (R,) and update the Finish codes.

        `decode_state` (sampler.DecodeState) supplies stop words and penalty counts; without one a
        row finishes only on end_id or its length.
        """
        finished = self.reasons != Finish.RUNNING
        tokens = torch.where(finished, self.end_id, tokens)
        ends = self._as_end_id(tokens)
        if decode_state is not None:
            codes = decode_state.finish(ends, self.step, self.out_lens, self.end_id)
        else:
            codes = finish_codes(ends, torch.zeros_like(finished), self.step + 1 >= self.out_lens, self.end_id)
        self.produced += (~finished).to(self.produced.dtype)
        self.reasons.copy_(torch.where(finished, self.reasons, codes))
        self.history.index_copy_(0, self.step.view(1), torch.stack([tokens, self.reasons])[None])
        self.logprobs.index_copy_(0, self.step.view(1), torch.where(finished, 0.0, logprobs.float())[None])
        self.next_tokens.copy_(tokens)
        torch.clamp(self.lengths + self.step, max=self.max_pos, out=self.positions)
        self.step += 1

    def _as_end_id(self, tokens: torch.Tensor) -> torch.Tensor:
        """`tokens` with the model's other end tokens read as end_id, in the rows that keep the model's end_id."""
        if self.other_ends is None:
            return tokens
        other = (tokens[:, None] == self.other_ends[None, :]).any(-1) & (self.end_id == self.model_end)
        return torch.where(other, self.end_id, tokens)

    def end_on_other_ends(self) -> None:
        """After the fused greedy kernel recorded this step (`record` does this itself): rows whose new token
        is another end token finish as END_ID. Rows finished before emit end_id itself, so they never match."""
        if self.other_ends is None:
            return
        last = (self.step - 1).view(1)
        tokens = self.history[:, 0].index_select(0, last)[0]
        ended = self._as_end_id(tokens) != tokens
        self.reasons.copy_(torch.where(ended, int(Finish.END_ID), self.reasons))
        self.history[:, 1].index_copy_(0, last, self.reasons[None])

    def snapshot(self) -> dict:
        return {f.name: getattr(self, f.name).clone() for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def restore(self, saved: dict) -> None:
        for name, value in saved.items():
            getattr(self, name).copy_(value)


class TokenStream:
    """Brings each step's (tokens, Finish codes) to the host `lag` steps late, through pinned memory
    and events, so the host can stop the loop and feed `on_token` without stalling the device."""

    def __init__(self, state: StepState, batch_size: int, on_token=None, lag: int = 0):
        self.state, self.B, self.on_token, self.lag = state, batch_size, on_token, lag
        cuda = state.history.is_cuda
        self.slots = torch.empty((lag + 1, 2, state.rows), dtype=torch.int64, pin_memory=cuda)
        self.events = [torch.cuda.Event() if cuda else None for _ in range(lag + 1)]
        self.pending: list[int] = []
        self.steps: int | None = None  # set once every row has finished

    @property
    def done(self) -> bool:
        return self.steps is not None

    def push(self, step: int) -> None:
        """Step `step` has been queued on the device."""
        slot = step % (self.lag + 1)
        self.slots[slot].copy_(self.state.history[step], non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        self.pending.append(step)
        while len(self.pending) > self.lag:
            self._deliver(self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._deliver(self.pending.pop(0))

    def _deliver(self, step: int) -> None:
        if self.done:
            return
        slot = step % (self.lag + 1)
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        tokens, reasons = self.slots[slot, :, : self.B].numpy().copy()
        if self.on_token is not None:
            self.on_token(step, tokens, reasons)
        if (reasons != Finish.RUNNING).all():
            self.steps = step + 1
