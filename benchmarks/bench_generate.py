"""Generation speed of ft_runner against HF transformers, on the same random weights, in one run.

    python benchmarks/bench_generate.py --models gpt2-medium,gptj-6b --batch 1,32,64
    mpirun -n 2 python benchmarks/bench_generate.py --tp 2 --models gptj-6b --batch 1 --engines ft_runner
    python benchmarks/bench_generate.py --models tiny --device cpu --batch 1,2 --new-tokens 8   # smoke test
    python benchmarks/bench_generate.py --models gptj-6b --batch 1 --engines ft_runner --quantization none,int8_wo

Per model shape (random weights, `--dtype`): rank 0 builds the HF model on its device and times
HF `generate` eagerly (hf-eager) and with `cache_implementation="static"`, which compiles the
decode step (hf-compiled); the model is saved, converted to FT's layout (ft_runner.checkpoint.
convert), loaded by every rank (load_stage) and timed through Generator (ft_runner). Every
sequence generates exactly `--new-tokens` tokens (no end token) from the same random prompt.

Each mode gets a warm-up, then `--runs` timed runs of `new_tokens` tokens and of 1 token (TTFT);
medians are reported: ms/step = (t(new) - t(1)) / (new - 1), tok/s = batch * new / t(new).
GB/s counts the bytes one decode step must read (the weights, without the embedding lookups, plus
the average KV cache) over ms/step; MBU is that over a device-to-device copy measured in the same
run (bytes read + written). One JSON line per row is appended to
benchmarks/results/<UTC date>_<gpu>.jsonl. `--quantization none,int8_wo` loads the one conversion
once per quantization (rows record `quantization`; GB/s counts the quantized weights' bytes).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ft_runner import parallel  # noqa: E402
from ft_runner.config import QuantConfig  # noqa: E402

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ENGINES = ("ft_runner", "hf-eager", "hf-compiled")
TOKENIZER_DIR = ROOT / "ft_runner" / "assets" / "tiny-gpt2"


def hf_config(name: str):
    """The HF config of a model shape, by name."""
    import transformers

    ids = dict(bos_token_id=0, eos_token_id=0)
    shapes = {
        "tiny": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=512, **ids),
        "gpt2": lambda: transformers.GPT2Config(**ids),
        "gpt2-medium": lambda: transformers.GPT2Config(n_embd=1024, n_layer=24, n_head=16, **ids),
        "gpt2-xl": lambda: transformers.GPT2Config(n_embd=1600, n_layer=48, n_head=25, **ids),
        "gptj-6b": lambda: transformers.GPTJConfig(**ids),
        "llama-3-8b": lambda: transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, **ids),
    }
    if name not in shapes:
        raise SystemExit(f"unknown model shape {name!r}; known: {sorted(shapes)}")
    return shapes[name]()


@dataclasses.dataclass
class Row:
    engine: str
    model: str
    dtype: str
    tp: int
    pp: int
    batch: int
    prompt_len: int
    new_tokens: int
    ms_per_step: float
    tok_s: float
    ttft_ms: float
    gbps: float
    mbu: float
    copy_gbps: float
    quantization: str = "none"  # ft_runner's --quantization (weights); HF runs unquantized


# --- measuring -----------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, GB/s of bytes read plus bytes written (median of 10)."""
    size = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - start)
    del src, dst
    return 2 * size / statistics.median(times) / 1e9


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def measure(run, args, device, warmups: int = 1) -> tuple[float, float]:
    """run(new_tokens) -> (ttft s, total s): medians after `warmups` full runs."""
    for _ in range(warmups):
        run(args.new_tokens)
    ttft = statistics.median(timed(lambda: run(1), device) for _ in range(args.runs))
    total = statistics.median(timed(lambda: run(args.new_tokens), device) for _ in range(args.runs))
    return ttft, total


def prompts(batch: int, length: int, vocab: int) -> np.ndarray:
    return np.random.default_rng(batch).integers(1, min(vocab, 50000), size=(batch, length), dtype=np.int64)


