"""The Triton kernels behind `ft_runner.kernels.ops` (imported only where Triton is used).

All of them are memory-bound decode kernels: one row (or one (row, head)) per program, fp32
arithmetic on fp16/bf16/fp32 storage, no atomics, no host-side values that change per step (so
they can be captured in CUDA graphs: per-step values such as positions and the step counter are
read from device memory).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ft_runner.kernels import next_pow2

ACTIVATIONS = {None: 0, "gelu": 1, "relu": 2, "silu": 3, "gelu_exact": 4}


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), with tanh(u) = 2 sigmoid(2u) - 1
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _activate(y, ACT: tl.constexpr):
    if ACT == 1:
        y = _gelu_tanh(y)
    elif ACT == 2:
        y = tl.maximum(y, 0.0)
    elif ACT == 3:
        y = y * tl.sigmoid(y)
    elif ACT == 4:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


# ---------------------------------------------------------------------------------------------
# residual add + layernorm / RMSNorm


@triton.jit
def _add_norm_kernel(h_ptr, y_ptr, bias_ptr, w_ptr, b_ptr, h_out_ptr, x_out_ptr,
                     stride_h, stride_y, stride_ho, stride_xo, N, eps,
                     HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                     HAS_NORM_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_Y:
        h += tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if WRITE_H:
        tl.store(h_out_ptr + row * stride_ho + cols, h.to(h_out_ptr.dtype.element_ty), mask=mask)
        h = h.to(h_out_ptr.dtype.element_ty).to(tl.float32)  # normalise what the next layer will read
    if RMS:
        centred = h
    else:
        centred = tl.where(mask, h - tl.sum(h, axis=0) / N, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    x = centred * rstd * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM_BIAS:
        x += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_out_ptr + row * stride_xo + cols, x.to(x_out_ptr.dtype.element_ty), mask=mask)


def add_norm(h, y, bias, weight, norm_bias, eps: float, rms: bool):
    """See ops.add_norm."""
    M, N = h.shape
    write_h = y is not None or bias is not None
    h_out = torch.empty_like(h) if write_h else h
    x_out = torch.empty_like(h)
    block = next_pow2(N)
    _add_norm_kernel[(M,)](
        h, y if y is not None else h, bias if bias is not None else weight, weight,
        norm_bias if norm_bias is not None else weight, h_out, x_out,
        h.stride(0), y.stride(0) if y is not None else 0, h_out.stride(0), x_out.stride(0), N, eps,
        HAS_Y=y is not None, HAS_BIAS=bias is not None, WRITE_H=write_h, HAS_NORM_BIAS=norm_bias is not None,
        RMS=rms, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return h_out, x_out


# ---------------------------------------------------------------------------------------------
# GEMV: y (1, N) = act(x (1, K) W^T + b), W (N, K) row-major (torch's Linear layout)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn, act_cols,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    # a 2-D accumulator, reduced once at the end: no cross-lane reduction inside the K loop
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if GATED:  # rows [0, N) are the gate, rows [N, 2N) the up projection
        acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_rows = w_ptr + n[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + k).to(tl.float32)
        else:
            x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + k[None, :])
        else:
            w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0)
        acc += w.to(tl.float32) * x[None, :]
        if GATED:
            if EVEN_N and EVEN_K:
                u = tl.load(w_rows + N * stride_wn + k[None, :])
            else:
                u = tl.load(w_rows + N * stride_wn + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0)
            acc_up += u.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.sum(acc_up, axis=1)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + n, mask=n_mask, other=0.0).to(tl.float32)
        y = _activate(y, ACT) * up
    elif ACT != 0:
        y = tl.where(n < act_cols, _activate(y, ACT), y)
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def _gemv_config(N: int, K: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps); FT_RUNNER_GEMV="bn,bk,warps" overrides (for tuning)."""
    forced = os.environ.get("FT_RUNNER_GEMV")
    if forced:
        bn, bk, warps = (int(v) for v in forced.split(","))
        return bn, min(bk, next_pow2(K)), warps
    block_k = min(512, next_pow2(K))
    block_n = 4
    while block_n < 32 and N // (block_n * 2) >= 256:  # keep at least ~2 programs per SM
        block_n *= 2
    return block_n, block_k, 4


