"""Each Triton kernel against its torch reference, on fresh random inputs.

    python -m ft_runner.kernels.selfcheck [--device cuda]      # on a GPU
    TRITON_INTERPRET=1 python -m ft_runner.kernels.selfcheck   # on a CPU, through Triton's interpreter

Prints one line per check and `SELFCHECK ok` (exit 0) or `SELFCHECK FAILED` (exit 1). Outputs are
poisoned with NaN first, so a kernel that leaves an element unwritten fails.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys

import torch

from ft_runner.kernels import ops
from ft_runner.model import quant


@contextlib.contextmanager
def setenv(name: str, value: str | None):
    """Set the environment variable `name` to `value` inside this block (None: leave it as it is)."""
    saved = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def reference():
    """Run ops.* through their torch references inside this block."""
    return setenv("FT_RUNNER_TRITON", "0")


def rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def check_add_norm(device, dtype, rms: bool) -> float:
    M, N = 3, 1000
    h, y, bias, w, b = (torch.randn(s, device=device, dtype=dtype) for s in ((M, N), (M, N), N, N, N))
    worst = 0.0
    for args in ((y, bias), (None, None), (y, None)):
        got = ops.add_norm(h, *args, w, None if rms else b, 1e-5, rms)
        with reference():
            want = ops.add_norm(h, *args, w, None if rms else b, 1e-5, rms)
        worst = max(worst, rel_err(got[0], want[0]), rel_err(got[1], want[1]))
    return worst


def check_embed(device, dtype, start: int, learned_positions: bool) -> float:
    V, N, M = 50, 200, 6
    wte = torch.randn(V, N, device=device, dtype=dtype)
    wpe = torch.randn(30, N, device=device, dtype=dtype) if learned_positions else None
    ids = torch.tensor([0, 3, 49, 50, 99, 7], device=device) + start // 2  # some outside [start, start + V)
    positions = torch.tensor([0, 1, 2, 29, 5, 6], device=device)[:M]
    got = ops.embed(ids, positions, wte, start, wpe)
    with reference():
        want = ops.embed(ids, positions, wte, start, wpe)
    return rel_err(got, want)


def check_linear(device, dtype, M: int, act, gated=False, act_cols=None, norm=None, residual=False,
                 config=None) -> float:
    N, K = 200, 328  # neither a multiple of the blocks
    w = torch.randn(2 * N if gated else N, K, device=device, dtype=dtype) / K ** 0.5
    b = torch.randn(w.shape[0], device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    norm_args = None
    if norm is not None:
        norm_args = (1 + 0.1 * torch.randn(K, device=device, dtype=dtype),
                     None if norm.startswith("rms") else torch.randn(K, device=device, dtype=dtype), 1e-5,
                     norm.startswith("rms"))
    if norm is not None and norm.endswith("folded"):
        norm_args = (*norm_args, *ops.fold_norm(norm_args[0], norm_args[1], w))
    res = torch.randn(M, N, device=device, dtype=dtype) if residual else None
    wide = torch.full((M, N + 8), float("nan"), device=device, dtype=dtype)
    with setenv("FT_RUNNER_SKINNY", config):
        got = ops.linear(x, w, b, act, gated, act_cols, out=wide[:, 8:], norm=norm_args, residual=res)
    with reference():
        up = (lambda t: None if t is None else t.float())  # noqa: E731
        ref_norm = None if norm_args is None else (up(norm_args[0]), up(norm_args[1]), *norm_args[2:4])
        if ref_norm is not None:  # the kernels store the normed activations in the model dtype
            x = ops.add_norm(x.float(), None, None, *ref_norm)[1].to(dtype)
        want = ops.linear(x.float(), w.float(), b.float(), act, gated, act_cols, residual=up(res))
    return rel_err(got, want)


def check_quantized_linear(device, dtype, kind: str, M: int, act=None, gated=False, act_cols=None, norm=False,
                           residual=False, config=None) -> float:
    """ops.linear on an int8 / e4m3 weight (per-output-channel scales) against the torch reference
    (which dequantizes), into a strided column slice poisoned with NaN; M > 64 takes the int8
    dequantization for cuBLAS or torch._scaled_mm."""
    N, K = 208, 320  # multiples of 16 (torch._scaled_mm), not of the blocks
    w = torch.randn(2 * N if gated else N, K, device=device) / K ** 0.5
    w[3] *= 40.0  # channels of very different sizes: each has its own scale
    qw = quant.quantize(w, kind)
    b = torch.randn(w.shape[0], device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    norm_args = (1 + 0.1 * torch.randn(K, device=device, dtype=dtype), torch.randn(K, device=device, dtype=dtype),
                 1e-5, False) if norm else None
    res = torch.randn(M, N, device=device, dtype=dtype) if residual else None
    wide = torch.full((M, N + 8), float("nan"), device=device, dtype=dtype)
    with setenv("FT_RUNNER_SKINNY", config):
        got = ops.linear(x, qw, b, act, gated, act_cols, out=wide[:, 8:], norm=norm_args, residual=res)
    with reference():
        want = ops.linear(x, qw, b, act, gated, act_cols, norm=norm_args, residual=res)
    return rel_err(got, want)


def check_quantize_rows(device, dtype) -> float:
    """ops.quantize_rows_fp8: the scales, and the e4m3 rows (a row of zeros and one past e4m3's range included)."""
    x = torch.randn(5, 1000, device=device, dtype=dtype)
    x[1] = 0
    x[2, 7] = 1e4 if dtype != torch.float16 else 6e4
    q, s = ops.quantize_rows_fp8(x)
    with reference():
        q_ref, s_ref = ops.quantize_rows_fp8(x)
    return max(rel_err(s, s_ref), rel_err(q.float() * s[:, None], q_ref.float() * s_ref[:, None]))


def check_attention(device, dtype, heads, kv_heads, head_dim, rot, interleaved, batch=4, config=None) -> float:
    B, T = batch, 300
    qkv = torch.randn(B, (heads + 2 * kv_heads) * head_dim, device=device, dtype=dtype)
    caches = [torch.randn(B + 1, kv_heads, T, head_dim, device=device, dtype=dtype) for _ in range(2)]
    positions = torch.tensor([0, 1, 137, T - 1][-B:], device=device)
    rotary = None
    if rot:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=device).float() / rot))
        rotary = (*ops.rope_tables(inv_freq, T), rot, interleaved)
    ref_caches = [c.clone() for c in caches]
    out = torch.full((B, heads * head_dim), float("nan"), device=device, dtype=dtype)
    with setenv("FT_RUNNER_ATTN", config):
        got = ops.decode_attention(qkv, *caches, positions, heads, kv_heads, head_dim, head_dim ** -0.5, rotary, out)
    with reference():
        want = ops.decode_attention(qkv, *ref_caches, positions, heads, kv_heads, head_dim, head_dim ** -0.5, rotary)
    return max(rel_err(got, want), *(rel_err(c, r) for c, r in zip(caches, ref_caches, strict=True)))


