"""Run under mpirun by test_parity.py and test_families.py: our TP x PP model against HF transformers.

    mpirun -n TP*PP python parity_check.py --model DIR [DIR ...] --out OUT --tp T --pp P [--refs REFS]
                                           [--quantization int8_wo|fp8]

For each model directory (HF or Megatron-LM), rank 0 converts it to OUT/<name>/<TP>-gpu and every
rank loads its shard; then the prompts' logits, their batched greedy continuations, each
prompt's continuation alone (or the first --solo N) and the in-flight engine's continuations
(prompts arriving one per step, a token budget that chunks them, a cache small enough to preempt)
are compared with HF transformers'. The reference comes from
REFS/<name>.npz (tiny_families.py writes them) or, without --refs, from HF on rank 0. Prints one
line `PARITY model=... max_abs_diff=... greedy_equal=...` per model on rank 0 and exits non-zero
if any model differs. With --quantization the reference is HF with the same quantization faked
(each projection's weight replaced by its dequantized per-channel int8 / e4m3 values; fp8 also
rounds each projection's input rows to e4m3 with their own scales, a row-parallel projection's
over each rank's slice of the row, as every rank scales its own); the KV cache stays fp32.
"""

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from ft_runner import parallel
from ft_runner.checkpoint.convert import convert
from ft_runner.checkpoint.load import load_stage
from ft_runner.config import EngineConfig, QuantConfig
from ft_runner.engine.core import EngineCore
from ft_runner.engine.generator import Batch, Generator
from ft_runner.engine.request import SamplingOptions
from ft_runner.serving.protocol import Channel
from ft_runner.serving.worker import run_worker

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "a", "The class statement defines a new class"]