def wait_for_rank0(comm) -> None:
    """A barrier the other ranks wait in without spinning a core (rank 0 may take minutes)."""
    request = comm.Ibarrier()
    while not request.Test():
        time.sleep(0.01)


# --- bytes per decode step -------------------------------------------------------------------------


def step_bytes(weight_bytes: int, layers: int, kv_heads: int, head_dim: int, elem: int, batch: int, args) -> float:
    """Weights plus the KV cache read by an average decode step (context prompt + new/2)."""
    context = args.prompt_len + args.new_tokens / 2
    return weight_bytes + batch * context * 2 * layers * kv_heads * head_dim * elem


def ft_geometry(stage) -> tuple[int, int, int, int]:
    """(weight bytes read per step, local layers, local KV heads, head_dim) of one rank's stage."""
    skip = {id(m.weight) for m in (stage.wte, stage.wpe) if m is not None}
    weights = sum(p.numel() * p.element_size() for p in stage.parameters() if id(p) not in skip)
    attn = stage.layers[0].attn
    return weights, len(stage.layers), attn.kv_heads, attn.head_dim


def hf_geometry(model) -> tuple[int, int, int, int]:
    config = model.config
    lookups = set()
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp.weight is not out.weight:
        lookups.add(id(inp.weight))
    for name, module in model.named_modules():
        if name.endswith("wpe"):
            lookups.add(id(module.weight))
    seen, weights = set(), 0
    for p in model.parameters():
        if id(p) not in seen and id(p) not in lookups:
            weights += p.numel() * p.element_size()
        seen.add(id(p))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return weights, config.num_hidden_layers, kv, head_dim


# --- the engines -----------------------------------------------------------------------------------


