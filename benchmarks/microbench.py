"""Per-kernel timings on one GPU, to tune the decode kernels (not part of any test).

    python3 benchmarks/microbench.py [--sweep] [--parts gemv,skinny,attention,other,paged]

Each kernel is timed the way the engine runs it: as a CUDA graph of many back-to-back launches,
each on its own copy of the weights or KV cache (so the L2 cache never holds them), replayed and
timed with CUDA events. Prints, per projection shape of gpt2-medium, GPT-J and Llama-3-8B, cuBLAS
(F.linear) against the Triton GEMV (1 row) and the few-row GEMM (8..64 rows), then decode
attention and the other decode kernels at their real sizes, in us and GB/s; --sweep adds the best
of a grid of configs for each.
"""

# ruff: noqa: B023  (each graph is captured and timed before the loop moves on)
from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ft_runner.kernels import ops, triton_ops  # noqa: E402

SWEEP = ("gpt2m qkv", "gpt2m fc2", "gpt2m head", "gptj in", "gptj out", "gptj/2 in")
GEMV_SHAPES = {  # name: (N, K)
    "gpt2m qkv": (3072, 1024), "gpt2m dense": (1024, 1024), "gpt2m fc1": (4096, 1024),
    "gpt2m fc2": (1024, 4096), "gpt2m head": (50257, 1024),
    "gptj in": (28672, 4096), "gptj out": (4096, 20480), "gptj head": (50400, 4096),
    "gptj/2 in": (14336, 4096), "gptj/2 out": (4096, 10240),
    "llama3 qkv": (6144, 4096), "llama3 gate_up": (28672, 4096), "llama3 down": (4096, 14336),
}


