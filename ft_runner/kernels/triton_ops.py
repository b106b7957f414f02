"""The Triton kernels behind `ft_runner.kernels.ops` (imported only where Triton is used).

All of them are memory-bound decode kernels: fp32 arithmetic (tensor-core products with fp32
accumulation in the few-row GEMM and the attention) on fp16/bf16/fp32 storage, and no host-side
values that change per step (so they can be captured in CUDA graphs: per-step values such as
positions and the step counter are read from device memory). Kernels split over several programs
merge in the last one to finish, counted by an atomic, in a fixed order (results never depend
on timing).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ft_runner.kernels import next_pow2

ACTIVATIONS = {None: 0, "gelu": 1, "relu": 2, "silu": 3, "gelu_exact": 4}
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def pdl(device: torch.device, programs: int) -> bool:
    """Launch a kernel of `programs` programs with programmatic dependent launch (Hopper and later)?

    A kernel launched so may start while the previous one is still running: it loads what does not
    depend on that kernel (weights) and then waits (`_wait_for_inputs`) for the rest. In a CUDA graph
    of ~100 small decode kernels this hides most of each launch's ramp-up. Kernels of more than
    FT_RUNNER_PDL_PROGRAMS programs launch plainly; FT_RUNNER_PDL=0 turns it off."""
    if device.type != "cuda" or os.environ.get("FT_RUNNER_PDL", "1") == "0" or not _sm90(device.index):
        return False
    return programs <= int(os.environ.get("FT_RUNNER_PDL_PROGRAMS", 2048))


@functools.cache
def _sm90(index) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """Under PDL: wait until the previous kernel has finished and its writes are visible, then let the
    next kernel begin launching. Every kernel launched with PDL calls this before it reads anything
    but weights and before it writes anything, so the ordering of the stream still holds."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


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
# token (+ learned position) embedding