KV_SCALE = (0.5, 0.125)  # the fp8 checks' key and value scales


def _kv_scale(device, fp8: bool):
    return torch.tensor(KV_SCALE, device=device) if fp8 else None


def _paged_setup(device, dtype, B, kv_heads, head_dim, block, max_blocks, seed=0, fp8=False):
    """Random caches (num_blocks, kv_heads, block, D) and block tables (B, max_blocks) int32 of
    distinct blocks in shuffled order; e4m3 caches where `fp8`."""
    num_blocks = B * max_blocks + 2
    caches = [torch.randn(num_blocks, kv_heads, block, head_dim, device=device, dtype=dtype) for _ in range(2)]
    if fp8:
        caches = [quant.to_fp8(c) for c in caches]
    g = torch.Generator().manual_seed(seed)
    tables = torch.randperm(num_blocks, generator=g)[: B * max_blocks].view(B, max_blocks).int().to(device)
    return caches, tables


def _rotary(device, rot, interleaved, length):
    if not rot:
        return None
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=device).float() / rot))
    return (*ops.rope_tables(inv_freq, length), rot, interleaved)


def check_paged_attention(device, dtype, heads, kv_heads, head_dim, rot, interleaved, batch=4, block=16,
                          config=None, fp8=False) -> float:
    """paged_decode_attention, a padding row (position -1) included where batch > 1; `fp8`: e4m3 caches."""
    B, T = batch, 300
    max_blocks = -(-T // block)
    caches, tables = _paged_setup(device, dtype, B, kv_heads, head_dim, block, max_blocks, fp8=fp8)
    kv_scale = _kv_scale(device, fp8)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(B, width + 8, device=device, dtype=dtype)[:, 8:]
    positions = torch.tensor([0, -1, 137, T - 1][-B:], device=device)
    rotary = _rotary(device, rot, interleaved, T)
    ref_caches = [c.clone() for c in caches]
    out = torch.full((B, heads * head_dim + 8), float("nan"), device=device, dtype=dtype)[:, 8:]
    with setenv("FT_RUNNER_ATTN", config):
        got = ops.paged_decode_attention(qkv, *caches, tables, positions, heads, kv_heads, head_dim,
                                         head_dim ** -0.5, rotary, out, kv_scale)
    with reference():
        want = ops.paged_decode_attention(qkv, *ref_caches, tables, positions, heads, kv_heads, head_dim,
                                          head_dim ** -0.5, rotary, kv_scale=kv_scale)
    return max(rel_err(got, want), *(rel_err(c, r) for c, r in zip(caches, ref_caches, strict=True)))


def check_prefill(device, dtype, heads, kv_heads, head_dim, rot, interleaved, window=0, alibi=False, block=16,
                  config=None, fp8=False) -> float:
    """prefill_attention over sequences with cached context (chunks of 1..70 tokens, one empty);
    `fp8`: e4m3 caches."""
    contexts, chunks = [0, 37, 5, 90, 12], [70, 1, 0, 33, 64]
    max_blocks = -(-max(c + n for c, n in zip(contexts, chunks)) // block)
    caches, tables = _paged_setup(device, dtype, len(chunks), kv_heads, head_dim, block, max_blocks, fp8=fp8)
    N = sum(chunks)
    qkv = torch.randn(N, (heads + 2 * kv_heads) * head_dim + 8, device=device, dtype=dtype)[:, 8:]
    cu = torch.tensor([0, *itertools.accumulate(chunks)], device=device, dtype=torch.int32)
    ctx = torch.tensor(contexts, device=device, dtype=torch.int32)
    rotary = _rotary(device, rot, interleaved, max_blocks * block)
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device) / heads) if alibi else None
    ref_caches = [c.clone() for c in caches]
    out = torch.full((N, heads * head_dim + 8), float("nan"), device=device, dtype=dtype)[:, 8:]
    args = (max(chunks), heads, kv_heads, head_dim, head_dim ** -0.5, rotary, window, slopes)
    kv_scale = _kv_scale(device, fp8)
    with setenv("FT_RUNNER_PREFILL", config):
        got = ops.prefill_attention(qkv, *caches, tables, cu, ctx, *args, out=out, kv_scale=kv_scale)
    with reference():
        want = ops.prefill_attention(qkv, *ref_caches, tables, cu, ctx, *args, kv_scale=kv_scale)
    return max(rel_err(got, want), *(rel_err(c, r) for c, r in zip(caches, ref_caches, strict=True)))