def graph_time_us(launch, copies: int, reps: int = 20) -> float:
    """Median time per launch of a graph of `copies` launches (launch(i) uses copy i)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            launch(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            launch(i)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return sorted(times)[len(times) // 2]


def weight_copies(n: int, k: int, total_bytes: int = 512 << 20) -> list[torch.Tensor]:
    count = max(8, min(128, total_bytes // (n * k * 2)))
    return [torch.randn(n, k, device="cuda", dtype=torch.float16) / k ** 0.5 for _ in range(count)]


def bench_gemv(sweep: bool) -> None:
    print(f"{'shape':<16} {'N x K':>13} {'cuBLAS us':>9} {'GB/s':>6} {'triton us':>9} {'GB/s':>6}"
          + (f" {'best us':>8} {'GB/s':>6}  best config" if sweep else ""), flush=True)
    for name, (n, k) in GEMV_SHAPES.items():
        ws = weight_copies(n, k)
        x = torch.randn(1, k, device="cuda", dtype=torch.float16)
        nbytes = n * k * 2
        cublas = graph_time_us(lambda i: F.linear(x, ws[i]), len(ws))
        triton_t = graph_time_us(lambda i: ops.linear(x, ws[i]), len(ws))
        line = (f"{name:<16} {f'{n}x{k}':>13} {cublas:9.1f} {nbytes / cublas / 1e3:6.0f} {triton_t:9.1f} "
                f"{nbytes / triton_t / 1e3:6.0f}")
        if sweep and name in SWEEP:
            best = (float("inf"), None)
            for bn, bk, warps in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8)):
                if bk > k:
                    continue
                os.environ["FT_RUNNER_GEMV"] = f"{bn},{bk},{warps}"
                try:
                    t = graph_time_us(lambda i: triton_ops.gemv(x, ws[i], None, None, False, None, None), len(ws), 10)
                finally:
                    del os.environ["FT_RUNNER_GEMV"]
                best = min(best, (t, (bn, bk, warps)))
            line += f" {best[0]:8.1f} {nbytes / best[0] / 1e3:6.0f}  {best[1]}"
        print(line, flush=True)
        if name in ("gpt2m qkv", "gptj in", "gpt2m fc2"):  # the single-row path's fused forms
            nw, nb = torch.ones(k, device="cuda", dtype=torch.float16), torch.zeros(k, device="cuda", dtype=torch.float16)
            res = torch.randn(1, n, device="cuda", dtype=torch.float16)
            t_ln = graph_time_us(lambda i: ops.linear(x, ws[i], norm=(nw, nb, 1e-5, False)), len(ws))
            t_res = graph_time_us(lambda i: ops.linear(x, ws[i], residual=res), len(ws))
            print(f"{name + ' +norm':<16} {'':>13} {'':>9} {'':>6} {t_ln:9.1f} {nbytes / t_ln / 1e3:6.0f}", flush=True)
            print(f"{name + ' +resid':<16} {'':>13} {'':>9} {'':>6} {t_res:9.1f} {nbytes / t_res / 1e3:6.0f}",
                  flush=True)


SKINNY_SHAPES = ("gpt2m qkv", "gpt2m dense", "gpt2m fc1", "gpt2m fc2", "gpt2m head", "gptj in", "gptj out",
                 "llama3 qkv", "llama3 gate_up", "llama3 down")


def bench_skinny(sweep: bool, shapes: str = "") -> None:
    """Batched decode's projections (8..64 rows): cuBLAS against the few-row Triton GEMM; `shapes`
    keeps only the names that start with it."""
    configs = list(itertools.product((32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (4,), (3, 4)))
    for name, rows in itertools.product([s for s in SKINNY_SHAPES if s.startswith(shapes)], (8, 32, 64)):
        n, k = GEMV_SHAPES[name]
        ws = weight_copies(n, k)
        x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
        nbytes = n * k * 2
        cublas = graph_time_us(lambda i: F.linear(x, ws[i]), len(ws))
        skinny = graph_time_us(lambda i: ops.linear(x, ws[i]), len(ws))
        line = (f"skinny {name:<16} M={rows:<3} cuBLAS {cublas:7.1f} us {nbytes / cublas / 1e3:5.0f} GB/s | triton "
                f"{skinny:7.1f} us {nbytes / skinny / 1e3:5.0f} GB/s")
        if sweep and rows >= 32:
            ranked = []
            for config in configs:
                if config[1] > k:
                    continue
                os.environ["FT_RUNNER_SKINNY"] = ",".join(map(str, config))
                try:
                    ranked.append((graph_time_us(lambda i: ops.linear(x, ws[i]), len(ws), 10), config))
                finally:
                    del os.environ["FT_RUNNER_SKINNY"]
            line += "".join(f" | {t:6.1f} us {nbytes / t / 1e3:5.0f} GB/s {c}" for t, c in sorted(ranked)[:3])
        print(line, flush=True)


ATTENTION_SHAPES = {  # name: (heads, kv_heads, head_dim, rot, interleaved)
    "gpt2m": (16, 16, 64, 0, False), "gptj": (16, 16, 256, 64, True), "llama3": (32, 8, 128, 128, False)}


def attention_configs(kv: int, group: int, dim: int) -> list[tuple]:
    """FT_RUNNER_ATTN settings worth timing: key tiles of 32..256 keys and at most 32 KB."""
    return [(bt, kvp, mp, 4, st) for bt, kvp, mp, st in itertools.product((16, 32, 64, 128), (1, 2, 4, 8, 16),
                                                                         (256, 1024), (2, 3))
            if kv % kvp == 0 and kvp * group <= 16 and 32 <= bt * kvp <= 256 and bt * kvp * dim * 2 <= 32768]


def bench_attention(sweep: bool) -> None:
    """decode_attention as the engine runs it: one launch per layer of a (layers, B, kv_heads, 256, D)
    cache too large for L2, rows at positions spread over [128, 256); with --sweep also the best of
    a grid of FT_RUNNER_ATTN settings."""
    dev, f16 = "cuda", torch.float16
    for (name, (heads, kv, dim, rot, inter)), batch in itertools.product(ATTENTION_SHAPES.items(), (1, 32, 64)):
        per_layer = 2 * batch * kv * 256 * dim * 2
        layers = max(4, min(64, (400 << 20) // per_layer))
        k = torch.randn(layers, batch, kv, 256, dim, device=dev, dtype=f16)
        v = torch.randn_like(k)
        qkv = torch.randn(batch, (heads + 2 * kv) * dim, device=dev, dtype=f16)
        pos = torch.randint(128, 255, (batch,), device=dev)
        rope = None
        if rot:
            inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=dev).float() / rot))
            rope = (*ops.rope_tables(inv, 256), rot, inter)
        kv_bytes = 2 * kv * dim * 2 * float(pos.sum() + batch)

        def timed(config=None):
            if config:
                os.environ["FT_RUNNER_ATTN"] = ",".join(map(str, config))
            try:
                return graph_time_us(lambda i: ops.decode_attention(qkv, k[i], v[i], pos, heads, kv, dim, 0.1, rope),
                                     layers, 10)
            finally:
                os.environ.pop("FT_RUNNER_ATTN", None)

        t = timed()
        line = f"attention {name:<6} B={batch:<3} {t:7.1f} us {kv_bytes / t / 1e3:5.0f} GB/s"
        if sweep:
            ranked = sorted((timed(c), c) for c in attention_configs(kv, heads // kv, dim))
            line += "".join(f" | {t:6.1f} us {kv_bytes / t / 1e3:5.0f} GB/s {c}" for t, c in ranked[:3])
        print(line, flush=True)


LLAMA3 = (32, 8, 128)  # heads, kv_heads, head_dim


def graph_bench_us(launch, copies: int) -> float:
    """triton.testing.do_bench's median per launch of a CUDA graph of `copies` launches (copy i each)."""
    import triton.testing

    for i in range(copies):  # compile and warm up outside the graph
        launch(i)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            launch(i)
    return triton.testing.do_bench(graph.replay, return_mode="median") * 1e3 / copies


