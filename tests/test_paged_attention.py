"""ops.paged_decode_attention and ops.prefill_attention (the paged KV cache's attention), in plain torch.

The torch references against independent computations: the contiguous ops.decode_attention, dense
causal attention over each whole sequence, and each other (prefill stores what token-by-token decode
would). The Triton kernels against these references run through Triton's interpreter in a subprocess
(skipped where Triton is not installed).
"""

import subprocess
import sys

import pytest
import torch
from helpers import ROOT, mpi_env

from ft_runner.kernels import ops
from ft_runner.kernels.selfcheck import reference

BLOCK = 8  # the cache's block size: small, so that sequences span several blocks


@pytest.fixture(autouse=True)
def torch_references():
    """The torch references even where TRITON_INTERPRET=1 would route ops to the kernels."""
    with reference():
        yield


def rotary_for(rot: int, interleaved: bool, length: int = 128):
    if not rot:
        return None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    return (*ops.rope_tables(inv_freq, length), rot, interleaved)


def paged_cache(num_blocks: int, kv_heads: int, head_dim: int):
    return [torch.randn(num_blocks, kv_heads, BLOCK, head_dim) for _ in range(2)]


def shuffled_tables(rows: int, max_blocks: int, num_blocks: int, seed: int = 0) -> torch.Tensor:
    """Each row's blocks: distinct, in random order across the cache."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[: rows * max_blocks].view(rows, max_blocks).int()


def to_contiguous(cache, tables):
    """(rows, kv_heads, max_blocks BLOCK, D): each row's positions in order."""
    return cache[tables.long()].transpose(1, 2).flatten(2, 3)