@triton.jit
def _embed_kernel(ids_ptr, pos_ptr, wte_ptr, wpe_ptr, out_ptr, start, vocab_local, N,
                  HAS_POS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    _wait_for_inputs(PDL)
    token = tl.load(ids_ptr + row) - start
    inside = (token >= 0) & (token < vocab_local)  # this rank's slice of the vocabulary
    token = tl.where(inside, token, 0)
    e = tl.load(wte_ptr + token * N + cols, mask=mask & inside, other=0.0).to(tl.float32)
    if HAS_POS:
        e += tl.load(wpe_ptr + tl.load(pos_ptr + row) * N + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + cols, e.to(out_ptr.dtype.element_ty), mask=mask)


def embed(ids, positions, wte, start: int, wpe):
    """See ops.embed."""
    M, N = ids.shape[0], wte.shape[1]
    out = torch.empty((M, N), dtype=wte.dtype, device=wte.device)
    block = min(1024, next_pow2(N))
    grid = (M, triton.cdiv(N, block))
    on = pdl(wte.device, grid[0] * grid[1])
    _embed_kernel[grid](ids, positions, wte, wpe if wpe is not None else wte, out, start, wte.shape[0], N,
                        HAS_POS=wpe is not None, BLOCK=block, PDL=on, launch_pdl=on, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------------
# residual add + layernorm / RMSNorm


@triton.jit
def _add_norm_kernel(h_ptr, y_ptr, bias_ptr, w_ptr, b_ptr, h_out_ptr, x_out_ptr,
                     stride_h, stride_y, stride_ho, stride_xo, N, eps,
                     HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_H: tl.constexpr,
                     HAS_NORM_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    _wait_for_inputs(PDL)
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
    on = pdl(h.device, M)
    _add_norm_kernel[(M,)](
        h, y if y is not None else h, bias if bias is not None else weight, weight,
        norm_bias if norm_bias is not None else weight, h_out, x_out,
        h.stride(0), y.stride(0) if y is not None else 0, h_out.stride(0), x_out.stride(0), N, eps,
        HAS_Y=y is not None, HAS_BIAS=bias is not None, WRITE_H=write_h, HAS_NORM_BIAS=norm_bias is not None,
        RMS=rms, BLOCK=block, PDL=on, launch_pdl=on, num_warps=min(16, max(1, block // 256)))
    return h_out, x_out


# ---------------------------------------------------------------------------------------------
# GEMV: y (1, N) = act(norm(x) (1, K) W^T + b) + residual, W (N, K) row-major (torch's Linear layout)


@triton.jit
def _weight_tile(w_rows, k, n_mask, K, EVEN: tl.constexpr):
    if EVEN:
        w = tl.load(w_rows + k[None, :])
    else:
        w = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & (k < K)[None, :], other=0.0)
    return w


@triton.jit
def _gemv_accumulate(acc, acc_up, s1, s2, w, u, x_ptr, nw_ptr, nb_ptr, k, K, mean, rstd, NORM: tl.constexpr,
                     FOLDED: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, GATED: tl.constexpr, EVEN_K: tl.constexpr):
    """One K tile of the GEMV: acc += W[:, k] x[k] (and acc_up for the up rows of a gated MLP)."""
    if EVEN_K:
        x = tl.load(x_ptr + k).to(tl.float32)
    else:
        x = tl.load(x_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    if FOLDED:
        s1 += x
        s2 += x * x
        x = x * tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
    elif NORM != 0:
        x = (x - mean) * rstd * tl.load(nw_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        if HAS_NORM_BIAS:
            x += tl.load(nb_ptr + k, mask=k < K, other=0.0).to(tl.float32)
        x = x.to(w.dtype).to(tl.float32)  # the normed activations as a norm kernel stores them
    acc += w.to(tl.float32) * x[None, :]
    if GATED:
        acc_up += u.to(tl.float32) * x[None, :]
    return acc, acc_up, s1, s2


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, nw_ptr, nb_ptr, g_ptr, c_ptr, ws_ptr, xs_ptr, N, K, stride_wn,
                 act_cols, eps,
                 HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, NORM: tl.constexpr,
                 FOLDED: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, HAS_RES: tl.constexpr, EVEN_N: tl.constexpr,
                 EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_SCALED: tl.constexpr,
                 X_SCALED: tl.constexpr, PDL: tl.constexpr):
    """NORM (1 layernorm, 2 RMSNorm) normalises x on the fly. FOLDED: with G = W g and C = W b
    precomputed, norm(x) W^T = rstd (sum_k x_k g_k W_nk - mean G_n) + C_n, so the statistics
    accumulate in the same loop as the product and no program makes a separate pass over x.
    Under PDL the first weight tile (at K <= BLOCK_K, all of the program's weights) is loaded
    before waiting for the previous kernel. W_SCALED: W is int8 or e4m3 (converted to fp32 as it is
    read) and each output is multiplied by its channel's scale ws[n] (no norm then); X_SCALED: x is
    e4m3 too, over the scale xs[0]."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    EVEN: tl.constexpr = EVEN_N and EVEN_K
    w_rows = w_ptr + n[:, None] * stride_wn
    k = tl.arange(0, BLOCK_K)
    w = _weight_tile(w_rows, k, n_mask, K, EVEN)
    u = w
    if GATED:  # rows [0, N) are the gate, rows [N, 2N) the up projection
        u = _weight_tile(w_rows + N * stride_wn, k, n_mask, K, EVEN)
    _wait_for_inputs(PDL)
    if NORM != 0 and not FOLDED:
        total = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            total += tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / K if NORM == 1 else 0.0
        total = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + k
            centred = tl.where(kk < K, tl.load(x_ptr + kk, mask=kk < K, other=0.0).to(tl.float32) - mean, 0.0)
            total += centred * centred
        rstd = 1.0 / tl.sqrt(tl.sum(total, axis=0) / K + eps)
    else:
        mean = 0.0
        rstd = 1.0
    s1 = tl.zeros((BLOCK_K,), dtype=tl.float32)  # FOLDED: sum x, sum x^2
    s2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # 2-D accumulators, reduced once at the end: no cross-lane reduction inside the K loop
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc, acc_up, s1, s2 = _gemv_accumulate(acc, acc_up, s1, s2, w, u, x_ptr, nw_ptr, nb_ptr, k, K, mean, rstd,
                                           NORM, FOLDED, HAS_NORM_BIAS, GATED, EVEN_K)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = _weight_tile(w_rows + k0, k, n_mask, K - k0, EVEN)
        if GATED:
            u = _weight_tile(w_rows + N * stride_wn + k0, k, n_mask, K - k0, EVEN)
        acc, acc_up, s1, s2 = _gemv_accumulate(acc, acc_up, s1, s2, w, u, x_ptr, nw_ptr, nb_ptr, k0 + k, K, mean,
                                               rstd, NORM, FOLDED, HAS_NORM_BIAS, GATED, EVEN_K)
    y = tl.sum(acc, axis=1)
    if GATED:
        up = tl.sum(acc_up, axis=1)
    if W_SCALED:
        y *= tl.load(ws_ptr + n, mask=n_mask, other=0.0)
        if GATED:
            up *= tl.load(ws_ptr + N + n, mask=n_mask, other=0.0)
    if X_SCALED:
        x_scale = tl.load(xs_ptr)
        y *= x_scale
        if GATED:
            up *= x_scale
    if FOLDED:
        mean = tl.sum(s1, axis=0) / K if NORM == 1 else 0.0
        rstd = 1.0 / tl.sqrt(tl.maximum(tl.sum(s2, axis=0) / K - mean * mean, 0.0) + eps)
        if NORM == 1:
            y = rstd * (y - mean * tl.load(g_ptr + n, mask=n_mask, other=0.0))
        else:
            y = rstd * y
        if HAS_NORM_BIAS:
            y += tl.load(c_ptr + n, mask=n_mask, other=0.0)
        if GATED:
            if NORM == 1:
                up = rstd * (up - mean * tl.load(g_ptr + N + n, mask=n_mask, other=0.0))
            else:
                up = rstd * up
            if HAS_NORM_BIAS:
                up += tl.load(c_ptr + N + n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    if GATED:
        if HAS_BIAS:
            up += tl.load(b_ptr + N + n, mask=n_mask, other=0.0).to(tl.float32)
        y = _activate(y, ACT) * up
    elif ACT != 0:
        y = tl.where(n < act_cols, _activate(y, ACT), y)
    if HAS_RES:
        y += tl.load(res_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


def _gemv_config(N: int, K: int, elem: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps); FT_RUNNER_GEMV="bn,bk,warps" overrides (for tuning).

    Measured on an H200 (benchmarks/microbench.py --sweep): 4 rows x 1024 columns per program is
    at or near the best for every decode shape from 1024x1024 to 50400x4096. One-byte (quantized)
    weights take 8 rows, the same bytes a tile (not measured yet).
    """
    forced = os.environ.get("FT_RUNNER_GEMV")
    if forced:
        bn, bk, warps = (int(v) for v in forced.split(","))
        return bn, min(bk, next_pow2(K)), warps
    rows = 8 if elem == 1 else 4
    return rows, min(512 if N >= 16384 and K <= 1024 else 1024, next_pow2(K)), 8 if N <= 1024 else 4


def gemv(x, weight, bias, act, gated, act_cols, out, norm=None, residual=None, w_scale=None, x_scale=None,
         dtype=None):
    """See ops.linear (M == 1). norm: (weight, bias, eps, rms[, G, C]) applied to x first; with the
    folded sums G = W weight and C = W bias (fp32) the kernel skips its pass over x (see the kernel).
    w_scale (N,) fp32: `weight` is int8 or e4m3 per output channel; x_scale (1,) fp32: x is e4m3 too
    (no norm with either); dtype: the output's (default x's)."""
    n_out = weight.shape[0] // (2 if gated else 1)
    K = weight.shape[1]
    assert x.stride(-1) == 1 and weight.stride(1) == 1
    assert w_scale is None or norm is None, "a quantized GEMV takes normed activations"
    if out is None:
        out = torch.empty((1, n_out), dtype=dtype or x.dtype, device=x.device)
    block_n, block_k, warps = _gemv_config(n_out, K, weight.element_size())
    nw, nb, eps, rms, g, c = (*norm, None, None)[:6] if norm is not None else (weight, None, 0.0, False, None, None)
    folded = norm is not None and g is not None and (nb is None or c is not None)
    on = pdl(x.device, triton.cdiv(n_out, block_n))
    _gemv_kernel[(triton.cdiv(n_out, block_n),)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out,
        nw, nb if nb is not None else out, g if g is not None else out, c if c is not None else out,
        w_scale if w_scale is not None else out, x_scale if x_scale is not None else out,
        n_out, K, weight.stride(0), n_out if act_cols is None else act_cols, eps,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], GATED=gated, NORM=0 if norm is None else (2 if rms else 1),
        FOLDED=folded, HAS_NORM_BIAS=nb is not None, HAS_RES=residual is not None, EVEN_N=n_out % block_n == 0,
        EVEN_K=K % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, W_SCALED=w_scale is not None,
        X_SCALED=x_scale is not None, PDL=on, launch_pdl=on, num_warps=warps)
    return out


@triton.jit
def _act_kernel(y_ptr, b_ptr, out_ptr, N, stride_y, stride_o, act_cols,
                HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr,
                PDL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    _wait_for_inputs(PDL)
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
    on = pdl(y.device, M * triton.cdiv(N, block))
    _act_kernel[(M, triton.cdiv(N, block))](y, bias if bias is not None else y, out, N, y.stride(0), out.stride(0),
                                            N if act_cols is None else act_cols,
                                            HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], GATED=gated,
                                            BLOCK=block, PDL=on, launch_pdl=on, num_warps=4)
    return out


_COUNTERS: dict = {}


def _counters(device, count: int) -> torch.Tensor:
    """Zeroed int32 counters that every launch counting on them (attention, the few-row GEMM's
    splits) leaves zeroed again; shared by all layers, one kernel after another."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < count:
        have = _COUNTERS[device] = torch.zeros(max(count, 1 << 16), dtype=torch.int32, device=device)
    return have


# ---------------------------------------------------------------------------------------------
# few-row GEMM (batched decode): swap-AB and split-K on tensor cores


@triton.jit
def _skinny_tile(rows, k, k_stop, row_mask, EVEN_K: tl.constexpr):
    """Columns k of the rows at `rows` (pointers, one per row)."""
    if EVEN_K:
        return tl.load(rows + k[None, :], mask=row_mask[:, None], other=0.0)
    return tl.load(rows + k[None, :], mask=row_mask[:, None] & (k < k_stop)[None, :], other=0.0)


@triton.jit
def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, res_ptr, out_ptr, part_ptr, count_ptr, ws_ptr, xs_ptr, M, N, K, k_chunk,
                        splits, stride_x, stride_w, stride_res, stride_out, act_cols,
                        HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
                        EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        IEEE: tl.constexpr, COMPUTE: tl.constexpr, W_SCALED: tl.constexpr, X_SCALED: tl.constexpr,
                        PDL: tl.constexpr):
    """out (M, N) = act(x W^T + b) + residual for a few rows x (M <= BLOCK_M), W (N, K), as ops.linear.

    Swap-AB: a program multiplies a [BLOCK_N, BLOCK_K] weight tile by the rows' [BLOCK_M, BLOCK_K]
    tile transposed, so the weight rows fill the MMA's 64-row side and the few token rows its narrow
    side. Split-K: program (n, s) covers columns [s k_chunk, (s + 1) k_chunk) so that a weight of
    few rows still keeps the GPU reading. Each writes its fp32 [BLOCK_N, BLOCK_M] partial; the last
    of a column tile to finish (an atomic count) adds them up in split order (the result does not
    depend on timing), applies bias, activation and residual, and resets the count. GATED: rows
    [0, N) are the gate and [N, 2N) the up projection; out = act(gate) * up.

    W_SCALED: W is int8 or e4m3, converted to the model dtype COMPUTE in registers (exact: |q| <= 127,
    and e4m3 values are fp16/bf16 values) before the product; the epilogue multiplies each output
    channel by ws[n] (and row m by xs[m] where X_SCALED: x is e4m3 too, one scale a row).

    (A norm folded in here, x normalised tile by tile from row sums left by the GEMM before, made
    whole steps slower on an H200: gpt2-medium batch 32 1.08 -> 1.36 ms, GPT-J 4.0 -> 5.5.)"""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < N
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None] * stride_w
    x_rows = x_ptr + m[:, None] * stride_x
    _wait_for_inputs(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_start = pid_k * k_chunk
    k_stop = tl.minimum(k_start + k_chunk, K)
    for k0 in range(k_start, k_stop, BLOCK_K):
        x = tl.trans(_skinny_tile(x_rows, k0 + k, k_stop, m_mask, EVEN_K)).to(COMPUTE)
        w = _skinny_tile(w_rows, k0 + k, k_stop, n_mask, EVEN_K).to(COMPUTE)
        acc = tl.dot(w, x, acc, input_precision="ieee" if IEEE else None)
        if GATED:
            u = _skinny_tile(w_rows + N * stride_w, k0 + k, k_stop, n_mask, EVEN_K).to(COMPUTE)
            acc_up = tl.dot(u, x, acc_up, input_precision="ieee" if IEEE else None)
    if splits == 1:
        _skinny_epilogue(acc, acc_up, n, n_mask, m, m_mask, b_ptr, res_ptr, out_ptr, ws_ptr, xs_ptr, N, stride_res,
                         stride_out, act_cols, HAS_BIAS, ACT, GATED, HAS_RES, W_SCALED, X_SCALED)
    else:
        SLOT: tl.constexpr = BLOCK_N * BLOCK_M * (2 if GATED else 1)
        tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + m[None, :]
        mine = part_ptr + (pid_n * splits + pid_k) * SLOT
        tl.store(mine + tile, acc)
        if GATED:
            tl.store(mine + BLOCK_N * BLOCK_M + tile, acc_up)
        done = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == splits - 1:
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in range(splits):
                slot = part_ptr + (pid_n * splits + s) * SLOT
                acc += tl.load(slot + tile, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(slot + BLOCK_N * BLOCK_M + tile, cache_modifier=".cg")
            tl.store(count_ptr + pid_n, 0)
            _skinny_epilogue(acc, acc_up, n, n_mask, m, m_mask, b_ptr, res_ptr, out_ptr, ws_ptr, xs_ptr, N,
                             stride_res, stride_out, act_cols, HAS_BIAS, ACT, GATED, HAS_RES, W_SCALED, X_SCALED)


@triton.jit
def _skinny_epilogue(y, up, n, n_mask, m, m_mask, b_ptr, res_ptr, out_ptr, ws_ptr, xs_ptr, N, stride_res, stride_out,
                     act_cols, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_RES: tl.constexpr,
                     W_SCALED: tl.constexpr, X_SCALED: tl.constexpr):
    """Scales, bias, activation and residual on the fp32 tile y [BLOCK_N, BLOCK_M]; stored transposed."""
    if W_SCALED:
        y *= tl.load(ws_ptr + n, mask=n_mask, other=0.0)[:, None]
        if GATED:
            up *= tl.load(ws_ptr + N + n, mask=n_mask, other=0.0)[:, None]
    if X_SCALED:
        row_scale = tl.load(xs_ptr + m, mask=m_mask, other=0.0)[None, :]
        y *= row_scale
        if GATED:
            up *= row_scale
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    if GATED:
        if HAS_BIAS:
            up += tl.load(b_ptr + N + n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        y = _activate(y, ACT) * up
    elif ACT != 0:
        y = tl.where((n < act_cols)[:, None], _activate(y, ACT), y)
    mask = n_mask[:, None] & m_mask[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + m[None, :] * stride_res + n[:, None], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m[None, :] * stride_out + n[:, None], y.to(out_ptr.dtype.element_ty), mask=mask)


SKINNY_MAX_ROWS = 64  # ops.linear takes the few-row GEMM for 2..64 rows on GPUs

# (N, K, BLOCK_M: the rows padded to 32 or 64): the config where the sweep beat _skinny_config's rule by 5% or
# more (H200, microbench.py --sweep --parts skinny --shapes gpt2m): GPT-2 medium's projections back
# into the residual. 1024x1024 unsplit: 5.7 -> 4.5 us at 64 rows (there the split's partials cost as
# much as the weight), 4.2 -> 3.9 at 32; 1024x4096 in 32-column tiles: 8.0 -> 7.4 (64 rows), 6.4 ->
# 6.0 (32). Whole gpt2-medium steps: batch 32 0.912 -> 0.903 ms, batch 64 unchanged within noise.
SKINNY_TUNED = {(1024, 1024, 32): (64, 256, 1, 4, 4), (1024, 1024, 64): (64, 128, 1, 4, 4),
                (1024, 4096, 32): (32, 128, 4, 4, 4), (1024, 4096, 64): (32, 128, 4, 4, 4)}


def _skinny_config(N: int, K: int, block_m: int, gated: bool, elem: int, sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, splits, num_warps, num_stages), from an H200 sweep (benchmarks/microbench.py
    --sweep --parts skinny, 32 and 64 rows). Each split's partial adds traffic (2 BLOCK_M / k_chunk
    of its weight bytes) and its reduction adds latency, so K is split only while the programs stay
    under half the SMs (GPT-2's 1024x1024 and 1024x4096 projections: 4 splits; 3072 rows or more:
    none), or under all of them for long rows (K >= 8192: GPT-J's output projection, Llama's down:
    2). Stages are cut to what fits in 160 KB of shared memory, and where there are more programs
    than SMs to 112 KB, so that two programs share an SM (at 64 rows, the 28672x4096 projection:
    68 us with 4 stages, 64 with 3; GPT-2's 3072x1024 with its 48 programs: 4.9 us with 4 stages,
    5.5 with 3). FT_RUNNER_SKINNY="block_n,block_k,splits,warps,stages" overrides (for tuning)."""
    block_n, block_k, warps, stages = 64, 128, 4, 4
    block_k = min(block_k, max(16, next_pow2(K)))
    tiles = triton.cdiv(N, block_n)
    splits = 1
    while K // (2 * splits) >= 256 and 2 * splits * tiles <= (sms if K >= 8192 else sms // 2):
        splits *= 2
    block_n, block_k, splits, warps, stages = SKINNY_TUNED.get((N, K, block_m), (block_n, block_k, splits, warps,
                                                                               stages))
    if os.environ.get("FT_RUNNER_SKINNY"):
        block_n, block_k, splits, warps, stages = (int(v) for v in os.environ["FT_RUNNER_SKINNY"].split(","))
    stage_bytes = (block_n * (2 if gated else 1) + block_m) * block_k * elem
    programs = triton.cdiv(N, block_n) * splits
    stages = max(1, min(stages, ((112 if programs > sms else 160) << 10) // stage_bytes))
    return block_n, block_k, splits, warps, stages


@functools.cache
def _sm_count(index) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count if torch.cuda.is_available() else 132


def skinny_linear(x, weight, bias, act, gated, act_cols, out, residual=None, w_scale=None, x_scale=None,
                  dtype=None):
    """See ops.linear (2 <= M <= SKINNY_MAX_ROWS, no norm); w_scale, x_scale and dtype as in gemv
    (x_scale (M,): one a row)."""
    M, K = x.shape
    N = weight.shape[0] // (2 if gated else 1)
    assert x.stride(-1) == 1 and weight.stride(1) == 1 and M <= SKINNY_MAX_ROWS
    dtype = dtype or x.dtype
    if out is None:
        out = torch.empty((M, N), dtype=dtype, device=x.device)
    block_m = max(16, next_pow2(M))  # the rows padded to the MMA's narrow side
    # tiles are sized for the model dtype: one-byte weights and activations are converted to it in registers
    block_n, block_k, splits, warps, stages = _skinny_config(N, K, block_m, gated, dtype.itemsize,
                                                              _sm_count(x.device.index))
    k_chunk = triton.cdiv(triton.cdiv(K, splits), block_k) * block_k
    splits = triton.cdiv(K, k_chunk)
    tiles = triton.cdiv(N, block_n)
    part = x if splits == 1 else torch.empty(tiles * splits * block_n * block_m * (2 if gated else 1),
                                             dtype=torch.float32, device=x.device)
    on = pdl(x.device, tiles * splits)
    _skinny_gemm_kernel[(tiles, splits)](
        x, weight, bias if bias is not None else out, residual if residual is not None else out, out, part,
        _counters(x.device, tiles), w_scale if w_scale is not None else out, x_scale if x_scale is not None else out,
        M, N, K, k_chunk, splits, x.stride(0), weight.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0), N if act_cols is None else act_cols,
        HAS_BIAS=bias is not None, ACT=ACTIVATIONS[act], GATED=gated, HAS_RES=residual is not None,
        EVEN_K=K % block_k == 0, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_K=block_k,
        IEEE=dtype == torch.float32, COMPUTE=TL_DTYPES[dtype], W_SCALED=w_scale is not None,
        X_SCALED=x_scale is not None, PDL=on, launch_pdl=on, num_warps=warps, num_stages=stages)
    return out


def quantized_linear(x, x_scale, q, w_scale, dtype, bias, act, gated, act_cols, out, residual):
    """See ops.quantized_linear (1..SKINNY_MAX_ROWS rows): the GEMV or the few-row GEMM on int8 / e4m3
    weights (q (N, K), w_scale (N,) fp32) and x in `dtype` (int8_wo) or e4m3 (x_scale (M,) fp32)."""
    if x.shape[0] == 1 and os.environ.get("FT_RUNNER_GEMV", "") != "cublas":
        return gemv(x, q, bias, act, gated, act_cols, out, None, residual, w_scale, x_scale, dtype)
    return skinny_linear(x, q, bias, act, gated, act_cols, out, residual, w_scale, x_scale, dtype)


# ---------------------------------------------------------------------------------------------
# quantization: e4m3 rows of activations, int8 weights for cuBLAS, e4m3 products


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, stride_x, K, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Row `program_id` of x -> e4m3 over its own scale max|x| / 448 (model.quant.quantize_rows_fp8)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    src = x_ptr + row.to(tl.int64) * stride_x
    _wait_for_inputs(PDL)
    top = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        top = tl.maximum(top, tl.abs(tl.load(src + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(top, axis=0) / 448.0, 1e-12)
    tl.store(s_ptr + row, scale)
    dst = q_ptr + row.to(tl.int64) * K
    for k0 in range(0, K, BLOCK):
        mask = k0 + cols < K
        v = tl.math.div_rn(tl.load(src + k0 + cols, mask=mask, other=0.0).to(tl.float32), scale)
        tl.store(dst + k0 + cols, tl.clamp(v, -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=mask)


def quantize_rows_fp8(x):
    """See ops.quantize_rows_fp8."""
    M, K = x.shape
    assert x.stride(-1) == 1
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((M,), dtype=torch.float32, device=x.device)
    on = pdl(x.device, M)
    _quantize_rows_kernel[(M,)](x, q, scale, x.stride(0), K, BLOCK=min(2048, next_pow2(K)), PDL=on, launch_pdl=on,
                                num_warps=4)
    return q, scale


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, K, BLOCK: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < K
    offs = n.to(tl.int64) * K + cols
    w = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32) * tl.load(s_ptr + n)
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize(q, scale, dtype):
    """scale[n] * q[n, k] (N, K) in `dtype`: an int8 weight for cuBLAS (ops.quantized_linear, more
    than SKINNY_MAX_ROWS rows)."""
    N, K = q.shape
    out = torch.empty((N, K), dtype=dtype, device=q.device)
    block = min(1024, next_pow2(K))
    _dequantize_kernel[(N, triton.cdiv(K, block))](q, scale, out, K, BLOCK=block, num_warps=4)
    return out


def fp8_matmul(xq, x_scale, q, w_scale, dtype):
    """(x_scale[m] w_scale[n] sum_k xq[m, k] q[n, k]) (M, N) for e4m3 xq (M, K) and q (N, K), through
    torch._scaled_mm's row-wise scaling (cuBLASLt / CUTLASS on FP8 tensor cores). Its row-wise kernels
    write bf16 only: the product comes back in bf16, the epilogue (ops) casts it to `dtype`. Shapes
    it cannot take (K or N not a multiple of 16) are dequantized for cuBLAS instead."""
    M, K = xq.shape
    N = q.shape[0]
    if K % 16 or N % 16:
        x = (xq.float() * x_scale[:, None]).to(dtype)
        return torch.nn.functional.linear(x, (q.float() * w_scale[:, None]).to(dtype))
    return torch._scaled_mm(xq, q.t(), scale_a=x_scale[:, None].contiguous(), scale_b=w_scale[None, :].contiguous(),
                            out_dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# decode attention: one new token per row, rotary, KV-cache append, GQA


@triton.jit
def _rope(x_ptr, d, x, pos, cos_ptr, sin_ptr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr, mask):
    """Rotate the first ROT features of x (fp32, loaded from x_ptr + d where `mask`) by position pos."""
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
    other = tl.load(x_ptr + partner, mask=rot & mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_ptr + pos * HALF + freq, mask=rot, other=1.0)
    sin = tl.load(sin_ptr + pos * HALF + freq, mask=rot, other=0.0)
    return tl.where(rot, x * cos + sign * other * sin, x)


@triton.jit
def _to_cache(x, scale, dtype: tl.constexpr, SCALED: tl.constexpr):
    """fp32 keys or values as a cache of `dtype` stores them: e4m3(x / scale), saturated, when SCALED."""
    if SCALED:
        x = tl.clamp(tl.math.div_rn(x, scale), -448.0, 448.0)
    return x.to(dtype)


@triton.jit
def _decode_attention_kernel(qkv_ptr, stride_qkv, k_cache, v_cache, stride_cb, stride_ch, stride_ct,
                             pos_ptr, cos_ptr, sin_ptr, out_ptr, stride_out, part_ptr, count_ptr, scale,
                             bt_ptr, stride_bt, kv_scale_ptr,
                             HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                             ROT: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_T: tl.constexpr,
                             KV_PER_PROGRAM: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr,
                             PAGE: tl.constexpr, KV_SCALED: tl.constexpr, PDL: tl.constexpr):
    """Program (b, g, split) attends for KV_PER_PROGRAM KV heads (g's) and all their query heads at
    once, the rows of a [BLOCK_M, BLOCK_D] tile (padded to 16 rows for the tensor cores), so each key
    and value is read once. A key tile holds BLOCK_T positions of each of those KV heads; a row's
    scores against the other heads' keys are masked out (the tensor cores do KV_PER_PROGRAM times
    the needed products, which is cheap next to the loads, and short programs of small heads get
    enough bytes in flight). The program covers its share of the row's cached positions [0, pos)
    (the splits divide them evenly, whatever the cache's length); split 0 also attends to the new
    token, from registers, and appends it to the cache. With several splits each writes (acc, max,
    sum) per head to `part`; the last of a (b, g) to finish, as counted by an atomic, merges them
    (flash-decoding without a second launch) and resets the counter. With one KV head a program
    (the usual case) the new token is a single row and the scores need no head mask: the packed
    form there cost GPT-J 5% a step.

    PAGE > 0: the cache is paged, (num_blocks, kv_heads, PAGE, D), and row b's position t lives in
    block bt[b, t // PAGE] at offset t % PAGE; each key of a tile looks its block up (a tile may
    span several blocks). A row with pos < 0 is padding: it writes nothing and outputs zeros.

    KV_SCALED: the cache holds e4m3 over the scales kv_scale[0] (keys) and [1] (values); the new
    token is stored rounded so, and attended to as stored. Products run in qkv's dtype: q carries
    the key scale, the output the value scale."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    GROUP: tl.constexpr = HQ // HKV
    ROWS: tl.constexpr = KV_PER_PROGRAM * GROUP
    COMPUTE: tl.constexpr = qkv_ptr.dtype.element_ty
    IEEE: tl.constexpr = COMPUTE == tl.float32
    if KV_SCALED:
        k_scale = tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    else:
        k_scale = 1.0
        v_scale = 1.0
    _wait_for_inputs(PDL)
    pos = tl.load(pos_ptr + b).to(tl.int32)
    if PAGE > 0:
        live = pos >= 0
        pos = tl.maximum(pos, 0)  # a padding row: attend to nothing but its own token, store nothing
        pages = bt_ptr + b * stride_bt
        cache_row = b * 0  # the block, not the row, selects the cache entry
    else:
        cache_row = b * stride_cb
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    r = tl.arange(0, BLOCK_M)
    rm = r < ROWS
    hq = g * ROWS + r
    r_kv = tl.minimum(r // GROUP, KV_PER_PROGRAM - 1)  # each row's KV head in the program (padding: the last)
    row = qkv_ptr + b * stride_qkv
    q_rows = row + hq[:, None] * D
    qm = rm[:, None] & dm[None, :]
    q = tl.load(q_rows + d[None, :], mask=qm, other=0.0).to(tl.float32)
    if ROT > 0:
        q = _rope(q_rows, d[None, :], q, pos, cos_ptr, sin_ptr, ROT, INTERLEAVED, qm)
    q = (q * (scale * k_scale)).to(COMPUTE)
    if split == 0:  # the new token, from registers; each KV head's first row appends it to the cache
        NEW_ROWS: tl.constexpr = 1 if KV_PER_PROGRAM == 1 else BLOCK_M  # one KV head: one row serves all
        n_r = tl.arange(0, NEW_ROWS)
        n_kv = g * KV_PER_PROGRAM + tl.minimum(n_r // GROUP, KV_PER_PROGRAM - 1)
        k_rows = row + (HQ + n_kv)[:, None] * D
        k_new = tl.load(k_rows + d[None, :], mask=dm[None, :], other=0.0).to(tl.float32)
        if ROT > 0:
            k_new = _rope(k_rows, d[None, :], k_new, pos, cos_ptr, sin_ptr, ROT, INTERLEAVED, dm[None, :])
        k_new = _to_cache(k_new, k_scale, k_cache.dtype.element_ty, KV_SCALED)
        v_new = tl.load(row + (HQ + HKV + n_kv)[:, None] * D + d[None, :], mask=dm[None, :], other=0.0)
        v_new = _to_cache(v_new.to(tl.float32), v_scale, v_cache.dtype.element_ty, KV_SCALED)
        appends = ((n_r < ROWS) & (n_r % GROUP == 0))[:, None] & dm[None, :]
        if PAGE > 0:
            block = tl.load(pages + pos // PAGE).to(tl.int64)
            slot = (block * stride_cb + n_kv * stride_ch + (pos % PAGE) * stride_ct)[:, None] + d[None, :]
            appends = appends & live
        else:
            slot = (b * stride_cb + n_kv * stride_ch + pos * stride_ct)[:, None] + d[None, :]
        tl.store(k_cache + slot, k_new, mask=appends)
        tl.store(v_cache + slot, v_new, mask=appends)
        m = tl.sum(q.to(tl.float32) * k_new.to(tl.float32), axis=1)
        l_sum = m * 0.0 + 1.0
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32) + v_new.to(tl.float32)
    else:
        l_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m = l_sum + float("-inf")
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    chunk = tl.cdiv(tl.cdiv(pos, SPLITS), BLOCK_T) * BLOCK_T
    start = split * chunk
    stop = tl.minimum(start + chunk, pos)
    j = tl.arange(0, KV_PER_PROGRAM * BLOCK_T)  # key j: position j % BLOCK_T of the tile, of KV head j // BLOCK_T
    if KV_PER_PROGRAM == 1:
        key_rows = cache_row + g * stride_ch
        key_t = j
    else:
        key_rows = cache_row + (g * KV_PER_PROGRAM + j // BLOCK_T) * stride_ch
        key_t = j % BLOCK_T
    for t0 in range(start, stop, BLOCK_T):
        t = t0 + key_t
        tm = t < stop
        if PAGE > 0:
            block = tl.load(pages + t // PAGE, mask=tm, other=0).to(tl.int64)
            offs = (block * stride_cb + key_rows + (t % PAGE) * stride_ct)[:, None] + d[None, :]
        else:
            offs = (key_rows + t * stride_ct)[:, None] + d[None, :]
        k = tl.load(k_cache + offs, mask=tm[:, None] & dm[None, :], other=0.0).to(COMPUTE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None)
        if KV_PER_PROGRAM == 1:
            s = tl.where(tm[None, :], s, float("-inf"))
        else:  # and each row against its own KV head's keys only
            s = tl.where((r_kv[:, None] == (j // BLOCK_T)[None, :]) & tm[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        v = tl.load(v_cache + offs, mask=tm[:, None] & dm[None, :], other=0.0).to(COMPUTE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision="ieee" if IEEE else None)
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        m = m_new
    out = out_ptr + b * stride_out + hq[:, None] * D + d[None, :]
    if SPLITS == 1:
        o = acc * v_scale / l_sum[:, None]
        if PAGE > 0:
            o = tl.where(live, o, 0.0)
        tl.store(out, o.to(out_ptr.dtype.element_ty), mask=qm)
    else:
        heads = b * HQ + hq  # (BLOCK_M,): padding rows fall outside this program's heads
        slots = part_ptr + (heads * SPLITS + split) * (BLOCK_D + 2)
        tl.store(slots[:, None] + d[None, :], acc, mask=rm[:, None])
        tl.store(slots + BLOCK_D, m, mask=rm)
        tl.store(slots + BLOCK_D + 1, l_sum, mask=rm)
        group = b * (HKV // KV_PER_PROGRAM) + g
        done = tl.atomic_add(count_ptr + group, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:
            first = part_ptr + heads * SPLITS * (BLOCK_D + 2)
            m_max = tl.load(first + BLOCK_D, mask=rm, other=0.0, cache_modifier=".cg")
            for i in tl.static_range(1, SPLITS):
                m_i = tl.load(first + i * (BLOCK_D + 2) + BLOCK_D, mask=rm, other=0.0, cache_modifier=".cg")
                m_max = tl.maximum(m_max, m_i)
            total = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            norm = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for i in tl.static_range(SPLITS):
                slot = first + i * (BLOCK_D + 2)  # split 0 holds the new token: m_max is finite
                w = tl.exp(tl.load(slot + BLOCK_D, mask=rm, other=0.0, cache_modifier=".cg") - m_max)
                norm += w * tl.load(slot + BLOCK_D + 1, mask=rm, other=0.0, cache_modifier=".cg")
                total += w[:, None] * tl.load(slot[:, None] + d[None, :], mask=rm[:, None], other=0.0,
                                              cache_modifier=".cg")
            o = total * v_scale / norm[:, None]
            if PAGE > 0:
                o = tl.where(live, o, 0.0)
            tl.store(out, o.to(out_ptr.dtype.element_ty), mask=qm)
            tl.store(count_ptr + group, 0)


def _attention_config(rows: int, kv_heads: int, group: int, block_d: int, max_len: int, fp8: bool = False):
    """(BLOCK_T, KV_PER_PROGRAM, SPLITS, num_warps, num_stages), from an H200 sweep (benchmarks/
    microbench.py --sweep --parts attention, rows at positions 128..255): tiles of 64 positions up
    to 128 features and 32 beyond, split until there are 1024 programs (64-feature heads) or 512
    (while each split keeps two tiles). 64-feature heads with 512 or more (row, KV head) pairs take
    tiles of 128 keys instead, packing KV heads so that about 512 programs remain, unsplit
    (gpt2-medium at batch 32: 12.2 -> 11.0 us a layer; at batch 64, two heads a program: 19.8 ->
    18.0). A program packs at most 16 query heads, from KV heads that divide kv_heads.
    FT_RUNNER_ATTN="block_t,kv_per_program,min_programs,warps,stages" overrides (for tuning), except for
    e4m3 caches of heads over 128 features: with "16,4,1024,4,2" at head_dim 256 ptxas crashed (error
    -11, Triton 3.6, H100), so those keep the defaults, which compiled and passed there."""
    block_t, kv_per_program, min_programs, warps, stages = (64 if block_d <= 128 else 32), 1, 512, 4, 2
    pairs = rows * kv_heads
    if block_d <= 64 and pairs >= 512:
        while pairs // (2 * kv_per_program) >= 512:
            kv_per_program *= 2
        block_t = max(16, 128 // kv_per_program)
    elif block_d <= 64:
        min_programs = 1024
    if os.environ.get("FT_RUNNER_ATTN") and not (fp8 and block_d > 128):
        block_t, kv_per_program, min_programs, warps, stages = (int(v) for v in os.environ["FT_RUNNER_ATTN"].split(","))
    while kv_per_program > 1 and (kv_heads % kv_per_program or kv_per_program * group > 16):
        kv_per_program //= 2
    splits = 1
    while pairs // kv_per_program * splits < min_programs and splits < 16 and splits * 2 * block_t <= max_len:
        splits *= 2
    return block_t, kv_per_program, splits, warps, stages


def decode_attention(qkv, k_cache, v_cache, positions, heads, kv_heads, head_dim, scale, rotary, out):
    """See ops.decode_attention."""
    return _launch_decode(qkv, k_cache, v_cache, positions, None, heads, kv_heads, head_dim, scale, rotary, out)


def paged_decode_attention(qkv, k_cache, v_cache, block_tables, positions, heads, kv_heads, head_dim, scale,
                           rotary, out, kv_scale=None):
    """See ops.paged_decode_attention."""
    return _launch_decode(qkv, k_cache, v_cache, positions, block_tables, heads, kv_heads, head_dim, scale, rotary,
                          out, kv_scale)


def _launch_decode(qkv, k_cache, v_cache, positions, block_tables, heads, kv_heads, head_dim, scale, rotary, out,
                   kv_scale=None):
    """_decode_attention_kernel over a contiguous cache (block_tables None) or a paged one (e4m3 with
    kv_scale (2,) fp32)."""
    _check_kv_scale(k_cache, kv_scale)
    B = qkv.shape[0]
    block_d = max(16, next_pow2(head_dim))
    cos, sin, rot, interleaved = rotary if rotary is not None else (qkv, qkv, 0, False)
    group = heads // kv_heads
    page = 0 if block_tables is None else _page_size(k_cache, v_cache)
    max_len = k_cache.shape[2] if block_tables is None else block_tables.shape[1] * page
    block_t, kv_per_program, splits, warps, stages = _attention_config(B, kv_heads, group, block_d, max_len,
                                                                       kv_scale is not None)
    part = torch.empty((B * heads * splits * (block_d + 2),) if splits > 1 else (1,), dtype=torch.float32,
                       device=qkv.device)
    programs = (B, kv_heads // kv_per_program, splits)
    on = pdl(qkv.device, math.prod(programs))
    tables = positions if block_tables is None else block_tables
    _decode_attention_kernel[programs](
        qkv, qkv.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        positions, cos, sin, out, out.stride(0), part, _counters(qkv.device, B * kv_heads), scale,
        tables, tables.stride(0), kv_scale if kv_scale is not None else part,
        HQ=heads, HKV=kv_heads, D=head_dim, BLOCK_D=block_d, ROT=rot, INTERLEAVED=interleaved,
        BLOCK_T=block_t, KV_PER_PROGRAM=kv_per_program, BLOCK_M=max(16, next_pow2(kv_per_program * group)),
        SPLITS=splits, PAGE=page, KV_SCALED=kv_scale is not None, PDL=on, launch_pdl=on, num_warps=warps,
        num_stages=stages)
    return out


def _check_kv_scale(k_cache, kv_scale) -> None:
    """An e4m3 cache comes with its scales, and only an e4m3 cache: never read one as the other."""
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert fp8 == (kv_scale is not None), f"a {k_cache.dtype} cache with kv_scale {kv_scale}"
    assert kv_scale is None or (kv_scale.dtype == torch.float32 and kv_scale.numel() == 2)


def _page_size(k_cache, v_cache) -> int:
    """The paged cache's block size; both caches share one layout, (num_blocks, kv_heads, block, D)."""
    page = k_cache.shape[2]
    assert page >= 8 and page & (page - 1) == 0, f"block_size {page}: a power of two >= 8"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(3) == 1
    return page


# ---------------------------------------------------------------------------------------------
# prefill attention: chunks of new tokens of several sequences, over a paged KV cache


@triton.jit
def _chunk_rows(cu_ptr, ctx_ptr, b, tile, BLOCK: tl.constexpr):
    """Rows `tile` (BLOCK of them) of sequence b's chunk: (first qkv row of the chunk, i within the chunk,
    i < chunk length, the tokens' positions (0 past the chunk's end, to keep table lookups in range))."""
    first = tl.load(cu_ptr + b)
    n = tl.load(cu_ptr + b + 1) - first
    i = tile * BLOCK + tl.arange(0, BLOCK)
    im = i < n
    return first, i, im, tl.where(im, tl.load(ctx_ptr + b) + i, 0)


@triton.jit
def _paged_append_kernel(qkv_ptr, stride_qkv, k_cache, v_cache, stride_cb, stride_ch, stride_ct, bt_ptr, stride_bt,
                         cu_ptr, ctx_ptr, cos_ptr, sin_ptr, kv_scale_ptr, HQ: tl.constexpr, HKV: tl.constexpr,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                         PAGE: tl.constexpr, KV_SCALED: tl.constexpr, BLOCK_R: tl.constexpr, PDL: tl.constexpr):
    """Program (tile, kv head, b): rotate the k of BLOCK_R tokens of sequence b's chunk and store k
    and v in their cache blocks (e4m3 over kv_scale where KV_SCALED)."""
    tile = tl.program_id(0)
    kv = tl.program_id(1)
    b = tl.program_id(2)
    _wait_for_inputs(PDL)
    first, i, im, p = _chunk_rows(cu_ptr, ctx_ptr, b, tile, BLOCK_R)
    if tile * BLOCK_R >= tl.load(cu_ptr + b + 1) - first:
        return
    d = tl.arange(0, BLOCK_D)
    mask = im[:, None] & (d < D)[None, :]
    rows = qkv_ptr + (first + i)[:, None].to(tl.int64) * stride_qkv
    k_rows = rows + (HQ + kv) * D
    k = tl.load(k_rows + d[None, :], mask=mask, other=0.0).to(tl.float32)
    if ROT > 0:
        k = _rope(k_rows, d[None, :], k, p[:, None], cos_ptr, sin_ptr, ROT, INTERLEAVED, mask)
    v = tl.load(rows + (HQ + HKV + kv) * D + d[None, :], mask=mask, other=0.0)
    block = tl.load(bt_ptr + b * stride_bt + p // PAGE, mask=im, other=0).to(tl.int64)
    slot = (block * stride_cb + kv * stride_ch + (p % PAGE) * stride_ct)[:, None] + d[None, :]
    if KV_SCALED:
        k_scale = tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    else:
        k_scale = 1.0
        v_scale = 1.0
    tl.store(k_cache + slot, _to_cache(k, k_scale, k_cache.dtype.element_ty, KV_SCALED), mask=mask)
    tl.store(v_cache + slot, _to_cache(v.to(tl.float32), v_scale, v_cache.dtype.element_ty, KV_SCALED), mask=mask)


@triton.jit
def _prefill_keys(acc, m, l_sum, q, p, t0, hi, k_cache, v_cache, pages, kv_row, stride_cb, stride_ct, d, dm,
                  qk_scale, slope, window, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr, IEEE: tl.constexpr):
    """One tile of BLOCK_N keys, positions t0.., into the online softmax (log2 domain). MASKED: apply
    the causal mask, the key range's end `hi` and the window; unmasked tiles lie wholly inside."""
    t = t0 + tl.arange(0, BLOCK_N)
    if MASKED:
        tm = t < hi
        block = tl.load(pages + t // PAGE, mask=tm, other=0).to(tl.int64)
        kv_mask = tm[:, None] & dm[None, :]
    else:
        block = tl.load(pages + t // PAGE).to(tl.int64)
        kv_mask = dm[None, :]
    offs = (block * stride_cb + kv_row + (t % PAGE) * stride_ct)[:, None] + d[None, :]
    k = tl.load(k_cache + offs, mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision="ieee" if IEEE else None) * qk_scale
    if HAS_ALIBI:
        s += slope * (t[None, :] - p[:, None]).to(tl.float32)
    if MASKED:
        keep = (t[None, :] <= p[:, None]) & tm[None, :]
        if HAS_WINDOW:
            keep = keep & (t[None, :] > p[:, None] - window)
        s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet (window) stays empty
    alpha = tl.math.exp2(m - m_safe)
    e = tl.math.exp2(s - m_safe[:, None])
    v = tl.load(v_cache + offs, mask=kv_mask, other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(e.to(q.dtype), v, input_precision="ieee" if IEEE else None)
    return acc, m_new, l_sum * alpha + tl.sum(e, axis=1)


@triton.jit
def _prefill_attention_kernel(qkv_ptr, stride_qkv, k_cache, v_cache, stride_cb, stride_ch, stride_ct,
                              bt_ptr, stride_bt, cu_ptr, ctx_ptr, cos_ptr, sin_ptr, kv_scale_ptr, slopes_ptr, out_ptr,
                              stride_out, qk_scale, window, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                              BLOCK_D: tl.constexpr, ROT: tl.constexpr, INTERLEAVED: tl.constexpr,
                              PAGE: tl.constexpr, KV_SCALED: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                              IEEE: tl.constexpr, PDL: tl.constexpr):
    """Program (tile, head, b): flash attention for BLOCK_M queries of sequence b's chunk, one query
    head, over the keys in the cache (the chunk's own were stored by _paged_append_kernel). Tiles run
    longest first (the grid's tiles are reversed) and those past a chunk's end return. Key tiles wholly
    before the query tile's first position, and inside every row's window, need no mask. KV_SCALED:
    an e4m3 cache, read in qkv's dtype; the scores carry the key scale, the output the value scale."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    _wait_for_inputs(PDL)
    first, i, im, p = _chunk_rows(cu_ptr, ctx_ptr, b, tile, BLOCK_M)
    if tile * BLOCK_M >= tl.load(cu_ptr + b + 1) - first:
        return
    ctx = tl.load(ctx_ptr + b)
    p = ctx + i  # rows past the chunk's end (never stored) sit beyond every key: no empty rows
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    qm = im[:, None] & dm[None, :]
    q_rows = qkv_ptr + (first + i)[:, None].to(tl.int64) * stride_qkv + h * D
    q = tl.load(q_rows + d[None, :], mask=qm, other=0.0)
    if ROT > 0:
        q = _rope(q_rows, d[None, :], q.to(tl.float32), tl.where(im, p, 0)[:, None], cos_ptr, sin_ptr, ROT,
                  INTERLEAVED, qm)
    q = q.to(qkv_ptr.dtype.element_ty)
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(kv_scale_ptr)
        v_scale = tl.load(kv_scale_ptr + 1)
    else:
        v_scale = 1.0
    if HAS_ALIBI:
        slope = tl.load(slopes_ptr + h) * 1.4426950408889634  # in the log2 domain, as the scores
    else:
        slope = 0.0
    p_lo = ctx + tile * BLOCK_M  # the tile's first query position
    hi = tl.minimum(p_lo + BLOCK_M, ctx + tl.load(cu_ptr + b + 1) - first)  # one past its last
    # key tiles [first_key, lo): the window's lower edge, masked; [lo, full): seen by every row, unmasked;
    # [full, hi): the diagonal, masked
    full = p_lo // BLOCK_N * BLOCK_N
    if HAS_WINDOW:
        first_key = tl.maximum(p_lo - window + 1, 0) // BLOCK_N * BLOCK_N
        lo = tl.minimum(tl.cdiv(tl.maximum(hi - window, 0), BLOCK_N) * BLOCK_N, full)
    else:
        first_key = 0
        lo = 0
    pages = bt_ptr + b * stride_bt
    kv_row = (h // (HQ // HKV)) * stride_ch
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m = l_sum + float("-inf")
    for t0 in range(first_key, lo, BLOCK_N):
        acc, m, l_sum = _prefill_keys(acc, m, l_sum, q, p, t0, hi, k_cache, v_cache, pages, kv_row, stride_cb,
                                      stride_ct, d, dm, qk_scale, slope, window, PAGE, BLOCK_N, True, HAS_WINDOW,
                                      HAS_ALIBI, IEEE)
    for t0 in range(lo, full, BLOCK_N):
        acc, m, l_sum = _prefill_keys(acc, m, l_sum, q, p, t0, hi, k_cache, v_cache, pages, kv_row, stride_cb,
                                      stride_ct, d, dm, qk_scale, slope, window, PAGE, BLOCK_N, False, HAS_WINDOW,
                                      HAS_ALIBI, IEEE)
    for t0 in range(full, hi, BLOCK_N):  # the diagonal
        acc, m, l_sum = _prefill_keys(acc, m, l_sum, q, p, t0, hi, k_cache, v_cache, pages, kv_row, stride_cb,
                                      stride_ct, d, dm, qk_scale, slope, window, PAGE, BLOCK_N, True, HAS_WINDOW,
                                      HAS_ALIBI, IEEE)
    out = out_ptr + (first + i)[:, None].to(tl.int64) * stride_out + h * D + d[None, :]
    tl.store(out, (acc * v_scale / l_sum[:, None]).to(out_ptr.dtype.element_ty), mask=qm)


def _prefill_config(block_d: int, elem: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages); FT_RUNNER_PREFILL="m,n,warps,stages" overrides
    (for tuning). Tiles sized so that q, k and v tiles with their stages fit in shared memory."""
    if os.environ.get("FT_RUNNER_PREFILL"):
        return tuple(int(v) for v in os.environ["FT_RUNNER_PREFILL"].split(","))
    if elem == 4:
        return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 128:
        return 128, 64, 8 if block_d == 128 else 4, 3
    return 64, 32, 8, 2


def prefill_attention(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, max_query_len, heads, kv_heads,
                      head_dim, scale, rotary, window, slopes, out, kv_scale=None):
    """See ops.prefill_attention: store the chunks' k and v, then attend (a second launch: a query
    tile's keys come from other programs' tokens)."""
    _check_kv_scale(k_cache, kv_scale)
    args = (qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, max_query_len, heads, kv_heads, head_dim,
            rotary, kv_scale)
    append_chunks(*args)
    return attend_chunks(*args, scale, window, slopes, out)


def _chunk_args(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, heads, kv_heads, head_dim, rotary,
                kv_scale):
    """The arguments and constexprs _paged_append_kernel and _prefill_attention_kernel share."""
    cos, sin, rot, interleaved = rotary if rotary is not None else (qkv, qkv, 0, False)
    args = (qkv, qkv.stride(0), k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            block_tables, block_tables.stride(0), cu_seqlens, context_lens, cos, sin,
            kv_scale if kv_scale is not None else cu_seqlens)
    return args, dict(HQ=heads, HKV=kv_heads, D=head_dim, BLOCK_D=max(16, next_pow2(head_dim)), ROT=rot,
                      INTERLEAVED=interleaved, PAGE=_page_size(k_cache, v_cache), KV_SCALED=kv_scale is not None)


def append_chunks(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, max_query_len, heads, kv_heads,
                  head_dim, rotary, kv_scale=None):
    """prefill_attention's first launch: rotate and store every chunk token's k and v."""
    args, common = _chunk_args(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, heads, kv_heads,
                               head_dim, rotary, kv_scale)
    block_r = 16
    grid = (triton.cdiv(max_query_len, block_r), kv_heads, cu_seqlens.shape[0] - 1)
    on = pdl(qkv.device, math.prod(grid))
    _paged_append_kernel[grid](*args, **common, BLOCK_R=block_r, PDL=on, launch_pdl=on, num_warps=4)


def attend_chunks(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, max_query_len, heads, kv_heads,
                  head_dim, rotary, kv_scale, scale, window, slopes, out):
    """prefill_attention's second launch: the attention, over the cache append_chunks filled."""
    args, common = _chunk_args(qkv, k_cache, v_cache, block_tables, cu_seqlens, context_lens, heads, kv_heads,
                               head_dim, rotary, kv_scale)
    block_m, block_n, warps, stages = _prefill_config(common["BLOCK_D"], qkv.element_size())
    grid = (triton.cdiv(max_query_len, block_m), heads, cu_seqlens.shape[0] - 1)
    on = pdl(qkv.device, math.prod(grid))
    _prefill_attention_kernel[grid](
        *args, slopes if slopes is not None else qkv, out, out.stride(0), scale * 1.4426950408889634, window,
        **common, BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=window > 0, HAS_ALIBI=slopes is not None,
        IEEE=qkv.dtype == torch.float32, PDL=on, launch_pdl=on, num_warps=warps, num_stages=stages)
    return out


# ---------------------------------------------------------------------------------------------
# greedy sampling + the step's bookkeeping, one program per row


@triton.jit
def _greedy_step_kernel(logits_ptr, stride_part, stride_row, V, V_PART,
                        temp_ptr, end_ptr, out_len_ptr, len_ptr, step_ptr, max_pos, R,
                        reasons_ptr, produced_ptr, history_ptr, logprobs_ptr, next_ptr, pos_ptr,
                        part_ptr, count_ptr, SPLITS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_V: tl.constexpr,
                        PDL: tl.constexpr):
    """Program (b, split) reduces vocabulary chunk `split` of row b to (max, argmax, sum of exp); the
    last of a row to finish (an atomic counts them) merges the chunks and does StepState.record."""
    b = tl.program_id(0)
    split = tl.program_id(1)
    _wait_for_inputs(PDL)
    inv_t = 1.0 / tl.load(temp_ptr + b).to(tl.float32)
    offs = tl.arange(0, BLOCK_V)
    s = inv_t * 0.0
    m = s + float("-inf")
    best = tl.program_id(0) * 0
    stop = tl.minimum(split * CHUNK + CHUNK, V)
    for v0 in range(split * CHUNK, stop, BLOCK_V):
        v = v0 + offs
        vm = v < stop
        # logits may come as (parts, R, V_PART): the TP ranks' vocabulary slices, unconcatenated
        z = tl.load(logits_ptr + (v // V_PART) * stride_part + b * stride_row + v % V_PART, mask=vm,
                    other=float("-inf")).to(tl.float32) * inv_t
        c_max = tl.max(z, axis=0)
        c_arg = tl.argmax(z, axis=0) + v0
        best = tl.where(c_max > m, c_arg, best)
        m_new = tl.maximum(m, c_max)
        s = s * tl.exp(m - m_new) + tl.sum(tl.where(vm, tl.exp(z - m_new), 0.0), axis=0)
        m = m_new
    if SPLITS == 1:
        _record(b, m, s, best, step_ptr, reasons_ptr, end_ptr, out_len_ptr, produced_ptr, history_ptr, R,
                logprobs_ptr, next_ptr, pos_ptr, len_ptr, max_pos)
    else:
        slot = part_ptr + (b * SPLITS + split) * 3
        tl.store(slot, m)
        tl.store(slot + 1, s)
        tl.store(slot + 2, best.to(tl.float32))  # exact: vocabulary ids < 2**24
        if tl.atomic_add(count_ptr + b, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            tl.store(count_ptr + b, 0)
            rows = part_ptr + (b * SPLITS + tl.arange(0, SPLITS)) * 3
            ms = tl.load(rows, cache_modifier=".cg")
            ss = tl.load(rows + 1, cache_modifier=".cg")
            args = tl.load(rows + 2, cache_modifier=".cg")
            top = tl.max(ms, axis=0)
            total = tl.sum(ss * tl.exp(ms - top), axis=0)
            first = tl.min(tl.where(ms == top, args, 1e9), axis=0).to(tl.int32)  # the first maximum
            _record(b, top, total, first, step_ptr, reasons_ptr, end_ptr, out_len_ptr, produced_ptr, history_ptr,
                    R, logprobs_ptr, next_ptr, pos_ptr, len_ptr, max_pos)


@triton.jit
def _record(b, m, s, best, step_ptr, reasons_ptr, end_ptr, out_len_ptr, produced_ptr, history_ptr, R,
            logprobs_ptr, next_ptr, pos_ptr, len_ptr, max_pos):
    """StepState.record for row b, whose greedy token is `best` with log-prob -log(s) (m: its logit)."""
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
    splits = 32 if R <= 32 else 8  # few rows: spread each over many programs
    block_v = 2048
    chunk = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, chunk)
    splits = next_pow2(splits)
    part = torch.empty((R * splits * 3,), dtype=torch.float32, device=parts.device)
    on = pdl(parts.device, R * splits)
    _greedy_step_kernel[(R, splits)](
        parts, parts.stride(0), parts.stride(1), vocab, parts.shape[2],
        state.temperature, state.end_id, state.out_lens, state.lengths, state.step, state.max_pos, R,
        state.reasons, state.produced, state.history, state.logprobs, state.next_tokens, state.positions,
        part, _counters(parts.device, R), SPLITS=splits, CHUNK=chunk, BLOCK_V=block_v, PDL=on, launch_pdl=on,
        num_warps=4)
