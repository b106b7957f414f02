"""The decode step's fused ops: a Triton kernel on GPUs, the torch reference elsewhere.

Shapes: activations are (M, features) rows, one row per sequence; weights are torch Linear's
(out, in), or a model.quant.QuantizedWeight (int8 or e4m3 with per-output-channel scales).
Reductions run in fp32 whatever the storage dtype. A paged KV cache may hold e4m3 with a
`kv_scale` (2,) fp32 per layer: stored = e4m3(k / kv_scale[0]) (keys), e4m3(v / kv_scale[1]) (values).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ft_runner.kernels import use_triton
from ft_runner.model import quant
from ft_runner.model.layers import vocab_slice_lookup


def _triton():
    from ft_runner.kernels import triton_ops

    return triton_ops


def embed(ids, positions, wte, start: int = 0, wpe=None):
    """ids, positions (M,) -> (M, H): rows wte[ids - start] (zero for ids outside this rank's
    vocabulary slice [start, start + rows)), plus wpe[positions] when the model learns positions."""
    if use_triton(wte):
        return _triton().embed(ids, positions, wte, start, wpe)
    h = vocab_slice_lookup(ids, wte, start).float()
    if wpe is not None:
        h = h + F.embedding(positions, wpe).float()
    return h.to(wte.dtype)


def add_norm(h, y, bias, weight, norm_bias, eps: float, rms: bool = False):
    """(h + y + bias, norm(h + y + bias)): the residual stream and its layernorm (RMSNorm if `rms`).

    `y` and `bias` may be None; h comes back as is when both are.
    """
    if use_triton(h):
        return _triton().add_norm(h, y, bias, weight, norm_bias, eps, rms)
    if y is not None or bias is not None:
        total = h.float() + (y.float() if y is not None else 0) + (bias.float() if bias is not None else 0)
        h = total.to(h.dtype)
    x = h.float()
    if not rms:
        x = x - x.mean(-1, keepdim=True)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    if norm_bias is not None:
        x = x + norm_bias.float()
    return h, x.to(h.dtype)


ACTIVATIONS = ("gelu", "gelu_exact", "relu", "silu")


def _torch_activate(y, act, gated=False, act_cols=None):
    if act_cols is not None:
        return torch.cat([_torch_activate(y[:, :act_cols], act), y[:, act_cols:]], dim=1)
    if gated:
        gate, up = y.chunk(2, dim=-1)
        return _torch_activate(gate, act) * up
    if act == "gelu":
        return F.gelu(y, approximate="tanh")  # GPT-2's gelu_new, FT's Gelu
    if act == "gelu_exact":
        return F.gelu(y)
    if act == "relu":
        return F.relu(y)
    if act == "silu":
        return F.silu(y)
    return y


def _few_rows(x) -> bool:
    """Does ops.linear take the few-row Triton GEMM for x?"""
    return (use_triton(x) and 1 < x.shape[0] <= _triton().SKINNY_MAX_ROWS
            and os.environ.get("FT_RUNNER_GEMM", "") != "cublas")


def linear(x, weight, bias=None, act: str | None = None, gated: bool = False, act_cols: int | None = None,
           out=None, norm=None, residual=None):
    """act(norm(x) W^T + b) + residual -> (M, N), into `out` if given (it may be a column slice of a
    wider buffer).

    act: None or one of ACTIVATIONS; `gated`: W = [W_gate; W_up] and the result is act(gate) * up
    (SwiGLU, GeGLU; N = rows / 2); `act_cols` limits the activation to output columns [0, act_cols)
    (a parallel block's fused MLP + QKV projection). norm: None or (weight, bias, eps, rms), the
    norm applied to x first, optionally followed by the fp32 sums (W weight, W bias) that let the
    GPU kernel fold it into the product (`fold_norm`); residual: (M, N) added last. At M == 1 on a
    GPU all of it is one kernel; at 2..64 rows a norm kernel and one few-row GEMM with the rest.
    A QuantizedWeight: see quantized_linear.
    """
    if quant.is_quantized(weight):
        return quantized_linear(x, weight, bias, act, gated, act_cols, out, norm, residual)
    if use_triton(x) and x.shape[0] == 1 and os.environ.get("FT_RUNNER_GEMV", "") != "cublas":
        return _triton().gemv(x, weight, bias, act, gated, act_cols, out, norm, residual)
    if norm is not None:
        x = add_norm(x, None, None, *norm[:4])[1]
    if _few_rows(x):
        return _triton().skinny_linear(x, weight, bias, act, gated, act_cols, out, residual)
    if use_triton(x):
        if act is None and out is None and residual is None:
            return F.linear(x, weight, bias)
        return _epilogue(F.linear(x, weight), bias, act, gated, act_cols, out, residual)
    return _finish(_torch_activate(F.linear(x, weight, bias), act, gated, act_cols), out, residual)


def _epilogue(y, bias, act, gated, act_cols, out, residual, dtype=None):
    """A cuBLAS product's bias and activation in one kernel, then the residual (into `out`, in `dtype`)."""
    if out is None and dtype is not None and dtype != y.dtype:
        out = torch.empty((y.shape[0], y.shape[1] // (2 if gated else 1)), dtype=dtype, device=y.device)
    y = _triton().activate(y, bias, act, gated, act_cols, out if residual is None else None)
    return _finish(y, out, residual, dtype)


def _finish(y, out, residual, dtype=None):
    """y + residual (in fp32) in `dtype` (default y's), into `out` if given."""
    dtype = dtype or y.dtype
    if residual is not None:
        y = (y.float() + residual.float()).to(dtype)
    y = y.to(dtype)
    if out is None:
        return y
    if y.data_ptr() != out.data_ptr():
        out.copy_(y)
    return out


def quantized_linear(x, weight: quant.QuantizedWeight, bias=None, act: str | None = None, gated: bool = False,
                     act_cols: int | None = None, out=None, norm=None, residual=None):
    """ops.linear with a quantized weight: y = scale[n] sum_k x[m, k] q[n, k] in fp32, then the bias,
    activation and residual as ops.linear; the result in x's dtype. int8_wo keeps x as it is; fp8
    first rounds each row of x to e4m3 with its own scale (quantize_rows_fp8), y then carrying it too.
    A norm is applied first (the folded sums are not used). On GPUs: one GEMV (1 row) or few-row GEMM
    (2..64 rows) that converts the weights in registers; more rows dequantize int8 for cuBLAS, and
    fp8 goes through torch._scaled_mm."""
    dtype = x.dtype
    if norm is not None:
        x = add_norm(x, None, None, *norm[:4])[1]
    x_scale = None
    if weight.kind == "fp8":
        x, x_scale = quantize_rows_fp8(x)
    if use_triton(x):
        if x.shape[0] <= _triton().SKINNY_MAX_ROWS and os.environ.get("FT_RUNNER_GEMM", "") != "cublas":
            return _triton().quantized_linear(x, x_scale, weight.q, weight.scale, dtype, bias, act, gated, act_cols,
                                              out, residual)
        if weight.kind == "int8_wo":
            dense = _triton().dequantize(weight.q, weight.scale, dtype)
            return linear(x, dense, bias, act, gated, act_cols, out, None, residual)
        y = _triton().fp8_matmul(x, x_scale, weight.q, weight.scale, dtype)
        return _epilogue(y, bias, act, gated, act_cols, out, residual, dtype)
    x32 = x.float() if x_scale is None else x.float() * x_scale[:, None]
    y = F.linear(x32, weight.dequantize(), None if bias is None else bias.float())
    return _finish(_torch_activate(y, act, gated, act_cols), out, residual, dtype)


def quantize_rows_fp8(x):
    """x (M, K) -> (e4m3 (M, K), fp32 (M,)): each row over its own scale max|x| / 448 (model.quant)."""
    if use_triton(x):
        return _triton().quantize_rows_fp8(x)
    return quant.quantize_rows_fp8(x)


def fold_norm(norm_weight, norm_bias, weight) -> tuple:
    """(W g, W b) in fp32 for a norm (g, b) feeding `weight` (N, K): see triton_ops._gemv_kernel."""
    w = weight.float()
    return (w @ norm_weight.float()).contiguous(), None if norm_bias is None else (w @ norm_bias.float()).contiguous()


def rope_tables(inv_freq: torch.Tensor, max_len: int):
    """(cos, sin), fp32 (max_len, rot/2): the angle is position * inv_freq, in fp32 as HF computes it."""
    angles = torch.arange(max_len, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    return torch.cos(angles).contiguous(), torch.sin(angles).contiguous()


def apply_rope(x, positions, cos, sin, rot: int, interleaved: bool):
    """x (B, heads, D); rotate the first `rot` features of each head by each row's position."""
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]
    xr = x[..., :rot].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return torch.cat([out.to(x.dtype), x[..., rot:]], dim=-1)


def decode_attention(qkv, k_cache, v_cache, positions, heads: int, kv_heads: int, head_dim: int, scale: float,
                     rotary=None, out=None):
    """One new token per row: rotate q and k, append k and v to the cache, attend to keys 0..pos.

    qkv (B, (heads + 2 kv_heads) head_dim) as [q | k | v]; caches (≥B, kv_heads, T, head_dim);
    positions (B,) int64, the new token's slot; rotary None or (cos, sin, rot_dim, interleaved).
    Writes (B, heads head_dim) into `out` (which may be a column slice of a wider buffer).
    """
    B = qkv.shape[0]
    if out is None:
        out = torch.empty((B, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if use_triton(qkv):
        return _triton().decode_attention(qkv, k_cache, v_cache, positions, heads, kv_heads, head_dim, scale,
                                          rotary, out)
    q, k, v = _split_qkv(qkv, heads, kv_heads, head_dim, positions, rotary)
    rows = torch.arange(B, device=qkv.device)
    k_cache[rows, :, positions] = k.to(k_cache.dtype)
    v_cache[rows, :, positions] = v.to(v_cache.dtype)
    keys, values = k_cache[:B], v_cache[:B]
    if heads != kv_heads:
        keys = keys.repeat_interleave(heads // kv_heads, dim=1)
        values = values.repeat_interleave(heads // kv_heads, dim=1)
    mask = (torch.arange(keys.shape[2], device=qkv.device)[None, :] <= positions[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q[:, :, None, :].to(keys.dtype), keys, values, attn_mask=mask, scale=scale)
    out.copy_(o.reshape(B, heads * head_dim))
    return out


def _split_qkv(qkv, heads: int, kv_heads: int, head_dim: int, positions, rotary):
    """qkv (N, (heads + 2 kv_heads) head_dim) -> q (N, heads, D), k and v (N, kv_heads, D), q and k
    rotated by `positions` (N,) when rotary is (cos, sin, rot_dim, interleaved)."""
    N = qkv.shape[0]
    q = qkv[:, : heads * head_dim].view(N, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(N, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(N, kv_heads, head_dim)
    if rotary is not None:
        cos, sin, rot, interleaved = rotary
        q, k = apply_rope(q, positions, cos, sin, rot, interleaved), apply_rope(k, positions, cos, sin, rot, interleaved)
    return q, k, v


def _paged_store(k_cache, v_cache, blocks, positions, k, v, kv_scale=None) -> None:
    """Store k, v (R, kv_heads, D) at `positions` (R,) of the sequences whose block table rows are
    `blocks` (R, max_blocks), in caches (num_blocks, kv_heads, block_size, D) (e4m3 over `kv_scale`)."""
    size = k_cache.shape[2]
    slots = blocks.gather(1, (positions // size)[:, None])[:, 0].long()
    k_cache[slots, :, positions % size] = _to_cache(k, k_cache.dtype, kv_scale, 0)
    v_cache[slots, :, positions % size] = _to_cache(v, v_cache.dtype, kv_scale, 1)


def _to_cache(x, dtype, kv_scale, which: int):
    """x as the cache stores it: e4m3(x / kv_scale[which]) for a scaled cache, else x in `dtype`."""
    return x.to(dtype) if kv_scale is None else quant.to_fp8(x.float() / kv_scale[which])


def _paged_gather(cache, blocks, length: int, kv_scale=None, which: int = 0, dtype=None):
    """Positions 0..length-1 of each sequence, (B, kv_heads, length, D), from its block table row
    (blocks (B, max_blocks)) in a cache (num_blocks, kv_heads, block_size, D); a scaled cache's
    entries come back as kv_scale[which] * e4m3 in `dtype`."""
    t = torch.arange(length, device=cache.device)
    size = cache.shape[2]
    ids = blocks[:, t // size].long().clamp(0, cache.shape[0] - 1)  # unused table entries may hold anything
    out = cache[ids, :, t % size].transpose(1, 2)
    return out if kv_scale is None else (out.float() * kv_scale[which]).to(dtype)


def _expand_kv(x, heads: int):
    """(B, kv_heads, T, D) -> (B, heads, T, D): query head h reads KV head h // (heads / kv_heads)."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def paged_decode_attention(qkv, k_cache, v_cache, block_tables, positions, heads: int, kv_heads: int, head_dim: int,
                           scale: float, rotary=None, out=None, kv_scale=None):
    """decode_attention over a paged cache: one new token per row; rotate q and k, store k and v at
    the row's position, attend to positions 0..pos.

    qkv (B, (heads + 2 kv_heads) head_dim) as [q | k | v] (rows may be strided); caches (num_blocks,
    kv_heads, block_size, head_dim), block_size a power of two >= 8; block_tables (B, max_blocks)
    int32: position t of row b lives in block block_tables[b, t // block_size] at offset
    t % block_size; positions (B,) int64, the new token's position, < 0 for a padding row (it stores
    nothing and its output row is zeros); rotary None or (cos, sin, rot_dim, interleaved). Writes
    (B, heads head_dim) into `out` (which may be a column slice of a wider buffer) and returns it.
    kv_scale: None, or (2,) fp32 for e4m3 caches (the module docstring). (The torch reference selects
    the live rows with a boolean mask: a host sync on GPUs.)
    """
    B = qkv.shape[0]
    if out is None:
        out = torch.empty((B, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if use_triton(qkv):
        return _triton().paged_decode_attention(qkv, k_cache, v_cache, block_tables, positions, heads, kv_heads,
                                                head_dim, scale, rotary, out, kv_scale)
    live = positions >= 0
    pos = positions.clamp_min(0)
    q, k, v = _split_qkv(qkv, heads, kv_heads, head_dim, pos, rotary)
    _paged_store(k_cache, v_cache, block_tables[live], pos[live], k[live], v[live], kv_scale)
    length = block_tables.shape[1] * k_cache.shape[2]
    mask = (torch.arange(length, device=qkv.device)[None, :] <= pos[:, None])[:, None, :, None]  # (B, 1, T, 1)
    # positions past pos may never have been written (NaN in a fresh cache would leak through 0 weights)
    keys = _expand_kv(_paged_gather(k_cache, block_tables, length, kv_scale, 0, qkv.dtype).where(mask, 0), heads)
    values = _expand_kv(_paged_gather(v_cache, block_tables, length, kv_scale, 1, qkv.dtype).where(mask, 0), heads)
    o = F.scaled_dot_product_attention(q[:, :, None, :].to(keys.dtype), keys, values,
                                       attn_mask=mask.transpose(2, 3), scale=scale)
    out.copy_(torch.where(live[:, None], o.reshape(B, heads * head_dim), 0))
    return out


def prefill_attention(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, max_query_len: int, heads: int,
                      kv_heads: int, head_dim: int, scale: float, rotary=None, window: int = 0, slopes=None, out=None,
                      kv_scale=None):
    """Attention for chunks of new tokens of B sequences over a paged cache (chunked prefill).

    qkv (N, (heads + 2 kv_heads) head_dim) as [q | k | v]: sequence b's chunk is rows
    [cu_seqlens[b], cu_seqlens[b + 1]) (cu_seqlens (B + 1,) int32), its token i at position
    context_lens[b] + i (context_lens (B,) int32: positions already cached); max_query_len: the
    longest chunk (a host int, for the grid). Caches and block_tables (B, max_blocks) as in
    paged_decode_attention. Rotates q and k by position (rotary as there), stores every token's k
    and v, and lets a query at position p attend to cached positions max(0, p - window + 1)..p
    (window 0: 0..p) with the additive bias slopes[h] (p' - p) when `slopes` (fp32 (heads,), ALiBi)
    is given. Writes (N, heads head_dim) into `out` (may be a column slice) and returns it. kv_scale:
    as in paged_decode_attention.
    """
    N = qkv.shape[0]
    if out is None:
        out = torch.empty((N, heads * head_dim), dtype=qkv.dtype, device=qkv.device)
    if use_triton(qkv):
        return _triton().prefill_attention(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens,
                                           max_query_len, heads, kv_heads, head_dim, scale, rotary, window, slopes,
                                           out, kv_scale)
    bounds, contexts = cu_seqlens.tolist(), context_lens.tolist()
    for b, ctx in enumerate(contexts):
        first, last = bounds[b], bounds[b + 1]
        if last > first:
            rows = slice(first, last)
            out[rows] = _prefill_one(qkv[rows], k_cache, v_cache, block_tables[b:b + 1], ctx, heads, kv_heads,
                                     head_dim, scale, rotary, window, slopes, kv_scale).to(out.dtype)
    return out


def _prefill_one(qkv, k_cache, v_cache, blocks, ctx: int, heads, kv_heads, head_dim, scale, rotary, window, slopes,
                 kv_scale):
    """prefill_attention for one sequence's chunk (n rows, block table row `blocks` (1, max_blocks)):
    (n, heads head_dim) in fp32."""
    n = qkv.shape[0]
    pos = torch.arange(ctx, ctx + n, device=qkv.device)
    q, k, v = _split_qkv(qkv, heads, kv_heads, head_dim, pos, rotary)
    _paged_store(k_cache, v_cache, blocks.expand(n, -1), pos, k, v, kv_scale)
    keys = _expand_kv(_paged_gather(k_cache, blocks, ctx + n, kv_scale, 0, qkv.dtype), heads)[0].float()
    values = _expand_kv(_paged_gather(v_cache, blocks, ctx + n, kv_scale, 1, qkv.dtype), heads)[0].float()
    t = torch.arange(ctx + n, device=qkv.device)
    rel = (t[None, :] - pos[:, None]).float()  # (n, ctx + n): p' - p
    allowed = rel <= 0
    if window > 0:
        allowed &= rel > -window
    bias = torch.zeros(heads, n, ctx + n, device=qkv.device).masked_fill(~allowed, float("-inf"))
    if slopes is not None:
        bias = bias + slopes.float()[:, None, None] * rel
    o = F.scaled_dot_product_attention(q.transpose(0, 1).to(k_cache.dtype if kv_scale is None else qkv.dtype).float(),
                                       keys, values, attn_mask=bias, scale=scale)
    return o.transpose(0, 1).reshape(n, heads * head_dim)


def greedy_step(logits, vocab: int, state) -> None:
    """Greedy tokens from logits (R, V) or (TP parts, R, V_part), recorded into `state` (StepState)."""
    if use_triton(logits):
        _triton().greedy_step(logits, vocab, state)
        state.step += 1
        state.end_on_other_ends()  # the kernel knows each row's end_id only
        return
    full = logits if logits.dim() == 2 else logits.permute(1, 0, 2).reshape(logits.shape[1], -1)
    scaled = full[:, :vocab].float() / state.temperature[:, None]
    tokens = torch.argmax(scaled, dim=-1)
    state.record(tokens, torch.log_softmax(scaled, dim=-1).gather(1, tokens[:, None])[:, 0])