def rel_err(got, want) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def split(qkv, heads, kv_heads, head_dim):
    """(N, width) -> q (heads, N, D), k and v (kv_heads, N, D)."""
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    return (x.reshape(x.shape[0], x.shape[1] // head_dim, head_dim).transpose(0, 1) for x in (q, k, v))


def rotate(x, rotary):
    """x (h, N, D) at positions 0..N-1."""
    if rotary is None:
        return x
    pos = torch.arange(x.shape[1])
    return ops.apply_rope(x.transpose(0, 1), pos, *rotary).transpose(0, 1)


def dense_attention(qkv, heads, kv_heads, head_dim, scale, rotary, window=0, slopes=None):
    """Causal attention over one whole sequence qkv (L, width), positions 0..L-1: (L, heads D)."""
    q, k, v = split(qkv, heads, kv_heads, head_dim)
    q, k = rotate(q, rotary).double(), rotate(k, rotary).double()
    group = heads // kv_heads
    k, v = k.repeat_interleave(group, 0), v.double().repeat_interleave(group, 0)
    L = qkv.shape[0]
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # p' - p
    allowed = (rel <= 0) & ((rel > -window) if window else True)
    scores = q @ k.transpose(1, 2) * scale
    if slopes is not None:
        scores = scores + slopes.double()[:, None, None] * rel
    o = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
    return o.transpose(0, 1).reshape(L, heads * head_dim)


def store_context(cache, tables, b, qkv, heads, kv_heads, head_dim, rotary):
    """Put positions 0..len(qkv)-1 of sequence b (its rotated k, its v) into the cache directly."""
    _, k, v = split(qkv, heads, kv_heads, head_dim)
    k = rotate(k, rotary)
    for t in range(qkv.shape[0]):
        block = tables[b, t // BLOCK]
        cache[0][block, :, t % BLOCK] = k[:, t]
        cache[1][block, :, t % BLOCK] = v[:, t]


SHAPES = [(4, 4, 16), (8, 2, 32)]  # (heads, kv_heads, head_dim): MHA, GQA
ROTARY = [(0, False), (16, False), (8, True)]  # none, halves (partial), interleaved (partial)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("rot,interleaved", ROTARY)
def test_paged_decode_equals_contiguous_decode(heads, kv_heads, head_dim, rot, interleaved):
    torch.manual_seed(0)
    B, max_blocks, num_blocks = 4, 5, 23
    tables = shuffled_tables(B, max_blocks, num_blocks)
    cache = paged_cache(num_blocks, kv_heads, head_dim)
    dense = [to_contiguous(c, tables).clone() for c in cache]
    qkv = torch.randn(B, (heads + 2 * kv_heads) * head_dim + 8)[:, 8:]  # a strided view
    positions = torch.tensor([0, 7, 8, max_blocks * BLOCK - 1])
    rotary = rotary_for(rot, interleaved)
    wide = torch.full((B, heads * head_dim + 4), float("nan"))
    got = ops.paged_decode_attention(qkv, *cache, tables, positions, heads, kv_heads, head_dim, 0.3, rotary,
                                     out=wide[:, 4:])
    want = ops.decode_attention(qkv, *dense, positions, heads, kv_heads, head_dim, 0.3, rotary)
    assert got.data_ptr() == wide[:, 4:].data_ptr()
    assert rel_err(got, want) < 1e-5
    for c, d in zip(cache, dense):  # the new tokens landed where the contiguous op put them
        assert torch.equal(to_contiguous(c, tables), d)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_padding_rows_store_nothing(heads, kv_heads, head_dim):
    torch.manual_seed(1)
    B, max_blocks, num_blocks = 4, 3, 12
    tables = shuffled_tables(B, max_blocks, num_blocks)
    tables[1] = tables[0]  # padding rows' tables may alias live rows' blocks
    tables[3] = 0
    cache = paged_cache(num_blocks, kv_heads, head_dim)
    before = [c.clone() for c in cache]
    qkv = torch.randn(B, (heads + 2 * kv_heads) * head_dim)
    positions = torch.tensor([5, -1, 9, -1])
    rotary = rotary_for(16, False)
    out = ops.paged_decode_attention(qkv, *cache, tables, positions, heads, kv_heads, head_dim, 0.3, rotary)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    live = [0, 2]
    want = ops.paged_decode_attention(qkv[live], *before, tables[live], positions[live], heads, kv_heads, head_dim,
                                      0.3, rotary)
    assert rel_err(out[live], want) < 1e-6
    for c, b in zip(cache, before):  # `before` now holds the live rows' writes only
        assert torch.equal(c, b)


def prefill_case(heads, kv_heads, head_dim, lengths, contexts, rotary, window=0, slopes=None, seed=0):
    """Sequences of `lengths` tokens whose first `contexts` positions are cached; prefill the rest
    in one call: (got (N, heads D), dense reference rows, qkv of each whole sequence, cache, tables)."""
    torch.manual_seed(seed)
    width = (heads + 2 * kv_heads) * head_dim
    seqs = [torch.randn(n, width) for n in lengths]
    max_blocks = -(-max(lengths) // BLOCK)
    num_blocks = len(lengths) * max_blocks + 3
    tables = shuffled_tables(len(lengths), max_blocks, num_blocks, seed)
    cache = paged_cache(num_blocks, kv_heads, head_dim)
    for b, (s, ctx) in enumerate(zip(seqs, contexts)):
        store_context(cache, tables, b, s[:ctx], heads, kv_heads, head_dim, rotary)
    chunks = [s[ctx:] for s, ctx in zip(seqs, contexts)]
    cu = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0).int()
    got = ops.prefill_attention(torch.cat(chunks), *cache, tables, cu, torch.tensor(contexts).int(),
                                max(len(c) for c in chunks), heads, kv_heads, head_dim, 0.3, rotary, window, slopes)
    want = torch.cat([dense_attention(s, heads, kv_heads, head_dim, 0.3, rotary, window, slopes)[ctx:]
                      for s, ctx in zip(seqs, contexts)])
    return got, want, seqs, cache, tables


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("rot,interleaved", ROTARY)
def test_prefill_equals_dense_causal_attention(heads, kv_heads, head_dim, rot, interleaved):
    got, want, *_ = prefill_case(heads, kv_heads, head_dim, [30, 17, 9, 40], [12, 0, 8, 39],
                                 rotary_for(rot, interleaved))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("window,alibi", [(5, False), (0, True), (9, True), (1, False)])
def test_prefill_window_and_alibi(window, alibi):
    heads, kv_heads, head_dim = 8, 2, 16
    slopes = 2.0 ** (-torch.arange(1, heads + 1).float() / 2) if alibi else None
    got, want, *_ = prefill_case(heads, kv_heads, head_dim, [30, 17, 25], [12, 0, 24], None, window, slopes)
    assert rel_err(got, want) < 1e-5


def test_prefill_in_chunks_equals_one_prefill():
    """Chunk by chunk through the op itself: each chunk attends to the keys earlier calls stored."""
    heads, kv_heads, head_dim = 8, 2, 16
    rotary = rotary_for(16, False)
    torch.manual_seed(3)
    seqs = [torch.randn(n, (heads + 2 * kv_heads) * head_dim) for n in (29, 11)]
    tables = shuffled_tables(2, 4, 10)
    cache = paged_cache(10, kv_heads, head_dim)
    outs = [[], []]
    for lo, hi in ((0, 13), (13, 14), (14, 29)):
        chunks = [s[lo:hi] for s in seqs]
        cu = torch.tensor([0] + [len(c) for c in chunks]).cumsum(0).int()
        ctx = torch.tensor([min(lo, len(s)) for s in seqs]).int()
        out = ops.prefill_attention(torch.cat(chunks), *cache, tables, cu, ctx, max(len(c) for c in chunks),
                                    heads, kv_heads, head_dim, 0.3, rotary)
        for b in range(2):
            outs[b].append(out[cu[b]:cu[b + 1]])
    for b, s in enumerate(seqs):
        assert rel_err(torch.cat(outs[b]), dense_attention(s, heads, kv_heads, head_dim, 0.3, rotary)) < 1e-5


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
def test_prefill_stores_what_decode_stores(heads, kv_heads, head_dim):
    """Prefill of whole sequences and token-by-token paged decode (rows past their sequence padded)
    leave identical caches and give the same outputs."""
    rotary = rotary_for(8, True)
    lengths = [21, 6, 16]
    got, _, seqs, cache, tables = prefill_case(heads, kv_heads, head_dim, lengths, [0, 0, 0], rotary, seed=5)
    stepped = paged_cache(cache[0].shape[0], kv_heads, head_dim)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    width = seqs[0].shape[1]
    for t in range(max(lengths)):
        qkv = torch.stack([s[t] if t < len(s) else torch.zeros(width) for s in seqs])
        positions = torch.tensor([t if t < len(s) else -1 for s in seqs])
        out = ops.paged_decode_attention(qkv, *stepped, tables, positions, heads, kv_heads, head_dim, 0.3, rotary)
        for b, s in enumerate(seqs):
            if t < len(s):
                assert rel_err(out[b], got[starts[b] + t]) < 1e-5
    for c, s in zip(cache, stepped):
        for b, n in enumerate(lengths):  # every position of every sequence
            assert torch.equal(to_contiguous(c, tables)[b, :, :n], to_contiguous(s, tables)[b, :, :n])


def test_triton_kernels_match_torch_references():
    pytest.importorskip("triton")
    # TRITON_INTERPRET must be set before triton is first imported, so this runs in its own process
    result = subprocess.run([sys.executable, "-m", "ft_runner.kernels.selfcheck", "--device", "cpu",
                             "--only", "paged,prefill"],
                            env=mpi_env(TRITON_INTERPRET="1"), cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "SELFCHECK ok" in output, output