def build_hf(name: str, dtype, device, hf_dir: Path):
    """A random-weight HF model on `device`, saved to hf_dir (with the embedded tokenizer) once."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config(name), dtype=dtype).eval()
    if not (hf_dir / "config.json").exists():
        model.save_pretrained(hf_dir)
        transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(hf_dir)
    return model


def time_hf(model, engine: str, batch: int, args, device):
    ids = torch.from_numpy(prompts(batch, args.prompt_len, model.config.vocab_size)).to(device)
    extra = {"cache_implementation": "static"} if engine == "hf-compiled" else {}

    def run(new):
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0, **extra)

    return measure(run, args, device, warmups=2 if engine == "hf-compiled" else 1)


def time_ft(generator, batch: int, args, device):
    from ft_runner.engine.generator import Batch

    ids = prompts(batch, args.prompt_len, generator.vocab).tolist()

    def run(new):
        generator.generate(Batch.make(ids, new, end_id=-1))  # -1: never ends early

    return measure(run, args, device)


def profile_decode(generator, batch: int, args, device) -> None:
    """Per-kernel device time of one decode step (eager launches: the kernels a graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    from ft_runner.engine.generator import Batch

    ids = prompts(batch, args.prompt_len, generator.vocab).tolist()
    graphs, generator.graphs = generator.graphs, None
    totals = []
    try:
        for new in (1, 17):
            generator.generate(Batch.make(ids, new, end_id=-1))
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                generator.generate(Batch.make(ids, new, end_id=-1))
                synchronize(device)
            agg: dict = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                    name = e.name[:90]
                    count, total = agg.get(name, (0, 0.0))
                    agg[name] = (count + 1, total + t)
            totals.append(agg)
    finally:
        generator.graphs = graphs
    per_step = {k: ((c - totals[0].get(k, (0, 0))[0]) / 16, (t - totals[0].get(k, (0, 0.0))[1]) / 16)
                for k, (c, t) in totals[1].items()}
    rows = sorted(per_step.items(), key=lambda kv: -kv[1][1])
    total_us = sum(t for _, t in per_step.values())
    launches = sum(c for c, _ in per_step.values())
    print(f"PROFILE batch={batch}: {launches:.0f} kernels/step, {total_us:.0f} us/step of kernel time", flush=True)
    for name, (count, t) in rows[:14]:
        print(f"PROFILE   {t:8.1f} us {count:6.1f}x  {name}", flush=True)


# --- driver ----------------------------------------------------------------------------------------


def bench_model(name: str, args, runtime, copy_gbps: float) -> list[Row]:
    from ft_runner.checkpoint.convert import convert
    from ft_runner.checkpoint.load import load_stage
    from ft_runner.engine.generator import Generator

    device, grid = runtime.device, runtime.grid
    work = Path(args.workdir) / name
    hf_dir = work / f"hf-{args.dtype}"
    timings, geometry = {}, {}
    if runtime.rank == 0:
        model = build_hf(name, TORCH_DTYPES[args.dtype], device, hf_dir)
        geometry["hf"] = hf_geometry(model)
        for engine in (e for e in args.engines if e.startswith("hf")):
            for batch in args.batch:
                timings[(engine, "none", batch)] = time_hf(model, engine, batch, args, device)
                log(f"{name} {engine} batch {batch}: ttft {timings[(engine, 'none', batch)][0] * 1e3:.1f} ms, "
                    f"total {timings[(engine, 'none', batch)][1] * 1e3:.1f} ms")
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if runtime.comm.Get_size() > 1:
        wait_for_rank0(runtime.comm)
    if "ft_runner" in args.engines:
        ckpt_tp = args.ckpt_tp or grid.tp  # another TP's checkpoint is joined / re-split by the loader
        ckpt = parallel.from_root(runtime.comm, lambda: str(convert(hf_dir, work / "ft", ckpt_tp, args.dtype,
                                                                    log=lambda *_: None)))
        for quantization in args.quantization:  # one conversion, loaded (and quantized) once each
            stage = load_stage(Path(ckpt), grid, runtime.tp_group, args.dtype, device, QuantConfig(quantization))
            generator = Generator(stage, runtime)
            geometry[("ft_runner", quantization)] = ft_geometry(stage)
            for batch in args.batch:
                key = ("ft_runner", quantization, batch)
                timings[key] = time_ft(generator, batch, args, device)
                log(f"{name} ft_runner {quantization} batch {batch}: ttft {timings[key][0] * 1e3:.1f} ms, "
                    f"total {timings[key][1] * 1e3:.1f} ms")
                if args.profile and device.type == "cuda":
                    profile_decode(generator, batch, args, device)
            del generator, stage
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    elem = torch.tensor([], dtype=TORCH_DTYPES[args.dtype]).element_size()
    rows = []
    for (engine, quantization, batch), (ttft, total) in sorted(timings.items(), key=lambda kv: (kv[0][2], kv[0][:2])):
        step_s = (total - ttft) / max(args.new_tokens - 1, 1)
        weights, layers, kv, head_dim = geometry[(engine, quantization) if engine == "ft_runner" else "hf"]
        gbps = step_bytes(weights, layers, kv, head_dim, elem, batch, args) / step_s / 1e9
        tp = grid.tp if engine == "ft_runner" else 1
        rows.append(Row(engine, name, args.dtype, tp, 1, batch, args.prompt_len, args.new_tokens, step_s * 1e3,
                        batch * args.new_tokens / total, ttft * 1e3, gbps, gbps / copy_gbps, copy_gbps, quantization))
    return rows


def log(message: str) -> None:
    print(f"[bench] {message}", flush=True)


def commit() -> str:
    if os.environ.get("FT_RUNNER_COMMIT"):
        return os.environ["FT_RUNNER_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"


def speedups(rows: list[Row]) -> dict:
    """(model, batch, engine, quantization) -> {hf engine: tok/s ratio}."""
    base = {(r.model, r.batch, r.engine): r.tok_s for r in rows if r.engine.startswith("hf")}
    out = {}
    for r in rows:
        out[(r.model, r.batch, r.engine, r.quantization)] = {
            hf: r.tok_s / base[(r.model, r.batch, hf)] for hf in ("hf-eager", "hf-compiled")
            if (r.model, r.batch, hf) in base}
    return out


def report(rows: list[Row], args, device) -> Path:
    ups = speedups(rows)
    header = (f"{'model':<12} {'dtype':<5} {'quant':<7} {'TP':>2} {'batch':>5} {'prompt/new':>10} {'engine':<12} "
              f"{'ms/step':>8} {'tok/s':>9} {'TTFT ms':>8} {'GB/s':>7} {'MBU':>5} {'x eager':>8} {'x compiled':>10}")
    lines = [header, "-" * len(header)]
    for r in rows:
        up = ups[(r.model, r.batch, r.engine, r.quantization)]
        fmt = {k: f"{up[k]:.2f}" if k in up else "-" for k in ("hf-eager", "hf-compiled")}
        lines.append(f"{r.model:<12} {r.dtype:<5} {r.quantization:<7} {r.tp:>2} {r.batch:>5} {f'{r.prompt_len}/{r.new_tokens}':>10} "
                     f"{r.engine:<12} {r.ms_per_step:8.3f} {r.tok_s:9.1f} {r.ttft_ms:8.2f} {r.gbps:7.0f} "
                     f"{r.mbu:5.0%} {fmt['hf-eager']:>8} {fmt['hf-compiled']:>10}")
    print("\n".join(lines), flush=True)
    gpu = gpu_name(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{now:%Y-%m-%d}_{gpu.replace(' ', '-')}.jsonl"
    import transformers

    with open(path, "a") as fh:
        for r in rows:
            record = dataclasses.asdict(r)
            record.update(gpu=gpu, torch=torch.__version__, transformers=transformers.__version__, commit=commit(),
                          time=now.isoformat(timespec="seconds"),
                          speedup={k: round(v, 3) for k, v in ups[(r.model, r.batch, r.engine, r.quantization)].items()})
            fh.write(json.dumps(record) + "\n")
    print(f"[bench] appended {len(rows)} rows to {path}", flush=True)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,gpt2-medium", help="comma-separated shapes: tiny, gpt2, gpt2-medium, "
                                                              "gpt2-xl, gptj-6b, llama-3-8b")
    p.add_argument("--batch", default="1,32,64", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp16")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (run under mpirun -n TP)")
    p.add_argument("--ckpt-tp", type=int, default=0, help="convert for this TP (default: --tp); the loader "
                                                            "joins or re-splits it")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {ENGINES}")
    p.add_argument("--runs", type=int, default=3, help="timed runs per mode (median)")
    p.add_argument("--quantization", default="none",
                   help="comma-separated ft_runner weight quantizations, each loaded from the same conversion: none, "
                        "int8_wo, fp8 (the static engine's KV cache stays in --dtype: see bench_serving's "
                        "--kv-cache-dtype)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--workdir", default="/tmp/ft_runner_bench", help="random HF models and FT checkpoints go here")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--profile", action="store_true", help="also print the per-kernel time of a decode step")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batch = [int(b) for b in args.batch.split(",") if b]
    args.engines = [e for e in args.engines.split(",") if e]
    args.quantization = [q for q in args.quantization.split(",") if q]
    for quantization in args.quantization:
        QuantConfig(quantization)  # a clear error for an unknown one
    for engine in args.engines:
        if engine not in ENGINES:
            p.error(f"unknown engine {engine!r}; known: {ENGINES}")
    if args.runs < 1 or args.new_tokens < 2:
        p.error("--runs must be at least 1 and --new-tokens at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runtime = parallel.init_runtime(args.tp, 1, args.device)
    device = runtime.device
    copy_gbps = copy_bandwidth(device)
    if runtime.rank == 0:
        log(f"{gpu_name(device)}: device-to-device copy {copy_gbps:.0f} GB/s (read + write); torch {torch.__version__}")
    try:
        for name in args.models:
            rows = bench_model(name, args, runtime, copy_gbps)
            if runtime.rank == 0:  # each model's table as soon as it is done: a later one may not finish
                report(rows, args, device)
    except Exception:
        if runtime.comm.Get_size() == 1:
            raise
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        runtime.comm.Abort(1)  # never leave the other ranks waiting for this one
    parallel.shutdown(runtime)
    return 0


if __name__ == "__main__":
    sys.exit(main())