def check_greedy(device, vocab: int = 3000) -> float:
    from ft_runner.engine.step_state import StepState

    R, V = 5, vocab
    states = []
    for _ in range(2):
        s = StepState.allocate(R, 4, 90, device)
        s.lengths.copy_(torch.tensor([5, 6, 7, 8, 9]))
        s.out_lens.copy_(torch.tensor([4, 1, 4, 4, 4]))
        s.end_id.fill_(7)
        s.params.temperature.copy_(torch.tensor([1.0, 0.5, 2.0, 1.0, 1.0]))
        s.reasons[2] = 1
        states.append(s)
    logits = torch.randn(2, R, (V + 201) // 2, device=device)  # two TP parts of a padded vocabulary
    logits[1, 0, 5] = logits[0, 0].max() + 1.0  # row 0's best token is in the second part
    logits[0, 3, 7] = 50.0  # row 3 picks its end token
    worst = 0.0
    for _ in range(2):
        ops.greedy_step(logits, V, states[0])
        with reference():
            ops.greedy_step(logits, V, states[1])
        for name in ("history", "reasons", "produced", "next_tokens", "positions", "step"):
            if not torch.equal(getattr(states[0], name), getattr(states[1], name)):
                print(name, getattr(states[0], name), getattr(states[1], name))
                return float("inf")
        worst = max(worst, rel_err(states[0].logprobs, states[1].logprobs))
    return worst


def fp8_runs(device: str) -> bool:
    """Does this device check the e4m3 kernels? sm_89+ GPUs. Not CPUs: Triton 3.6's interpreter rounds
    to e4m3 wrongly where rounding carries into the exponent (-7.87 becomes -4, not -8)."""
    return device != "cpu" and torch.cuda.get_device_capability(device) >= (8, 9)


def quantized_checks(device, dtypes, tol) -> list:
    """`int8 ...` and `fp8 ...`: the quantized linears at 1, 3, 33 (the GEMV, few-row GEMM) and 100 rows
    (cuBLAS / torch._scaled_mm); `fp8 quantize_rows`; `fp8 paged attention` and `fp8 prefill` over e4m3
    caches. Tolerances: int8 as the unquantized linears (the same products); fp8 rows and caches are
    rounded on both sides, and a value on a rounding boundary may go either way, so 1e-2."""
    checks = []
    kinds = ["int8_wo"] + (["fp8"] if fp8_runs(device) else [])
    for dtype, kind in itertools.product(dtypes, kinds):
        name = "int8" if kind == "int8_wo" else "fp8"
        limit = tol[dtype] if kind == "int8_wo" else 1e-2
        for M in (1, 3, 33, 100):
            for act, gated, cols, norm, residual in ((None, False, None, False, False), ("gelu", False, 40, False, True),
                                                     ("silu", True, None, False, False), (None, False, None, True, True)):
                checks.append((f"{name} linear {dtype} M={M} act={act} gated={gated} cols={cols} norm={norm} "
                               f"residual={residual}",
                               lambda d=dtype, k=kind, m=M, a=act, g=gated, c=cols, n=norm, r=residual:
                               check_quantized_linear(device, d, k, m, a, g, c, n, r), limit))
        for M, config in itertools.product((3, 33), ("32,128,4,4,4", "64,64,8,4,3")):  # split K
            checks.append((f"{name} linear {dtype} M={M} config={config}",
                           lambda d=dtype, k=kind, m=M, c=config: check_quantized_linear(
                               device, d, k, m, "gelu", False, None, False, True, c), limit))
    if "fp8" not in kinds:
        return checks
    for dtype in dtypes:
        checks.append((f"fp8 quantize_rows {dtype}", lambda d=dtype: check_quantize_rows(device, d), 1e-2))
        for shape in ((4, 4, 64, 0, False), (8, 2, 128, 128, False), (2, 2, 256, 64, True)):
            for batch, block in ((4, 8), (1, 64)):
                for config in (None, "16,4,1024,4,2"):
                    checks.append((f"fp8 paged attention {dtype} B={batch} block={block} heads/kv/dim/rot/"
                                   f"interleaved={shape} config={config}",
                                   lambda d=dtype, s=shape, b=batch, k=block, c=config: check_paged_attention(
                                       device, d, *s, b, k, c, fp8=True), 1e-2))
        for shape, window, alibi in (((4, 4, 64, 0, False), 0, False), ((8, 2, 128, 128, False), 0, False),
                                     ((4, 2, 64, 32, True), 20, False), ((4, 1, 96, 0, False), 7, True)):
            for block in (8, 32):
                checks.append((f"fp8 prefill {dtype} block={block} heads/kv/dim/rot/interleaved={shape} "
                               f"window={window} alibi={alibi}",
                               lambda d=dtype, s=shape, w=window, a=alibi, k=block: check_prefill(
                                   device, d, *s, w, a, k, fp8=True), 1e-2))
    return checks


def run(device: str, only: tuple[str, ...] = ()) -> bool:
    """Run the checks (those whose names start with one of `only`, if given) on `device`."""
    torch.manual_seed(0)
    dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.float32]
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}
    checks = []
    for dtype in dtypes:
        for start, learned in ((0, True), (50, False)):
            checks.append((f"embed {dtype} start={start} wpe={learned}",
                           lambda d=dtype, s=start, w=learned: check_embed(device, d, s, w), tol[dtype]))
        for rms in (False, True):
            checks.append((f"add_norm {dtype} rms={rms}", lambda d=dtype, r=rms: check_add_norm(device, d, r), tol[dtype]))
        for M in (1, 3, 33):
            for act, gated, cols in ((None, False, None), ("gelu", False, None), ("gelu", False, 72),
                                     ("relu", False, None), ("gelu_exact", False, None), ("silu", True, None),
                                     ("gelu", True, None)):
                checks.append((f"linear {dtype} M={M} act={act} gated={gated} cols={cols}",
                               lambda d=dtype, m=M, a=act, g=gated, c=cols: check_linear(device, d, m, a, g, c),
                               tol[dtype]))
            for norm, residual, act, gated in (("ln", False, "gelu", False), ("rms", False, None, False),
                                               (None, True, None, False), ("ln", True, None, False),
                                               ("ln folded", False, "gelu", False), ("rms folded", True, None, False),
                                               ("rms folded", False, "silu", True), ("ln folded", False, "gelu", True)):
                checks.append((f"linear {dtype} M={M} norm={norm} residual={residual} act={act} gated={gated}",
                               lambda d=dtype, m=M, n=norm, r=residual, a=act, g=gated: check_linear(
                                   device, d, m, a, g, None, n, r),
                               tol[dtype]))
        # few-row GEMM configs (FT_RUNNER_SKINNY): 32-column tiles, K split 3 ways (the last short);
        # 64-column tiles, K split 6 ways in 64-wide steps
        for M, config in itertools.product((3, 33), ("32,128,4,4,4", "64,64,8,4,3")):
            for act, gated, residual in ((None, False, True), ("gelu", False, False), ("silu", True, False)):
                checks.append((f"linear {dtype} M={M} act={act} gated={gated} residual={residual} config={config}",
                               lambda d=dtype, m=M, a=act, g=gated, r=residual, c=config: check_linear(
                                   device, d, m, a, g, None, None, r, c),
                               tol[dtype]))
        # configs (FT_RUNNER_ATTN): the default; KV heads packed 4 to a program, split; packed 2, whole rows
        for config in (None, "16,4,1024,4,2", "16,2,1,4,2"):
            for shape in ((4, 4, 64, 0, False), (2, 2, 256, 64, True), (8, 2, 128, 128, False), (1, 1, 64, 0, False)):
                for batch in (4, 1):
                    checks.append((f"attention {dtype} B={batch} heads/kv/dim/rot/interleaved={shape} config={config}",
                                   lambda d=dtype, s=shape, b=batch, c=config: check_attention(device, d, *s, b, c),
                                   tol[dtype]))
        # paged: blocks of 8 (a key tile spans several) and 64 (several tiles a block)
        for config in (None, "16,4,1024,4,2", "16,2,1,4,2"):
            for shape in ((4, 4, 64, 0, False), (8, 2, 128, 128, False), (2, 2, 256, 64, True)):
                for batch, block in ((4, 8), (1, 64)):
                    checks.append((f"paged attention {dtype} B={batch} block={block} heads/kv/dim/rot/interleaved="
                                   f"{shape} config={config}",
                                   lambda d=dtype, s=shape, b=batch, k=block, c=config: check_paged_attention(
                                       device, d, *s, b, k, c),
                                   tol[dtype]))
        # prefill configs (FT_RUNNER_PREFILL): the default; small tiles (several a block, key tiles cut by windows)
        for config in (None, "16,16,4,1", "32,64,4,2"):
            for shape, window, alibi in (((4, 4, 64, 0, False), 0, False), ((8, 2, 128, 128, False), 0, False),
                                         ((4, 2, 64, 32, True), 20, False), ((4, 4, 64, 0, False), 0, True),
                                         ((4, 1, 96, 0, False), 7, True)):
                for block in (8, 32):
                    checks.append((f"prefill {dtype} block={block} heads/kv/dim/rot/interleaved={shape} "
                                   f"window={window} alibi={alibi} config={config}",
                                   lambda d=dtype, s=shape, w=window, a=alibi, k=block, c=config: check_prefill(
                                       device, d, *s, w, a, k, c),
                                   tol[dtype]))
    checks += quantized_checks(device, dtypes, tol)
    checks.append(("greedy_step", lambda: check_greedy(device), 1e-5))
    checks.append(("greedy_step large vocab", lambda: check_greedy(device, vocab=50257), 1e-5))
    if only:
        checks = [c for c in checks if any(c[0].startswith(prefix) for prefix in only)]
    ok = True
    for name, fn, limit in checks:
        try:
            err = fn()
        except Exception as exc:  # a kernel that does not compile or launch fails its check, and the others still run
            ok = False
            first = next((line for line in str(exc).splitlines() if line.strip() and not line.startswith("=")), "")
            print(f"FAIL {name}: {type(exc).__name__}: {first.strip()[:200]}", flush=True)
            continue
        good = err <= limit
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name}: rel err {err:.2e} (limit {limit:.0e})", flush=True)
    print("SELFCHECK ok" if ok else "SELFCHECK FAILED", flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", default="", help="comma-separated prefixes of the check names to run (e.g. paged,prefill; "
                                                "int8,fp8: the quantized kernels)")
    args = p.parse_args(argv)
    return 0 if run(args.device, tuple(filter(None, args.only.split(",")))) else 1


if __name__ == "__main__":
    sys.exit(main())