def gemv(x, weight, bias, act, gated, act_cols, out):
    """See ops.linear (M == 1)."""
    n_out = weight.shape[0] // (2 if gated else 1)
    K = weight.shape[1]
    assert x.stride(-1) == 1 and weight.stride(1) == 1
    if out is None:
        out = torch.empty((1, n_out), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = _gemv_config(n_out, K)
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else weight, out, n_out, K, weight.stride(0),
        n_out if act_cols is None else act_cols,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], GATED=gated, EVEN_N=n_out % block_n == 0, EVEN_K=K % block_k == 0,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


@triton.jit
def _act_kernel(y_ptr, b_ptr, out_ptr, N, stride_y, stride_o, act_cols,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if GATED:
        up = tl.load(y_ptr + row * stride_y + N + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + cols, mask=mask, other=0.0).to(tl.float32)
        y = _activate(y, ACT) * up
    elif ACT != 0:
        y = tl.where(cols < act_cols, _activate(y, ACT), y)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def activate(y, bias, act, gated=False, act_cols=None, out=None):
    """out = act(y + bias) (act on columns < act_cols); `gated`: y = [gate | up], out = act(gate) * up."""
    M, width = y.shape
    N = width // 2 if gated else width
    if out is None:
        out = torch.empty((M, N), dtype=y.dtype, device=y.device)
    block = min(1024, next_pow2(N))
    _act_kernel[(M, triton.cdiv(N, block))](y, bias if bias is not None else y, out, N, y.stride(0), out.stride(0),
                                            N if act_cols is None else act_cols,
                                            HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], GATED=gated,
                                            BLOCK=block,
                                            num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# decode attention: one new token per row, rotary, KV-cache append, GQA


@triton.jit
def _rope(x_ptr, d, x, pos, cos_ptr, sin_ptr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotate the first ROT features of x (fp32, loaded from x_ptr + d) by position pos."""
    HALF: tl.constexpr = ROT // 2
    if INTERLEAVED:  # GPT-J: pairs (2i, 2i+1)
        partner = d ^ 1
        sign = tl.where(d % 2 == 0, -1.0, 1.0)
        freq = d // 2
    else:  # GPT-NeoX / Llama: pairs (i, i + ROT/2)
        partner = tl.where(d < HALF, d + HALF, d - HALF)
        sign = tl.where(d < HALF, -1.0, 1.0)
        freq = d % HALF
    rot = d < ROT
    other = tl.load(x_ptr + partner, mask=rot, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * HALF + freq, mask=rot, other=1.0)
    sin = tl.load(sin_ptr + pos * HALF + freq, mask=rot, other=0.0)
    return tl.where(rot, x * cos + sign * other * sin, x)


@triton.jit
def _decode_attention_kernel(qkv_ptr, stride_qkv, k_cache, v_cache, stride_cb, stride_ch, stride_ct,
                             pos_ptr, cos_ptr, sin_ptr, out_ptr, stride_out, scale,
                             HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             ROT: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    GROUP: tl.constexpr = HQ // HKV
    hkv = hq // GROUP
    pos = tl.load(pos_ptr + b).to(tl.int32)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    row = qkv_ptr + b * stride_qkv
    q = tl.load(row + hq * D + d, mask=dm, other=0.0).to(tl.float32)
    k_new = tl.load(row + (HQ + hkv) * D + d, mask=dm, other=0.0).to(tl.float32)
    v_new = tl.load(row + (HQ + HKV + hkv) * D + d, mask=dm, other=0.0)
    if ROT > 0:
        q = _rope(row + hq * D, d, q, pos, cos_ptr, sin_ptr, ROT, INTERLEAVED)
        k_new = _rope(row + (HQ + hkv) * D, d, k_new, pos, cos_ptr, sin_ptr, ROT, INTERLEAVED)
    k_new = k_new.to(k_cache.dtype.element_ty)
    base = b * stride_cb + hkv * stride_ch
    if hq % GROUP == 0:  # one program per KV head appends the new key and value
        tl.store(k_cache + base + pos * stride_ct + d, k_new, mask=dm)
        tl.store(v_cache + base + pos * stride_ct + d, v_new.to(v_cache.dtype.element_ty), mask=dm)
    # the new token is attended from registers; the cache supplies positions [0, pos)
    q = q * scale
    m = tl.sum(q * k_new.to(tl.float32), axis=0)
    l_sum = 1.0
    acc = v_new.to(v_cache.dtype.element_ty).to(tl.float32)
    t_offs = tl.arange(0, BLOCK_T)
    for t0 in range(0, pos, BLOCK_T):
        t = t0 + t_offs
        tm = t < pos
        offs = base + t[:, None] * stride_ct + d[None, :]
        k = tl.load(k_cache + offs, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        s = tl.where(tm, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(v_cache + offs, mask=tm[:, None] & dm[None, :], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + b * stride_out + hq * D + d, (acc / l_sum).to(out_ptr.dtype.element_ty), mask=dm)


def decode_attention(qkv, k_cache, v_cache, positions, heads, kv_heads, head_dim, scale, rotary, out):
    """See ops.decode_attention."""
    B = qkv.shape[0]
    block_d = next_pow2(head_dim)
    cos, sin, rot, interleaved = rotary if rotary is not None else (qkv, qkv, 0, False)
    block_t = max(16, min(64, 8192 // block_d))
    _decode_attention_kernel[(B, heads)](
        qkv, qkv.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        positions, cos, sin, out, out.stride(0), scale,
        HQ=heads, HKV=kv_heads, D=head_dim, BLOCK_D=block_d, ROT=rot, INTERLEAVED=interleaved,
        BLOCK_T=block_t, num_warps=4 if block_d <= 128 else 8)
    return out


# ---------------------------------------------------------------------------------------------
# greedy sampling + the step's bookkeeping, one program per row


@triton.jit
def _greedy_step_kernel(logits_ptr, stride_part, stride_row, V, V_PART,
                        temp_ptr, end_ptr, out_len_ptr, len_ptr, step_ptr, max_pos, R,
                        reasons_ptr, produced_ptr, history_ptr, logprobs_ptr, next_ptr, pos_ptr,
                        BLOCK_V: tl.constexpr):
    b = tl.program_id(0)
    inv_t = 1.0 / tl.load(temp_ptr + b).to(tl.float32)
    offs = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    best = 0
    for v0 in range(0, V, BLOCK_V):
        v = v0 + offs
        vm = v < V
        # logits may come as (parts, R, V_PART): the TP ranks' vocabulary slices, unconcatenated
        z = tl.load(logits_ptr + (v // V_PART) * stride_part + b * stride_row + v % V_PART, mask=vm,
                    other=float("-inf")).to(tl.float32) * inv_t
        c_max = tl.max(z, axis=0)
        c_arg = tl.argmax(z, axis=0) + v0
        best = tl.where(c_max > m, c_arg, best)
        m_new = tl.maximum(m, c_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
    # the bookkeeping of StepState.record, for one row
    step = tl.load(step_ptr)
    code = tl.load(reasons_ptr + b)
    done = code != 0
    end = tl.load(end_ptr + b)
    token = tl.where(done, end, best.to(tl.int64))
    new_code = tl.where(token == end, 2, tl.where(step + 1 >= tl.load(out_len_ptr + b), 1, 0)).to(tl.int64)
    code = tl.where(done, code, new_code)
    tl.store(reasons_ptr + b, code)
    tl.store(produced_ptr + b, tl.load(produced_ptr + b) + tl.where(done, 0, 1))
    tl.store(history_ptr + step * 2 * R + b, token)
    tl.store(history_ptr + step * 2 * R + R + b, code)
    tl.store(logprobs_ptr + step * R + b, tl.where(done, 0.0, -tl.log(s)))
    tl.store(next_ptr + b, token)
    tl.store(pos_ptr + b, tl.minimum(tl.load(len_ptr + b) + step, max_pos))


def greedy_step(logits, vocab, state):
    """See ops.greedy_step; logits (R, V) or (parts, R, V_part)."""
    parts = logits if logits.dim() == 3 else logits[None]
    R = state.rows
    assert parts.shape[1] == R and parts.stride(2) == 1
    _greedy_step_kernel[(R,)](
        parts, parts.stride(0), parts.stride(1), vocab, parts.shape[2],
        state.temperature, state.end_id, state.out_lens, state.lengths, state.step, state.max_pos, R,
        state.reasons, state.produced, state.history, state.logprobs, state.next_tokens, state.positions,
        BLOCK_V=4096, num_warps=8)
