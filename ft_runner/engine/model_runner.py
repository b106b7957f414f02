"""Runs one step of the in-flight engine on this rank: a plan in, logits out.

Every rank holds a paged KV cache for its stage (its layers, its TP share of the KV heads) and
runs the same `StepPlan`: the step's tokens of every scheduled sequence laid flat, their
positions, and each sequence's block table. Single-token rows (decodes) come first and attend
through the paged decode kernel; prefill chunks follow and attend through the paged prefill
kernel; both write their keys and values into the pages first. On GPUs a decode-only step
replays a CUDA graph captured for the smallest ladder size that holds its rows (padding rows
compute into a scratch page no request owns). Pipeline stages hand hidden states on; the last
stage's logits of the rows that sample come back to rank 0, which samples.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch
import torch.distributed as dist

from ft_runner.config import EngineConfig
from ft_runner.engine import decode
from ft_runner.engine.cuda_graph import LADDER
from ft_runner.engine.transfer import to_device
from ft_runner.kernels import ops
from ft_runner.model import quant

ACTIVATION_BYTES_PER_TOKEN = 16  # activations of one batched token, in units of (hidden + MLP width) elements
GIB = 1 << 30


@dataclasses.dataclass
class StepPlan:
    """One step, identical on every rank (rank 0 makes it; serving/protocol.py ships it)."""

    tokens: np.ndarray  # int64 (N,): the tokens computed this step, sequence after sequence
    positions: np.ndarray  # int64 (N,)
    cu_seqlens: np.ndarray  # int32 (B+1,): sequence b's tokens are [cu_seqlens[b], cu_seqlens[b+1])
    context_lens: np.ndarray  # int32 (B,): positions already cached before this step (its first position)
    block_tables: np.ndarray  # int32 (B, W): each sequence's pages
    num_decode: int  # the first num_decode sequences have one token each
    sample_rows: np.ndarray  # int64 (S,): the sequences whose last token's logits are wanted
    prompt_lens: np.ndarray  # int64 (B,): each sequence's prompt length (dynamic RoPE)
    # Tokens still being sampled on the device when the plan was made (the engine schedules a step
    # before it has read the last one's tokens) are -1 in `tokens`; on rank 0 `token_src` (N,) gives
    # each one's row in the previous step's sampled tokens (-1: the token is known).
    token_src: np.ndarray | None = None

    @property
    def pending_tokens(self) -> bool:
        return bool((self.tokens < 0).any())

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


@dataclasses.dataclass
class PagedKVCache:
    k: torch.Tensor  # (layers, pages, kv_heads, block_size, head_dim)
    v: torch.Tensor
    # e4m3 caches (--kv-cache-dtype fp8): (layers, 2) fp32, each layer's key and value scales (stored =
    # e4m3(x / scale)); 1.0, as vLLM for a checkpoint without calibrated scales. None: the model dtype.
    scales: torch.Tensor | None = None

    @classmethod
    def allocate(cls, layers: int, pages: int, kv_heads: int, block_size: int, head_dim: int, dtype, device,
                 fp8: bool = False):
        shape = (layers, pages, kv_heads, block_size, head_dim)
        if fp8:
            dtype = quant.FP8
        scales = torch.ones((layers, 2), dtype=torch.float32, device=device) if fp8 else None
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   scales)

    def scale(self, layer: int) -> torch.Tensor | None:
        """The (2,) key and value scales of one layer's pages, None for a model-dtype cache."""
        return None if self.scales is None else self.scales[layer]


