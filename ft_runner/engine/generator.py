"""Prefill + decode in lock-step on every rank of the grid.

Every rank calls `generate` with the same Batch. Pipeline stages hand activations to the next
stage; the last stage samples and broadcasts the new tokens to every rank, so all ranks agree on
when to stop without any extra message (with one stage, every rank holds the gathered logits and
greedy decoding needs no broadcast at all).

The decode step (engine/decode.py: fused kernels; engine/step_state.py: its device-side
bookkeeping) reads no host value that changes per step, so on a GPU it runs as a CUDA graph
replayed once per token (engine/cuda_graph.py), over a KV cache that lives across batches. The
host learns each step's tokens a few steps late through pinned memory (TokenStream): enough to
stop and to stream, never a stall.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist

from ft_runner.engine import decode
from ft_runner.engine.cuda_graph import StepGraphs, padded_batch
from ft_runner.engine.kv_cache import KVCache
from ft_runner.engine.sampler import DecodeState, Finish, SamplingParams, sample, word_list_batch
from ft_runner.engine.step_state import StepState, TokenStream
from ft_runner.kernels import ops

CACHE_GRANULE = 256  # the persistent KV cache grows in steps of this many positions
STREAM_LAG = 4  # steps the host may run ahead of the tokens it has seen
PROMPT_GRANULE = 64  # captured prefills pad prompts to a multiple of this many tokens
MAX_PROMPT_GRAPH_TOKENS = 1 << 16  # larger prefills run eagerly (their launch overhead is relatively small)
MAX_PROMPT_GRAPHS = 16
CANCEL_EVERY = 8  # decode steps between two looks at rank 0's cancelled rows

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
    frequency_penalty: np.ndarray  # float32 (B,): OpenAI's; the in-flight engine applies it (not beam search)
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
                        presence_penalty=0.0, frequency_penalty=0.0, min_length=0, seed=0, beam_width=1,
                        len_penalty=0.0, diversity_rate=0.0)
        defaults.update(per_row)
        rows = {name: word_list_batch(defaults.pop(name, None), B) for name in WORD_LISTS}
        for field in dataclasses.fields(cls)[3:]:
            if field.name in WORD_LISTS:
                continue
            dtype = np.float32 if isinstance(defaults[field.name], float) or field.name in (
                "top_p", "temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "len_penalty",
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
        self.dtype = model.dtype
        self.vocab = model.config.vocab_size
        self._ends = dict(other_ends=model.config.other_end_ids, model_end=model.config.end_id)
        reason = decode.unsupported_reason(model)
        if reason or os.environ.get("FT_RUNNER_DECODER") == "module":
            self.decoder = decode.ModuleDecoder(self)
        else:
            self.decoder = decode.fused_decoder(model, runtime)
        graphs = (self.device.type == "cuda" and self.grid.pp == 1 and isinstance(self.decoder, decode.FusedDecoder)
                  and os.environ.get("FT_RUNNER_CUDA_GRAPHS", "1") != "0")
        self.graphs = StepGraphs() if graphs else None
        self._kv: KVCache | None = None  # with graphs: one cache for every batch, grown on demand
        self._states: dict[int, StepState] = {}  # with graphs: the step state of each padded batch size
        self._prompts: dict[tuple[int, int], torch.Tensor] = {}  # with graphs: prefill inputs per (rows, length)
        rotary = getattr(model, "rotary", None)
        if self.graphs is not None and rotary is not None and rotary.inv is not None:
            rotary.inv = rotary.inv.to(self.device)  # no host-to-device copy inside a captured prefill

    @torch.inference_mode()
    def generate(self, batch: Batch, on_token=None, cancelled=None) -> Output:
        """Run the batch to completion. `on_token(step, tokens, reasons)` sees each step's tokens and
        every row's Finish code after it (numpy, (B,)); a row's token counts while its code was 0.
        `cancelled` makes rows cancellable (the serving engine): on rank 0, a callable returning a
        (B,) bool mask of rows nobody waits for any more; on every other rank, True. Every
        CANCEL_EVERY steps rank 0 shares the mask and those rows finish as Finish.CANCELLED. None on
        every rank (benchmarks, ParallelGPT): no checks and no extra collective.
        Rows with beam_width > 1 go to beam search (one output per beam, no on_token)."""
        if (batch.beam_width > 1).any():
            from ft_runner.engine import beam  # beam.py builds on this module

            return beam.generate(self, batch)
        B, S = batch.input_ids.shape
        max_new = int(batch.output_lens.max())
        mode = _mode(batch)
        state, cache = self._resources(B, max(S, int((batch.lengths + batch.output_lens).max())), max_new, mode)
        state.load(batch)
        history = DecodeState(batch, self.vocab, self.device) if mode == "eager" else None

        self._prefill(batch, state, cache, history, mode)
        stream = TokenStream(state, B, on_token, lag=STREAM_LAG if self.device.type == "cuda" else 0)
        stream.push(0)
        rows = cache.rows(state.rows)

        def step():
            self._choose(self.decoder.logits(state.next_tokens, state.positions, rows), state, history, mode)

        for index in range(1, max_new):
            if stream.done:
                break
            if cancelled is not None and index % CANCEL_EVERY == 0:
                self._cancel_rows(state, B, cancelled)
            if self.graphs is not None and mode != "eager":
                self._run_graph((state.rows, mode), step, state)
            else:
                step()
            stream.push(index)
        stream.flush()
        steps = stream.steps or max_new
        return self._output(batch, state.tokens[:steps, :B].T, state.logprobs[:steps, :B].T, state.produced[:B],
                            state.reasons[:B])

    def _cancel_rows(self, state: StepState, B: int, cancelled) -> None:
        """Finish the rows rank 0 calls cancelled; with several ranks every rank takes part."""
        world = self.grid.world
        mask = cancelled() if callable(cancelled) else None
        gone = mask is not None and bool(mask.any())
        if world == 1 and not gone:
            return
        if gone:  # rare: only then a host-to-device copy
            flags = torch.from_numpy(mask.astype(np.int64)).to(self.device)
        else:
            flags = torch.zeros(B, dtype=torch.int64, device=self.device)
        if world > 1:
            dist.broadcast(flags, src=0)
        rows = state.reasons[:B]
        rows.copy_(torch.where((flags != 0) & (rows == Finish.RUNNING), int(Finish.CANCELLED), rows))

    def _prefill(self, batch: Batch, state: StepState, cache: KVCache, history, mode: str) -> None:
        """The prompts' forward pass and the first token. With CUDA graphs, prompts are padded to a
        multiple of PROMPT_GRANULE (the padding is causal-masked and its cache slots are rewritten
        before any row reads them) and the pass is captured per (padded batch, length, mode)."""
        B, S = batch.input_ids.shape
        rows, length = state.rows, -(-S // PROMPT_GRANULE) * PROMPT_GRANULE
        key = ("prefill", rows, length, mode)
        captured = self.graphs is not None and key in self.graphs.graphs
        if self.graphs is None or mode == "eager" or length > cache.max_len or not (
                captured or (rows * length <= MAX_PROMPT_GRAPH_TOKENS and len(self._prompts) < MAX_PROMPT_GRAPHS)):
            ids = torch.from_numpy(batch.input_ids).to(self.device)
            lengths = state.lengths[:B]
            positions = torch.arange(S, device=self.device).expand(B, -1)
            logits = self._forward(ids, positions, lengths, cache.rows(B), lengths - 1, prefill=True)
            self._choose(_pad_rows(logits, rows), state, history, mode)
            return
        if (rows, length) not in self._prompts:
            self._prompts[rows, length] = torch.zeros((rows, length), dtype=torch.int64, device=self.device)
        ids = self._prompts[rows, length]
        host = np.zeros((rows, length), dtype=np.int64)
        host[:B, :S] = batch.input_ids
        ids.copy_(torch.from_numpy(host).pin_memory(), non_blocking=True)
        view = cache.rows(rows)

        def prefill():
            positions = torch.arange(length, device=self.device).expand(rows, -1)
            last = (state.lengths - 1).clamp_min(0)
            logits = self._forward(ids, positions, state.lengths, view, last, prefill=True)
            self._choose(logits, state, history, mode)

        self._run_graph(key, prefill, state)

    def _run_graph(self, key, fn, state: StepState) -> None:
        """Replay (capturing first) the graph of `fn`; if capture fails, warn once and go eager."""
        try:
            self.graphs.run(key, fn, state)
        except RuntimeError as exc:
            if key in self.graphs.graphs:  # a replay failed: not a capture problem
                raise
            warnings.warn(f"CUDA graph capture failed ({exc}); decoding without graphs", stacklevel=2)
            torch.cuda.synchronize()
            self.graphs = None
            fn()
    def _resources(self, B: int, need: int, max_new: int, mode: str) -> tuple[StepState, KVCache]:
        """(StepState, KVCache) for a batch; with CUDA graphs both persist across batches (the graphs
        hold their addresses), padded to the batch ladder."""
        if self.graphs is None:
            self.decoder.prepare(need)
            state = StepState.allocate(B, max(max_new, 1), need - 1, self.device, **self._ends)
            return state, self._cache(B, need)
        rows = padded_batch(B) if mode != "eager" else B
        if self._kv is None or self._kv.batch < rows or self._kv.max_len < need:
            self._grow(rows, need)
        T = self._kv.max_len
        if mode == "eager":  # not captured: a fresh state of exactly B rows, as DecodeState has
            return StepState.allocate(B, T, T - 1, self.device, **self._ends), self._kv
        if rows not in self._states:
            self._states[rows] = StepState.allocate(rows, T, T - 1, self.device, **self._ends)
        return self._states[rows], self._kv

    def _grow(self, rows: int, need: int) -> None:
        """A larger persistent cache; every graph and step state made for the old one goes."""
        old_rows, old_len = (self._kv.batch, self._kv.max_len) if self._kv is not None else (0, 0)
        self._kv = None
        self._states.clear()
        self._prompts.clear()
        self.graphs.clear()
        length = -(-max(need, old_len) // CACHE_GRANULE) * CACHE_GRANULE
        length = min(length, max(need, old_len, self.model.config.max_pos_seq_len))  # learned positions end there
        self._kv = self._cache(max(rows, old_rows), length)
        self.decoder.prepare(length)

    def _choose(self, logits, state: StepState, history: DecodeState | None, mode: str) -> None:
        """This step's token for every row, from the last stage's logits, recorded on every rank."""
        if mode == "greedy" and self.grid.pp == 1:  # every rank holds the gathered logits: no broadcast
            ops.greedy_step(logits, self.vocab, state)
            return
        if logits is not None:
            full = decode.full_logits(logits, self.vocab)
            if history is not None:
                processed = history.process(full, state.params, state.step, state.end_id)
            else:
                processed = full / state.params.temperature[:, None]
            tokens, lp = sample(processed, state.params, state.step)
        else:
            tokens = torch.empty(state.rows, dtype=torch.int64, device=self.device)
            lp = torch.empty(state.rows, dtype=torch.float32, device=self.device)
        if self.grid.world > 1:
            dist.broadcast(tokens, src=self.grid.sampler_rank)
            dist.broadcast(lp, src=self.grid.sampler_rank)
        state.record(tokens, lp, history)

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
            self.runtime.pipe.recv_prev(h)
        h = model(h, cache, row_positions, prefill)
        if not grid.is_last_stage:
            self.runtime.pipe.send_next(h)
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


def _mode(batch: Batch) -> str:
    """"greedy", "sample" (both captured in CUDA graphs), or "eager": penalties, min length or word
    lists, which need sampler.DecodeState's history of each row."""
    words = any((lists[:, 1] > 0).any() for lists in (batch.stop_words, batch.bad_words) if lists.shape[-1])
    if words or (batch.repetition_penalty != 1).any() or (batch.presence_penalty != 0).any() \
            or (batch.min_length > 0).any():
        return "eager"
    return "greedy" if ((batch.top_k <= 1) & (batch.top_p <= 0)).all() else "sample"


def _pad_rows(logits, rows: int):
    """Prefill logits (B, V) padded with zero rows to the step state's `rows`."""
    if logits is None or logits.shape[0] == rows:
        return logits
    return torch.cat([logits, logits.new_zeros((rows - logits.shape[0], logits.shape[1]))])
