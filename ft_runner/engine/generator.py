"""Prefill + decode in lock-step on every rank of the grid.

Every rank calls `generate` with the same Batch. Pipeline stages hand activations to the next
stage; the last stage samples and broadcasts the new tokens to every rank, so all ranks agree on
when to stop without any extra message.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from ft_runner.engine.kv_cache import KVCache
from ft_runner.engine.sampler import DecodeState, Finish, SamplingParams, sample, word_list_batch

WORD_LISTS = ("stop_words", "bad_words")


@dataclasses.dataclass
class Batch:
    """One generation batch, identical on every rank. Arrays are numpy, one row per sequence."""

    input_ids: np.ndarray  # int64 (B, S), right-padded
    lengths: np.ndarray  # int64 (B,)
    output_lens: np.ndarray  # int64 (B,): new tokens wanted
    end_id: np.ndarray  # int64 (B,)
    top_k: np.ndarray  # int64 (B,)
    top_p: np.ndarray  # float32 (B,)
    temperature: np.ndarray  # float32 (B,)
    repetition_penalty: np.ndarray  # float32 (B,)
    presence_penalty: np.ndarray  # float32 (B,)
    min_length: np.ndarray  # int64 (B,)
    seed: np.ndarray  # int64 (B,)
    beam_width: np.ndarray  # int64 (B,): 1 = greedy / sampling, > 1 = beam search (engine/beam.py)
    len_penalty: np.ndarray  # float32 (B,): final beam scores are divided by length ** len_penalty
    diversity_rate: np.ndarray  # float32 (B,): added to a beam candidate's score times its rank among siblings
    stop_words: np.ndarray  # int64 (B, 2, L): FT word lists (engine/sampler.py); L may be 0
    bad_words: np.ndarray  # int64 (B, 2, L)

    @classmethod
    def make(cls, prompts: list[list[int]], output_lens, end_id, **per_row) -> "Batch":
        """Build a batch from token lists; `end_id` and `per_row` values are scalars or sequences of
        length B (word lists: per row a list of words, each a token list, or FT's (2, L) / (B, 2, L))."""
        B = len(prompts)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        end_id = np.broadcast_to(np.asarray(end_id, dtype=np.int64), (B,))
        ids = np.repeat(end_id[:, None], int(lengths.max()), axis=1)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        defaults = dict(end_id=end_id, top_k=0, top_p=0.0, temperature=1.0, repetition_penalty=1.0,
                        presence_penalty=0.0, min_length=0, seed=0, beam_width=1, len_penalty=0.0,
                        diversity_rate=0.0)
        defaults.update(per_row)
        rows = {name: word_list_batch(defaults.pop(name, None), B) for name in WORD_LISTS}
        for field in dataclasses.fields(cls)[3:]:
            if field.name in WORD_LISTS:
                continue
            dtype = np.float32 if isinstance(defaults[field.name], float) or field.name in (
                "top_p", "temperature", "repetition_penalty", "presence_penalty", "len_penalty",
                "diversity_rate") else np.int64
            rows[field.name] = np.broadcast_to(np.asarray(defaults[field.name], dtype=dtype), (B,)).copy()
        return cls(ids, lengths, np.broadcast_to(np.asarray(output_lens, np.int64), (B,)).copy(), **rows)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]


@dataclasses.dataclass
class Output:
    output_ids: np.ndarray  # int64 (B, S + max new): prompt, new tokens, end_id padding
    sequence_lengths: np.ndarray  # int64 (B,): prompt + new tokens (an end token counts)
    cum_log_probs: np.ndarray  # float32 (B,): sum over the new tokens
    output_log_probs: np.ndarray  # float32 (B, max new)
    finish_reason: np.ndarray  # int64 (B,): a sampler.Finish code