@dataclasses.dataclass
class PagedBatch:
    """A StepPlan on the device, plus what attention needs; the fused decoder's `cache`."""

    cache: PagedKVCache
    tokens: torch.Tensor  # int64 (N,)
    positions: torch.Tensor  # int64 (N,)
    cu_seqlens: torch.Tensor  # int32 (B+1,)
    context_lens: torch.Tensor  # int32 (B,)
    block_tables: torch.Tensor  # int32 (B, W)
    seq_lens: torch.Tensor  # int64 (N,): the sequence length dynamic RoPE rotates each token for
    last: torch.Tensor  # int64 (S,): the token rows whose logits are wanted
    num_decode: int
    max_query_len: int
    prefill_cu: torch.Tensor | None = None  # int32: cu_seqlens of the prefill chunks, from their first token
    # the prefill chunks' rows of block_tables and context_lens as tensors of their own: a slice past
    # the decodes may start off a 16-byte boundary, and Triton compiles a kernel anew for each
    # alignment of its pointers (a compile is ~1 s, in the middle of serving)
    prefill_tables: torch.Tensor | None = None
    prefill_context: torch.Tensor | None = None

    @property
    def k(self):
        return self.cache.k

    @property
    def v(self):
        return self.cache.v

    def attend(self, layer: int, qkv, positions, heads: int, kv_heads: int, head_dim: int, scale: float,
               rope=None, out=None):
        """Attention of every token of the step (fused decoder): decode rows, then prefill chunks."""
        if out is None:
            out = torch.empty((qkv.shape[0], heads * head_dim), dtype=qkv.dtype, device=qkv.device)
        k, v, d = self.cache.k[layer], self.cache.v[layer], self.num_decode
        kv_scale = self.cache.scale(layer)
        if d:
            ops.paged_decode_attention(qkv[:d], k, v, self.block_tables[:d], positions[:d], heads, kv_heads,
                                       head_dim, scale, rope, out[:d], kv_scale)
        if d < qkv.shape[0]:
            tables = self.block_tables[d:] if self.prefill_tables is None else self.prefill_tables
            context = self.context_lens[d:] if self.prefill_context is None else self.prefill_context
            ops.prefill_attention(qkv[d:], k, v, tables, self.prefill_cu, context, self.max_query_len, heads,
                                  kv_heads, head_dim, scale, rope, out=out[d:], kv_scale=kv_scale)
        return out


