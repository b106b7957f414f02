"""Quantized serving's accuracy on a random-weight model: logits of int8_wo and fp8 (weights and KV
cache) against the unquantized model's, by cosine similarity.

    python3 benchmarks/quant_checks.py --model gptj-6b                       # on a GPU (issue #19: >= 0.99)
    python3 benchmarks/quant_checks.py --model tiny --device cpu --dtype fp32   # a dry run of this script

One random stage of the shape (bench_serving.random_stage: the same seed, so every variant starts
from the same weights) per variant, built on the device and freed before the next. Each scores the
same random prompts through the in-flight engine's paged path (ModelRunner.prompt_logits: a
prompt of 128 tokens takes the large-batch products, one of 40 the few-row GEMM, one of 1 the
GEMV; the fp8 variant stores its keys and values in e4m3). Reported per variant: the cosine
similarity of each position's logits to the unquantized model's (min and mean over every position
of every prompt; the check is on the last positions' minimum, "final logits") and how often the
top token agrees. Prints `QUANTCHECK ...` lines and `QUANTCHECKS ok` / `QUANTCHECKS FAILED` (exit 1).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from ft_runner import parallel  # noqa: E402
from ft_runner.config import EngineConfig, QuantConfig  # noqa: E402

VARIANTS = {"int8_wo": QuantConfig("int8_wo"), "fp8": QuantConfig("fp8", "fp8")}
PROMPT_LENS = (128, 40, 1)


def scores(shape: str, quant: QuantConfig, runtime, dtype: str, prompts) -> list[torch.Tensor]:
    """fp32 logits (n, vocab) of each prompt, on the host."""
    import bench_generate as bg
    from bench_serving import random_stage

    from ft_runner.engine.model_runner import ModelRunner

    stage = random_stage(bg.hf_config(shape), runtime, dtype, quant)
    pages = -(-max(len(p) for p in prompts) // 16) + 1
    runner = ModelRunner(stage, runtime, EngineConfig(kv_cache_blocks=pages, cuda_graphs=False), pages)
    out = [runner.prompt_logits(p).cpu() for p in prompts]
    del runner, stage
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def compare(base: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    cos = torch.cat([torch.nn.functional.cosine_similarity(g, b, dim=-1) for g, b in zip(got, base)])
    final = torch.stack([torch.nn.functional.cosine_similarity(g[-1], b[-1], dim=0) for g, b in zip(got, base)])
    top = torch.cat([(g.argmax(-1) == b.argmax(-1)).float() for g, b in zip(got, base)])
    return dict(final_min=float(final.min()), min=float(cos.min()), mean=float(cos.mean()), top1=float(top.mean()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gptj-6b", help="a bench_generate shape")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--variants", default="int8_wo,fp8", help=f"comma-separated, of {sorted(VARIANTS)}")
    p.add_argument("--min-cosine", type=float, default=0.99)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    runtime = parallel.init_runtime(1, 1, args.device)
    import bench_generate as bg

    vocab = bg.hf_config(args.model).vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, min(vocab, 50000), size=n).tolist() for n in PROMPT_LENS]
    base = scores(args.model, QuantConfig(), runtime, args.dtype, prompts)
    ok = True
    for name in [v for v in args.variants.split(",") if v]:
        quant = VARIANTS[name] if args.device == "cuda" else QuantConfig(VARIANTS[name].quantization,
                                                                           VARIANTS[name].kv_cache_dtype, True)
        result = compare(base, scores(args.model, quant, runtime, args.dtype, prompts))
        good = result["final_min"] >= args.min_cosine
        ok &= good
        print(f"QUANTCHECK model={args.model} dtype={args.dtype} quantization={quant.quantization} "
              f"kv_cache_dtype={quant.kv_cache_dtype} final_cos_min={result['final_min']:.5f} "
              f"cos_min={result['min']:.5f} cos_mean={result['mean']:.5f} top1_agree={result['top1']:.3f} "
              f"{'ok' if good else 'FAIL'} (>= {args.min_cosine})", flush=True)
    print("QUANTCHECKS ok" if ok else "QUANTCHECKS FAILED", flush=True)
    parallel.shutdown(runtime)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