def llama3_rotary(length: int):
    inv = 1.0 / (500000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    return (*ops.rope_tables(inv, length), 128, False)


def bench_paged(sweep: bool) -> None:
    """Llama-3-8B attention on the paged cache (blocks of 16, shuffled tables) against the contiguous
    one: decode at context 512 (batch 1/64/256, CUDA graphs of one launch per cache copy), and
    prefill of 16 x 512 tokens against torch SDPA(is_causal) on contiguous (B, heads, T, D) tensors."""
    dev, f16 = "cuda", torch.float16
    heads, kv, dim = LLAMA3
    ctx, block = 512, 16
    max_blocks = (ctx + block) // block
    rope = llama3_rotary(max_blocks * block)
    for batch in (1, 64, 256):
        copies = max(4, min(32, (1 << 30) // (2 * batch * kv * max_blocks * block * dim * 2)))
        dense = [torch.randn(2, batch, kv, max_blocks * block, dim, device=dev, dtype=f16) for _ in range(copies)]
        paged = [torch.randn(2, batch * max_blocks, kv, block, dim, device=dev, dtype=f16) for _ in range(copies)]
        tables = torch.randperm(batch * max_blocks, device=dev).view(batch, max_blocks).int()
        qkv = torch.randn(batch, (heads + 2 * kv) * dim, device=dev, dtype=f16)
        pos = torch.full((batch,), ctx, device=dev)
        out = torch.empty(batch, heads * dim, device=dev, dtype=f16)
        t_dense = graph_bench_us(lambda i: ops.decode_attention(qkv, dense[i][0], dense[i][1], pos, heads, kv, dim,
                                                                0.1, rope, out), copies)
        t_paged = graph_bench_us(lambda i: ops.paged_decode_attention(qkv, paged[i][0], paged[i][1], tables, pos,
                                                                      heads, kv, dim, 0.1, rope, out), copies)
        gbs = 2 * batch * kv * (ctx + 1) * dim * 2 / 1e3
        print(f"decode attention llama3 B={batch:<3} ctx={ctx}: contiguous {t_dense:7.1f} us {gbs / t_dense:5.0f} GB/s"
              f" | paged {t_paged:7.1f} us {gbs / t_paged:5.0f} GB/s", flush=True)
    bench_prefill(sweep)


def bench_prefill(sweep: bool, seqs: int = 16, length: int = 512) -> None:
    import triton.testing

    from ft_runner.kernels import triton_ops

    dev, f16 = "cuda", torch.float16
    heads, kv, dim = LLAMA3
    block = 16
    N, max_blocks = seqs * length, length // block
    qkv = torch.randn(N, (heads + 2 * kv) * dim, device=dev, dtype=f16)
    caches = [torch.randn(seqs * max_blocks, kv, block, dim, device=dev, dtype=f16) for _ in range(2)]
    tables = torch.randperm(seqs * max_blocks, device=dev).view(seqs, max_blocks).int()
    cu = torch.arange(0, N + 1, length, device=dev, dtype=torch.int32)
    ctx = torch.zeros(seqs, device=dev, dtype=torch.int32)
    out = torch.empty(N, heads * dim, device=dev, dtype=f16)
    flops = 4 * seqs * heads * dim * length * (length + 1) / 2
    median = (lambda fn: triton.testing.do_bench(fn, return_mode="median") * 1e3)  # noqa: E731
    q = torch.randn(seqs, heads, length, dim, device=dev, dtype=f16)
    k, v = (torch.randn(seqs, heads, length, dim, device=dev, dtype=f16) for _ in range(2))
    rows = [("torch SDPA(is_causal), k/v expanded to 32 heads",
             median(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)))]
    k8, v8 = k[:, :kv].contiguous(), v[:, :kv].contiguous()
    rows.append(("torch SDPA(is_causal, enable_gqa)",
                 median(lambda: F.scaled_dot_product_attention(q, k8, v8, is_causal=True, enable_gqa=True))))
    for rotary in (None, llama3_rotary(length)):
        args = (qkv, *caches, tables, cu, ctx, length, heads, kv, dim)
        name = "rotary" if rotary else "no rotary"
        rows.append((f"prefill_attention paged ({name}), whole op",
                     median(lambda: ops.prefill_attention(*args, 0.1, rotary, out=out))))
        rows.append((f"  its k/v store ({name})", median(lambda: triton_ops.append_chunks(*args, rotary))))
        rows.append((f"  its attention ({name})",
                     median(lambda: triton_ops.attend_chunks(*args, rotary, None, 0.1, 0, None, out))))
    sweep_configs = ("128,64,4,3", "128,128,8,2", "64,64,4,3", "64,128,4,3", "128,32,8,3", "128,64,8,2",
                     "128,64,8,4", "64,64,8,3") if sweep else ()
    for config in sweep_configs:
        os.environ["FT_RUNNER_PREFILL"] = config
        try:
            rows.append((f"  its attention (rotary) config={config}",
                         median(lambda: triton_ops.attend_chunks(*args, rotary, None, 0.1, 0, None, out))))
        except Exception as e:  # noqa: BLE001 (a config may not fit in shared memory)
            print(f"config {config}: {type(e).__name__}", flush=True)
        finally:
            os.environ.pop("FT_RUNNER_PREFILL", None)
    for name, t in rows:
        rate = "" if "store" in name else f" {flops / t / 1e6:6.1f} TFLOP/s"
        print(f"prefill llama3 {seqs}x{length}: {name:<52} {t:8.1f} us{rate}", flush=True)


def bench_other() -> None:
    dev, f16 = "cuda", torch.float16
    rows = []
    for hidden in (1024, 4096):
        h = [torch.randn(1, hidden, device=dev, dtype=f16) for _ in range(64)]
        w, b = torch.ones(hidden, device=dev, dtype=f16), torch.zeros(hidden, device=dev, dtype=f16)
        rows.append((f"add_norm B=1 H={hidden}", graph_time_us(lambda i: ops.add_norm(h[i], h[i - 1], b, w, b, 1e-5),
                                                               64)))
    from ft_runner.engine.step_state import StepState

    for batch in (1, 64):
        state = StepState.allocate(batch, 256, 255, dev)
        state.params.temperature.fill_(1.0)
        state.out_lens.fill_(10 ** 6)
        logits = torch.randn(batch, 50257, device=dev, dtype=f16)
        rows.append((f"greedy_step B={batch} V=50257", graph_time_us(lambda i: ops.greedy_step(logits, 50257, state),
                                                                     32)))
    for row in rows:
        print(f"{row[0]:<48} {row[1]:8.1f} us" + (f" {row[2]:6.0f} GB/s" if len(row) > 2 else ""), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also search a grid of configs for each kernel")
    p.add_argument("--parts", default="gemv,skinny,attention,other,paged",
                   help="which benchmarks (comma-separated)")
    p.add_argument("--shapes", default="", help="few-row GEMM: only the shapes whose names start with this")
    args = p.parse_args()
    print(f"[microbench] {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    parts = {"gemv": bench_gemv, "skinny": lambda sweep: bench_skinny(sweep, args.shapes),
             "attention": bench_attention, "other": lambda _: bench_other(), "paged": bench_paged}
    for part in args.parts.split(","):
        parts[part](args.sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