def hf_reference(model_dir: Path, new_tokens: int, quantization: str = "none", tp: int = 1) -> dict:
    """The same fields tiny_families.reference writes: prompt_i, logits_i, greedy_i."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if quantization != "none":
        fake_quantize_gpt2(hf, quantization, tp)
    ref = {}
    for row, text in enumerate(PROMPTS):
        ids = tokenizer(text)["input_ids"]
        with torch.no_grad():
            ref[f"logits_{row}"] = hf(torch.tensor([ids])).logits[0].numpy()
            ref[f"greedy_{row}"] = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                                               pad_token_id=hf.config.eos_token_id)[0].numpy()
        ref[f"prompt_{row}"] = np.array(ids)
    return ref


def fake_quantize_gpt2(hf, kind: str, tp: int) -> None:
    """HF GPT-2 as ft_runner quantizes it on `tp` ranks: every block's Conv1D weight (in, out)
    dequantized per output channel (over all of its inputs, whatever the TP); fp8 also rounds each
    Conv1D's input rows to e4m3 with per-token scales, those of the row-parallel c_proj over each
    rank's contiguous slice of the row."""
    from transformers.pytorch_utils import Conv1D

    from ft_runner.model import quant

    def rows_fp8(pieces: int):
        def hook(_, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            return (torch.cat([quant.fake_quantize_rows_fp8(c) for c in x.chunk(pieces, dim=1)], 1).view(args[0].shape),)
        return hook

    for name, module in hf.transformer.h.named_modules():
        if isinstance(module, Conv1D):
            with torch.no_grad():
                module.weight.copy_(quant.quantize(module.weight.T, kind).dequantize().T)
            if kind == "fp8":
                module.register_forward_pre_hook(rows_fp8(tp if name.endswith("c_proj") else 1))


def check(model_dir: Path, args, runtime, quantization: str = "none") -> bool:
    name = model_dir.name
    out_dir = Path(args.out) / name
    ckpt = parallel.from_root(runtime.comm, lambda: str(convert(model_dir, out_dir, args.tp, log=lambda *_: None)))
    quant = QuantConfig(quantization, emulate_fp8=True)  # fp8 through the torch references on CPUs
    stage = load_stage(Path(ckpt), runtime.grid, runtime.tp_group, "fp32", runtime.device, quant)
    generator = Generator(stage, runtime)
    if args.refs:
        ref = dict(np.load(Path(args.refs) / f"{name}.npz"))
    else:
        ref = hf_reference(model_dir, args.new_tokens, quantization, args.tp) if runtime.rank == 0 else None
        ref = runtime.comm.bcast(ref, root=0)
    prompts = [ref[f"prompt_{row}"].tolist() for row in range(len(PROMPTS))]
    end_id = stage.config.end_id
    batch = Batch.make(prompts, args.new_tokens, end_id=end_id)
    logits = generator.prompt_logits(batch)
    out = generator.generate(batch)
    solo_rows = range(len(prompts) if args.solo is None else args.solo)
    alone = {row: generator.generate(Batch.make([prompts[row]], args.new_tokens, end_id=end_id)) for row in solo_rows}
    inflight, _, core = run_inflight(stage, generator, runtime, prompts, args.new_tokens)
    cache_same, hits = (True, 0) if args.no_prefix_cache_check else prefix_cache_check(stage, generator, runtime,
                                                                                          prompts, args.new_tokens)
    del generator, stage
    gc.collect()
    if runtime.rank != 0:
        return True
    worst, equal = 0.0, True
    for row, prompt in enumerate(prompts):
        worst = max(worst, float(np.abs(logits[row, : len(prompt)] - ref[f"logits_{row}"]).max()))
        want = ref[f"greedy_{row}"].tolist()
        got = out.output_ids[row, : out.sequence_lengths[row]].tolist()
        solo = alone[row].output_ids[0, : alone[row].sequence_lengths[0]].tolist() if row in alone else got
        equal &= got == want == solo
        if got != want or solo != got:
            print(f"{name} row {row}: ours {got}\n        hf   {want}\n        solo {solo}", flush=True)
        if inflight[row] != want:
            print(f"{name} row {row}: in-flight {inflight[row]}\n        hf        {want}", flush=True)
    same = all(inflight[row] == ref[f"greedy_{row}"].tolist() for row in range(len(prompts)))
    # with PP > 1 the engine keeps PP micro-batches in flight: these prompts join one per step, so it must
    micro_batched = core.most_in_flight >= args.pp
    print(f"PARITY model={name} quantization={quantization} tp={args.tp} pp={args.pp} max_abs_diff={worst:.2e} "
          f"greedy_equal={equal} inflight_equal={same} preemptions={core.scheduler.preemptions} "
          f"prefix_cache_equal={cache_same} prefix_hits={hits} in_flight={core.most_in_flight}", flush=True)
    return worst <= args.tolerance and equal and same and cache_same and micro_batched


def run_inflight(stage, generator, runtime, prompts, new_tokens, config=None, staggered=True):
    """Rank 0: each prompt's greedy sequence (and its new tokens' log-probs) through EngineCore,
    one prompt joining per step (`staggered`) or each run alone; the other ranks follow its plans
    (serving/worker.py). Returns (sequences, log-probs, the engine); empty lists off rank 0."""
    longest = max(len(p) for p in prompts) + new_tokens
    config = config or EngineConfig(max_num_seqs=3, max_num_batched_tokens=8, kv_block_size=8, max_model_len=longest,
                                    kv_cache_blocks=-(-longest // 8) + 2)  # one request and a bit: preemption
    channel = Channel(runtime.comm)
    core = EngineCore(stage, runtime, config, broadcast=channel.send_step if runtime.grid.world > 1 else None)
    if runtime.rank != 0:
        run_worker(core.runner, generator, channel)
        return [], [], core
    sequences, logprobs = {}, {}
    for prompt in prompts:
        rid = core.add_request(prompt, SamplingOptions(max_tokens=new_tokens))
        sequences[rid], logprobs[rid] = list(prompt), []
        drain(core, sequences, logprobs, steps=1 if staggered else None)
    drain(core, sequences, logprobs)
    if runtime.grid.world > 1:
        channel.send_stop()
    return list(sequences.values()), list(logprobs.values()), core


def prefix_cache_check(stage, generator, runtime, prompts, new_tokens) -> tuple[bool, int]:
    """Prompts sharing prefixes (one ending mid-page, one the cached one plus a token, one cached
    whole), run one after another and then together with the prefix cache, and one after another
    without it: equal greedy sequences; returns (equal, prompt tokens the cache served)."""
    base = prompts[3] + prompts[1]
    shared = [base + prompts[0], base, base + prompts[2], base + prompts[0] + prompts[2][:1], base + prompts[0]]
    longest = max(len(p) for p in shared) + new_tokens

    def run(caching: bool, staggered: bool):
        config = EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, kv_block_size=8, max_model_len=longest,
                              kv_cache_blocks=4 * (-(-longest // 8)), enable_prefix_caching=caching)
        sequences, _, core = run_inflight(stage, generator, runtime, shared, new_tokens, config, staggered)
        return sequences, core.scheduler.prefix_hits

    alone, hits = run(True, staggered=False)  # one after another: each later prompt must find cached pages
    together, _ = run(True, staggered=True)
    # a request's output does not depend on its neighbours (the in-flight check), so one run without
    # the cache is the reference for both
    return alone == together == run(False, staggered=False)[0], hits


def drain(core, sequences: dict, logprobs: dict, steps: int | None = None) -> None:
    while core.has_unfinished() and steps != 0:
        for event in core.step():
            if event.token >= 0:
                sequences[event.request_id].append(event.token)
                logprobs[event.request_id].append(event.logprob)
        steps = None if steps is None else steps - 1


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, nargs="+", type=Path)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--refs", default=None, help="directory of <model name>.npz references")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--solo", type=int, default=None, help="run only the first N prompts alone too (default: all)")
    p.add_argument("--quantization", default="none", help="comma-separated: none, int8_wo, fp8 (each model in each)")
    p.add_argument("--no-prefix-cache-check", action="store_true", help="skip the prefix cache's runs")
    p.add_argument("--tolerance", type=float, default=1e-4, help="the largest logit difference that passes")
    args = p.parse_args()
    runtime = parallel.init_runtime(args.tp, args.pp, "cpu")
    results = [check(model_dir, args, runtime, q) for model_dir in args.model for q in args.quantization.split(",")]
    parallel.shutdown(runtime)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
