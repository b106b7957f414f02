"""Per-kernel timings on one GPU, to tune the decode kernels (not part of any test).

    python3 benchmarks/microbench.py [--sweep]

Each kernel is timed the way the engine runs it: as a CUDA graph of many back-to-back launches,
each on its own copy of the weights (so the L2 cache never holds them), replayed and timed with
CUDA events. Prints, per GEMV shape of gpt2-medium and GPT-J at batch 1, cuBLAS (F.linear)
against the Triton GEMV (its heuristic config, and with --sweep the best of a grid of configs)
in us and GB/s; then the other decode kernels at their real sizes.
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


def bench_attention_sweep() -> None:
    """decode_attention over FT_RUNNER_ATTN="block_t,min_programs,warps" settings."""
    dev, f16 = "cuda", torch.float16
    for batch, heads, dim, rot in ((1, 16, 64, 0), (1, 16, 256, 64), (32, 16, 256, 64), (64, 16, 256, 64)):
        caches = [torch.randn(batch, heads, 256, dim, device=dev, dtype=f16) for _ in range(2)]
        qkv = torch.randn(batch, 3 * heads * dim, device=dev, dtype=f16)
        pos = torch.full((batch,), 192, device=dev)
        rope = None
        if rot:
            inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=dev).float() / rot))
            rope = (*ops.rope_tables(inv, 256), rot, True)
        results = []
        for block_t, programs, warps in itertools.product((16, 32, 64), (128, 512, 2048), (4, 8)):
            if block_t * dim > 16384:
                continue
            os.environ["FT_RUNNER_ATTN"] = f"{block_t},{programs},{warps}"
            try:
                t = graph_time_us(lambda i: ops.decode_attention(qkv, *caches, pos, heads, heads, dim, 0.1, rope), 16)
            finally:
                del os.environ["FT_RUNNER_ATTN"]
            results.append((t, (block_t, programs, warps)))
        results.sort()
        print(f"attention sweep B={batch} D={dim}: " + ", ".join(f"{t:.1f}us {c}" for t, c in results[:4]),
              flush=True)


def bench_other() -> None:
    dev, f16 = "cuda", torch.float16
    rows = []
    for hidden in (1024, 4096):
        h = [torch.randn(1, hidden, device=dev, dtype=f16) for _ in range(64)]
        w, b = torch.ones(hidden, device=dev, dtype=f16), torch.zeros(hidden, device=dev, dtype=f16)
        rows.append((f"add_norm B=1 H={hidden}", graph_time_us(lambda i: ops.add_norm(h[i], h[i - 1], b, w, b, 1e-5),
                                                               64)))
    for batch, heads, dim, rot, ctx in ((1, 16, 64, 0, 192), (1, 16, 256, 64, 192), (32, 16, 64, 0, 192),
                                        (32, 16, 256, 64, 192), (64, 16, 256, 64, 192), (1, 32, 128, 128, 192)):
        kv = 8 if dim == 128 else heads
        caches = [torch.randn(batch, kv, 256, dim, device=dev, dtype=f16) for _ in range(2)]
        qkv = torch.randn(batch, (heads + 2 * kv) * dim, device=dev, dtype=f16)
        pos = torch.full((batch,), ctx, device=dev)
        rope = None
        if rot:
            inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device=dev).float() / rot))
            rope = (*ops.rope_tables(inv, 256), rot, dim == 256)
        t = graph_time_us(lambda i: ops.decode_attention(qkv, *caches, pos, heads, kv, dim, dim ** -0.5, rope), 32)
        kv_bytes = 2 * batch * kv * ctx * dim * 2
        rows.append((f"attention B={batch} heads={heads}/{kv} D={dim} ctx={ctx}", t, kv_bytes / t / 1e3))
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
    p.add_argument("--sweep", action="store_true", help="also search a grid of Triton GEMV configs")
    args = p.parse_args()
    print(f"[microbench] {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    bench_gemv(args.sweep)
    bench_other()
    if args.sweep:
        bench_attention_sweep()
    return 0


if __name__ == "__main__":
    sys.exit(main())
