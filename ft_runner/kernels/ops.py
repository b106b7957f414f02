"""The decode step's fused ops: a Triton kernel on GPUs, the torch reference elsewhere.

Shapes: activations are (M, features) rows, one row per sequence; weights are torch Linear's
(out, in). Reductions run in fp32 whatever the storage dtype.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ft_runner.kernels import use_triton
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
    """
    if use_triton(x) and x.shape[0] == 1 and os.environ.get("FT_RUNNER_GEMV", "") != "cublas":
        return _triton().gemv(x, weight, bias, act, gated, act_cols, out, norm, residual)
    if norm is not None:
        x = add_norm(x, None, None, *norm[:4])[1]
    if _few_rows(x):
        return _triton().skinny_linear(x, weight, bias, act, gated, act_cols, out, residual)
    if use_triton(x):
        if act is None and out is None and residual is None:
            return F.linear(x, weight, bias)
        y = _triton().activate(F.linear(x, weight), bias, act, gated, act_cols, out if residual is None else None)
    else:
        y = _torch_activate(F.linear(x, weight, bias), act, gated, act_cols)
    if residual is not None:
        y = (y.float() + residual.float()).to(y.dtype)
    if out is None:
        return y
    if y.data_ptr() != out.data_ptr():
        out.copy_(y)
    return out


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
    q = qkv[:, : heads * head_dim].view(B, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(B, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(B, kv_heads, head_dim)
    if rotary is not None:
        cos, sin, rot, interleaved = rotary
        q, k = apply_rope(q, positions, cos, sin, rot, interleaved), apply_rope(k, positions, cos, sin, rot, interleaved)
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