def cache_pages(stage, runtime, config: EngineConfig) -> int:
    """How many pages this rank's cache can have: given, or from free memory (one spare page for
    padding rows is added on top by ModelRunner)."""
    if config.kv_cache_blocks:
        return config.kv_cache_blocks
    page = page_bytes(stage, runtime.grid.tp, config.kv_block_size)
    if runtime.device.type != "cuda":
        return max(int(config.cpu_kv_cache_gib * GIB // page), 1)
    free, total = torch.cuda.mem_get_info(runtime.device)
    budget = total * config.gpu_memory_utilization - (total - free) - activation_reserve(stage, config)
    return max(int(budget // page), 1)


def page_bytes(stage, tp: int, block_size: int) -> int:
    config = stage.config
    elem = 1 if kv_fp8(stage) else stage.dtype.itemsize
    return 2 * len(stage.layers) * config.local_kv_heads(tp) * block_size * config.size_per_head * elem


def kv_fp8(stage) -> bool:
    """Does the stage's paged cache hold e4m3 (QuantConfig.kv_cache_dtype, kept by load_stage)?"""
    settings = getattr(stage, "quant", None)
    return settings is not None and settings.kv_cache_dtype == "fp8"


def activation_reserve(stage, config: EngineConfig) -> int:
    """Room left for one step's activations and the sampled rows' fp32 logits, beside the cache."""
    model = stage.config
    elem = stage.dtype.itemsize
    tokens = config.max_num_batched_tokens * (model.hidden_size + model.inter_size) * ACTIVATION_BYTES_PER_TOKEN
    logits = config.max_num_seqs * model.vocab_size * 4 * 4
    return tokens * elem + logits + GIB


class ModelRunner:
    def __init__(self, stage, runtime, config: EngineConfig, pages: int):
        self.stage, self.runtime, self.config = stage, runtime, config
        self.grid, self.device = runtime.grid, runtime.device
        self.dtype = stage.dtype
        model = stage.config
        self.fused = decode.fused_decoder(stage, runtime) if decode.unsupported_reason(stage) is None else None
        if self.fused is not None:
            # rotary tables for every position either engine reaches (the static one stops at the context)
            self.fused.prepare(max(model.max_pos_seq_len, config.model_len(model)))
        self.pages = pages
        self.scratch = pages  # the extra page padding rows write into
        self.cache = PagedKVCache.allocate(len(stage.layers), pages + 1, model.local_kv_heads(self.grid.tp),
                                           config.kv_block_size, model.size_per_head, self.dtype, self.device,
                                           fp8=kv_fp8(stage))
        self.max_pages = -(-config.model_len(model) // config.kv_block_size)
        rotary = getattr(stage, "rotary", None)
        if rotary is not None and rotary.inv is not None:
            rotary.inv = rotary.inv.to(self.device)
        self._outstanding: collections.deque = collections.deque()  # rank 0: launched plans' logits
        self.graphs = DecodeGraphs(self) if self._graphs_on() else None

    def _graphs_on(self) -> bool:
        return (self.device.type == "cuda" and self.config.cuda_graphs and self.fused is not None
                and self.grid.pp == 1)

    def run(self, plan: StepPlan, previous: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits (S, vocab) fp32 of the plan's sampled rows on rank 0; None on the other ranks."""
        self.launch(plan, previous)
        return self.collect() if self.grid.rank == 0 else None

    @torch.inference_mode()
    def launch(self, plan: StepPlan, previous: torch.Tensor | None = None) -> None:
        """Run this rank's part of the plan. `previous` (rank 0): the last step's sampled tokens on
        the device, for the plan's pending ones. Rank 0 takes the plan's logits later, in launch
        order, from `collect`: with PP > 1 several plans (micro-batches) are in flight at once."""
        if self.graphs is not None and self.graphs.covers(plan):
            logits = self.graphs.replay(plan, lambda tokens: self.fill_pending(tokens, plan, previous))
        else:
            batch = self.to_device(plan)
            self.fill_pending(batch.tokens, plan, previous)
            logits = self.forward(batch)
        self._hand_over(logits, len(plan.sample_rows))

    def collect(self) -> torch.Tensor:
        """Rank 0: the oldest launched plan's logits (S, vocab) fp32."""
        logits = self._outstanding.popleft()
        if isinstance(logits, int):  # the last stage sends them
            buffer = torch.empty((logits, self.stage.config.vocab_size), dtype=torch.float32, device=self.device)
            logits = self.runtime.pipe.recv_logits(buffer)
        return logits

    @torch.inference_mode()
    def prompt_logits(self, tokens) -> torch.Tensor | None:
        """fp32 logits (n, vocab) at every position of one prompt (n tokens, one chunk), through the
        paged cache as a prefill computes them (for scoring and tests: it writes the cache's first
        pages, so call it while no request holds any). Every rank calls it; rank 0 gets the logits."""
        n, size = len(tokens), self.config.kv_block_size
        pages = -(-n // size)
        if pages > self.pages:
            raise ValueError(f"a prompt of {n} tokens needs {pages} pages; the cache has {self.pages}")
        plan = StepPlan(np.asarray(tokens, dtype=np.int64), np.arange(n, dtype=np.int64),
                        np.array([0, n], dtype=np.int32), np.zeros(1, dtype=np.int32),
                        np.arange(pages, dtype=np.int32)[None], 0, np.zeros(1, dtype=np.int64),
                        np.array([n], dtype=np.int64))
        batch = dataclasses.replace(self.to_device(plan), last=torch.arange(n, device=self.device))
        self._hand_over(self.forward(batch), n)
        return self.collect() if self.grid.rank == 0 else None

    def fill_pending(self, tokens: torch.Tensor, plan: StepPlan, previous: torch.Tensor | None) -> None:
        """Rank 0 writes the pending tokens from the previous step's samples, on the device, and
        every rank receives them (one broadcast of the step's token ids)."""
        if not plan.pending_tokens:
            return
        if self.grid.rank == 0:
            rows = np.flatnonzero(plan.token_src >= 0)
            tokens[to_device(rows, self.device)] = previous[to_device(plan.token_src[rows], self.device)]
        if self.grid.world > 1:
            dist.broadcast(tokens, src=0)

    def forward(self, batch: PagedBatch) -> torch.Tensor | None:
        """This stage's part of the step: full-vocabulary fp32 logits of `batch.last` on the last stage."""
        if self.fused is not None:
            logits = self.fused.logits(batch.tokens, batch.positions, batch, batch.last)
            return None if logits is None else decode.full_logits(logits, self.stage.config.vocab_size)
        return self._module_forward(batch)

    def _module_forward(self, batch: PagedBatch) -> torch.Tensor | None:
        """Every family through the model's own modules (post-norm, ALiBi, windows, dynamic RoPE)."""
        grid, stage = self.grid, self.stage
        if grid.is_first_stage:
            h = stage.embed(batch.tokens[None], batch.positions[None])
        else:
            h = torch.empty((1, batch.tokens.shape[0], stage.config.hidden_size), dtype=self.dtype, device=self.device)
            self.runtime.pipe.recv_prev(h)
        h = stage(h, self.cache, batch, prefill=True)
        if not grid.is_last_stage:
            self.runtime.pipe.send_next(h)
            return None
        return stage.logits(h[0, batch.last])

    def _hand_over(self, logits, rows: int) -> None:
        """Rank 0 keeps the logits for `collect`; with several stages the last one's sampler rank
        sends them, and rank 0 keeps their row count."""
        grid = self.grid
        if grid.rank == 0:
            self._outstanding.append(logits if grid.sampler_rank == 0 else rows)
        elif grid.rank == grid.sampler_rank:
            self.runtime.pipe.send_logits(logits)

    def to_device(self, plan: StepPlan) -> PagedBatch:
        dev = self.device
        counts = np.diff(plan.cu_seqlens)
        # as HF computes it once, whatever the chunking or recomputation: the whole prompt at the prompt's
        # length, each later token at its own position + 1
        seq_lens = np.maximum(np.repeat(plan.prompt_lens, counts), plan.positions + 1)
        last = plan.cu_seqlens[1:][plan.sample_rows].astype(np.int64) - 1
        d = plan.num_decode
        # a table width that is a multiple of 16: Triton specializes on an integer's divisibility by 16
        # (the tables' row stride), and each variant would compile anew as the longest request grows
        tables = np.pad(plan.block_tables, ((0, 0), (0, -plan.block_tables.shape[1] % 16)))
        t = {name: to_device(a, dev) for name, a in (
            ("tokens", plan.tokens), ("positions", plan.positions), ("cu_seqlens", plan.cu_seqlens),
            ("context_lens", plan.context_lens), ("block_tables", tables), ("seq_lens", seq_lens),
            ("last", last), ("prefill_cu", plan.cu_seqlens[d:] - d))}
        if 0 < d < plan.num_seqs:
            t["prefill_tables"], t["prefill_context"] = to_device(tables[d:], dev), to_device(plan.context_lens[d:], dev)
        return PagedBatch(self.cache, num_decode=plan.num_decode, max_query_len=int(counts.max(initial=1)), **t)


def graph_sizes(max_num_seqs: int) -> list[int]:
    """The decode graphs' row counts: the ladder, then every 128 rows up to max_num_seqs (a step pads
    to the next size, so wide gaps would waste rows)."""
    sizes = [s for s in LADDER if s < max_num_seqs]
    step = 128
    while sizes and sizes[-1] >= LADDER[-1] and sizes[-1] + step < max_num_seqs:
        sizes.append(sizes[-1] + step)
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """Decode-only steps as CUDA graphs, one per ladder size up to max_num_seqs, captured at start-up.

    Each graph reads fixed input buffers (tokens, positions, a full-width block table); rows past
    the step's are padding: token 0 at position 0 of the scratch page."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.sizes = graph_sizes(runner.config.max_num_seqs)
        rows, dev = self.sizes[-1], runner.device
        self.tokens = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((rows, runner.max_pages), runner.scratch, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # one memory pool for all: one replays at a time, the largest captured first
        for size in reversed(self.sizes):
            self.graphs[size] = self._capture(size)

    def covers(self, plan: StepPlan) -> bool:
        return plan.num_decode == plan.num_seqs and plan.num_seqs <= self.sizes[-1]

    def _batch(self, rows: int) -> PagedBatch:
        r = self.runner
        cu = torch.arange(rows + 1, dtype=torch.int32, device=r.device)
        return PagedBatch(r.cache, self.tokens[:rows], self.positions[:rows], cu, self.positions[:rows].int(),
                          self.block_tables[:rows], self.positions[:rows] + 1, None, rows, 1)

    def _capture(self, rows: int):
        batch = self._batch(rows)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, cuBLAS and NCCL set up
            for _ in range(2):
                self.runner.forward(batch)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.runner.forward(batch)
        self.pool = graph.pool()
        return graph, logits

    def replay(self, plan: StepPlan, fill) -> torch.Tensor:
        rows = next(s for s in self.sizes if s >= plan.num_seqs)
        B, W = plan.block_tables.shape
        host = np.zeros((2, rows), dtype=np.int64)
        host[0, :B], host[1, :B] = plan.tokens, plan.positions
        tables = np.full((rows, self.block_tables.shape[1]), self.runner.scratch, dtype=np.int32)
        tables[:B, :W] = plan.block_tables
        staged = to_device(host, self.tokens.device)
        self.tokens[:rows].copy_(staged[0])
        fill(self.tokens[:rows])
        self.positions[:rows].copy_(staged[1])
        self.block_tables[:rows].copy_(to_device(tables, self.tokens.device))
        graph, logits = self.graphs[rows]
        graph.replay()
        if len(plan.sample_rows) == B:  # every decode row samples: the usual case
            return logits[:B]
        return logits[:B][to_device(plan.sample_rows, logits.device)]