class Generator:
    def __init__(self, model, runtime):
        self.model = model
        self.runtime = runtime
        self.grid = runtime.grid
        self.device = runtime.device
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def generate(self, batch: Batch, on_token=None) -> Output:
        """Run the batch to completion. `on_token(step, tokens, reasons)` sees each step's tokens and
        every row's Finish code after it (numpy, (B,)); a row's token counts while its code was 0.
        Rows with beam_width > 1 go to beam search (one output per beam, no on_token)."""
        if (batch.beam_width > 1).any():
            from ft_runner.engine import beam  # beam.py builds on this module

            return beam.generate(self, batch)
        dev, B = self.device, batch.size
        lengths = torch.from_numpy(batch.lengths).to(dev)
        out_lens = torch.from_numpy(batch.output_lens).to(dev)
        end_id = torch.from_numpy(batch.end_id).to(dev)
        params = self._params(batch)
        max_new = int(batch.output_lens.max())
        cache = self._cache(B, max(batch.input_ids.shape[1], int((batch.lengths + batch.output_lens).max())))
        state = DecodeState(batch, self.model.config.vocab_size, dev)

        ids = torch.from_numpy(batch.input_ids).to(dev)
        positions = torch.arange(ids.shape[1], device=dev).expand(B, -1)
        logits = self._forward(ids, positions, lengths, cache, lengths - 1, prefill=True)
        new_tokens = torch.full((B, max_new), -1, dtype=torch.int64, device=dev)
        logprobs = torch.zeros((B, max_new), dtype=torch.float32, device=dev)
        reasons = torch.zeros(B, dtype=torch.int64, device=dev)  # Finish codes; 0 while running
        produced = torch.zeros(B, dtype=torch.int64, device=dev)
        steps = 0
        for step in range(max_new):
            tokens, lp = self._next_tokens(logits, state, params, step, end_id)
            finished = reasons != Finish.RUNNING
            tokens = torch.where(finished, end_id, tokens)
            new_tokens[:, step], logprobs[:, step] = tokens, torch.where(finished, 0.0, lp)
            produced += ~finished
            reasons = torch.where(finished, reasons, state.finish(tokens, step, out_lens, end_id))
            if on_token is not None:
                on_token(step, tokens.cpu().numpy(), reasons.cpu().numpy())
            steps += 1
            if bool((reasons != Finish.RUNNING).all()):
                break
            pos = (lengths + step).clamp_max(cache.k.shape[3] - 1)  # finished rows idle in their last slot
            logits = self._forward(tokens[:, None], pos[:, None], pos, cache, torch.zeros_like(pos), prefill=False)
        return self._output(batch, new_tokens[:, :steps], logprobs[:, :steps], produced, reasons)

    def _params(self, batch: Batch) -> SamplingParams:
        t = {f.name: torch.from_numpy(getattr(batch, f.name)).to(self.device)
             for f in dataclasses.fields(SamplingParams)}
        return SamplingParams(**t)

    def _cache(self, batch: int, max_len: int) -> KVCache:
        config, tp = self.model.config, self.grid.tp
        return KVCache.allocate(len(self.model.layers), batch, config.local_kv_heads(tp), max_len,
                                config.size_per_head, self.dtype, self.device)

    def _forward(self, ids, positions, row_positions, cache, last_index, prefill: bool):
        """One pass of the pipeline; logits (B, V) of each row's `last_index` token on the last stage."""
        h = self._hidden(ids, positions, row_positions, cache, prefill)
        if h is None:
            return None
        return self.model.logits(h[torch.arange(h.shape[0], device=h.device), last_index])

    def _hidden(self, ids, positions, row_positions, cache, prefill: bool):
        """Run this rank's layers; the last stage returns hidden states (B, S, H), the others None."""
        grid, model = self.grid, self.model
        if grid.is_first_stage:
            h = model.embed(ids, positions)
        else:
            h = torch.empty((*ids.shape, model.config.hidden_size), dtype=self.dtype, device=self.device)
            dist.recv(h, src=grid.stage_rank(grid.pp_rank - 1))
        h = model(h, cache, row_positions, prefill)
        if not grid.is_last_stage:
            dist.send(h.contiguous(), dst=grid.stage_rank(grid.pp_rank + 1))
            return None
        return h

    @torch.inference_mode()
    def prompt_logits(self, batch: Batch) -> np.ndarray:
        """fp32 logits (B, S, V) at every prompt position, on every rank (for scoring and tests)."""
        dev, (B, S) = self.device, batch.input_ids.shape
        ids = torch.from_numpy(batch.input_ids).to(dev)
        positions = torch.arange(S, device=dev).expand(B, -1)
        h = self._hidden(ids, positions, None, self._cache(B, S), prefill=True)
        logits = self.model.logits(h).contiguous() if h is not None else torch.empty(
            (B, S, self.model.config.vocab_size), dtype=torch.float32, device=dev)
        if self.grid.world > 1:  # gloo sends a non-contiguous tensor's storage as is: keep it contiguous
            dist.broadcast(logits, src=self.grid.sampler_rank)
        return logits.cpu().numpy()

    def _next_tokens(self, logits, state, params, step, end_id):
        """Sample on the last stage, then share (tokens, log-probs) with every rank."""
        B = params.seed.shape[0]
        if logits is not None:
            tokens, lp = sample(state.process(logits, params, step, end_id), params, step)
        else:
            tokens = torch.empty(B, dtype=torch.int64, device=self.device)
            lp = torch.empty(B, dtype=torch.float32, device=self.device)
        if self.grid.world > 1:
            dist.broadcast(tokens, src=self.grid.sampler_rank)
            dist.broadcast(lp, src=self.grid.sampler_rank)
        return tokens, lp

    def _output(self, batch: Batch, new_tokens, logprobs, produced, reasons) -> Output:
        """`produced` (B,): each row's new tokens, an end token included (stop words end without one)."""
        new = new_tokens.cpu().numpy()
        lp = logprobs.cpu().numpy()
        B, S = batch.input_ids.shape
        out_ids = np.full((B, S + new.shape[1]), batch.end_id[:, None], dtype=np.int64)
        seq_lens = np.zeros(B, dtype=np.int64)
        produced = produced.cpu().numpy()
        for row in range(B):
            n = int(produced[row])
            length = batch.lengths[row]
            out_ids[row, :length] = batch.input_ids[row, :length]
            out_ids[row, length:length + n] = new[row, :n]
            seq_lens[row] = length + n
            lp[row, n:] = 0.0
        return Output(out_ids, seq_lens, lp.sum(axis=1).astype(np.float32), lp.astype(np.float32),
                      reasons.cpu().numpy())
