"""GPU correctness under mpirun: the Triton kernels, and ft_runner against HF transformers in fp32 and fp16.

    mpirun -n 2 python3 benchmarks/gpu_checks.py --tp 2 --dtypes fp32,fp16
    python3 benchmarks/gpu_checks.py --tp 1 --dtypes fp32,fp16

Rank 0 first runs ft_runner/kernels/selfcheck.py on its GPU. Then, for each random model (tiny
GPT-2 (also with a second end token) / GPT-J / GPT-NeoX / LLaMA (llama3 and YaRN RoPE) / Qwen2 with large weights,
so greedy steps are not near-ties, and a gpt2-medium shape with HF's own init) and each dtype, every rank loads its shard through
convert -> load_stage and generates 32 greedy tokens for 4 prompts (batched, then each alone,
then batched without CUDA graphs); rank 0 compares with HF transformers on its GPU:
- prompt logits against HF fp32 (max abs diff; relative ||ours - hf|| / ||hf||);
- the log-probs of our generated tokens (batched, and each row alone) against HF fp32 scoring the
  same sequences (this checks the fused decode step itself, whatever the tokens);
- greedy tokens against HF's own greedy generate in the same dtype (matching prefix length),
  batched == without graphs, and in fp32 == each row alone (in fp16 the prefix where a row alone
  agrees with the batch is reported: other kernels, so a near-tie may flip).
Pass: fp32: tokens equal and logits within 1e-3; fp16: relative errors of logits and decode
log-probs <= 1e-2 (or <= twice HF's own fp16-vs-fp32 error where that is larger: the tiny models'
large weights amplify rounding); the greedy prefix is reported (fp16 noise can flip a near-tie).
Prints `GPUCHECK ...` lines and `GPUCHECKS ok` / `GPUCHECKS FAILED` (exit 1) on rank 0.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ft_runner import parallel  # noqa: E402

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "a", "The class statement defines a new class"]
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NEW_TOKENS = 32


def make_models(root: Path) -> list[Path]:
    """Random HF models (rank 0): tiny families with large weights, and a gpt2-medium shape."""
    import transformers
    from bench_generate import hf_config
    from helpers import TOKENIZER_DIR, make_tiny_gpt2
    from tiny_families import make

    models = [make_tiny_gpt2(root / "tiny-gpt2"), _with_two_end_tokens(root / "tiny-gpt2", root / "tiny-gpt2-ends")]
    # llama_tied_bias and qwen2: YaRN (the fused decoder, and the module one for qwen2's sliding window)
    models += [make(name, root) for name in ("gptj", "gpt_neox", "llama", "llama_tied_bias", "qwen2")]
    medium = root / "gpt2-medium-random"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config("gpt2-medium")).save_pretrained(medium)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(medium)
    return models + [medium]


def _with_two_end_tokens(plain: Path, path: Path) -> Path:
    """The tiny GPT-2 again, with a second end token: the one its greedy continuation of the first prompt
    reaches at step 6 (as Llama 3 Instruct lists <|eot_id|> beside <|end_of_text|>)."""
    import transformers
    from helpers import hf_greedy, make_tiny_gpt2

    tokenizer = transformers.AutoTokenizer.from_pretrained(plain)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    new = hf_greedy(plain, ids, 8)[len(ids):]
    return make_tiny_gpt2(path, eos_token_id=[tokenizer.eos_token_id, new[5]])


def hf_reference(model_dir: Path, prompts, dtype, device, ours, alone, inflight=()) -> dict:
    """HF fp32: prompt logits and scores of our sequences (batched, each row alone, the in-flight
    engine's); HF in `dtype`: its own greedy tokens."""
    import transformers

    ref = {"logits": [], "scores": [], "alone_scores": [], "inflight_scores": [], "greedy": [], "own_rel": 0.0}
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    eos = hf.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos  # the padding of generate's output

    def score(model, out, row, prompt_len):
        seq = out.output_ids[row, : out.sequence_lengths[row]]
        logp = torch.log_softmax(model(torch.tensor([seq], device=device)).logits[0].float(), -1)
        new = torch.tensor(seq[prompt_len:], device=device)
        return logp[prompt_len - 1: len(seq) - 1].gather(1, new[:, None])[:, 0].cpu().numpy()

    with torch.no_grad():
        for row, ids in enumerate(prompts):
            ref["logits"].append(hf(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy())
            ref["scores"].append(score(hf, ours, row, len(ids)))
            ref["alone_scores"].append(score(hf, alone[row], 0, len(ids)))
        for seq, ids in zip(inflight, prompts):
            logp = torch.log_softmax(hf(torch.tensor([seq], device=device)).logits[0].float(), -1)
            new = torch.tensor(seq[len(ids):], device=device)
            ref["inflight_scores"].append(logp[len(ids) - 1: len(seq) - 1].gather(1, new[:, None])[:, 0].cpu().numpy())
        hf = hf.to(dtype)
        for row, ids in enumerate(prompts):  # HF's own error in this dtype: the floor for ours
            own = hf(torch.tensor([ids], device=device)).logits[0].float().cpu().numpy()
            ref["own_rel"] = max(ref["own_rel"], rel(own, ref["logits"][row]))
        for ids in prompts:
            out = hf.generate(torch.tensor([ids], device=device), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=eos)
            ref["greedy"].append(out[0].cpu().tolist())
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ref


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_model(model_dir: Path, dtype: str, args, runtime) -> bool:
    import transformers

    from ft_runner.checkpoint.convert import convert
    from ft_runner.checkpoint.load import load_stage
    from ft_runner.engine.generator import Batch, Generator

    device = runtime.device
    out_dir = Path(args.workdir) / "ft" / model_dir.name / dtype
    ckpt = parallel.from_root(runtime.comm, lambda: str(convert(model_dir, out_dir, args.tp, dtype, log=lambda *_: None)))
    stage = load_stage(Path(ckpt), runtime.grid, runtime.tp_group, dtype, device)
    gen = Generator(stage, runtime)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    end_id = stage.config.end_id
    batch = Batch.make(prompts, NEW_TOKENS, end_id=end_id)
    logits = gen.prompt_logits(batch)
    out = gen.generate(batch)
    alone = [gen.generate(Batch.make([p], NEW_TOKENS, end_id=end_id)) for p in prompts]
    graphs, gen.graphs = gen.graphs, None
    eager = gen.generate(batch)
    gen.graphs = graphs
    decoder = type(gen.decoder).__name__
    inflight = inflight_runs(stage, gen, runtime, prompts)
    del gen, stage
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if runtime.rank != 0:
        return True
    ref = hf_reference(model_dir, prompts, TORCH_DTYPES[dtype], device, out, alone, inflight["staggered"][0])
    ours = [out.output_ids[r, : out.sequence_lengths[r]].tolist() for r in range(len(prompts))]
    solo = [a.output_ids[0, : a.sequence_lengths[0]].tolist() for a in alone]
    no_graph = [eager.output_ids[r, : eager.sequence_lengths[r]].tolist() for r in range(len(prompts))]
    abs_diff = max(float(np.abs(logits[r, : len(p)] - ref["logits"][r]).max()) for r, p in enumerate(prompts))
    logit_rel = max(rel(logits[r, : len(p)], ref["logits"][r]) for r, p in enumerate(prompts))
    score_rel = max(rel(out.output_log_probs[r, : len(ref["scores"][r])], ref["scores"][r])
                    for r in range(len(prompts)))
    score_rel = max(score_rel, *(rel(a.output_log_probs[0, : len(sc)], sc) for a, sc in zip(alone, ref["alone_scores"],
                                                                                            strict=True)))
    agree = min(prefix(o[len(p):], h[len(p):]) for o, h, p in zip(ours, ref["greedy"], prompts, strict=True))
    wanted = min(len(h) - len(p) for h, p in zip(ref["greedy"], prompts, strict=True))
    # With and without graphs the kernels are the same: the tokens must be too. A row alone runs other
    # kernels than the batch (GEMV and folded norms at batch 1, cuBLAS above), so in fp16/bf16 a near
    # tie may flip; there each row alone is held to the batch's bar instead: HF fp32's log-probs of
    # the tokens it chose (in score_rel).
    alone_agree = min(prefix(o[len(p):], s[len(p):]) for o, s, p in zip(ours, solo, prompts, strict=True))
    consistent = ours == no_graph and (ours == solo or dtype != "fp32")
    if dtype == "fp32":  # the same tokens, and the same stops (every end token the model lists)
        lengths = [len(o) for o in ours] == [len(h) for h in ref["greedy"]]
        ok = consistent and agree >= wanted and lengths and abs_diff <= 1e-3 and score_rel <= 1e-4
    else:  # fp16 / bf16: within 1e-2, or within twice HF's own error in this dtype where that is larger
        limit = max(1e-2, 2 * ref["own_rel"])
        ok = consistent and score_rel <= limit and logit_rel <= limit
    ok &= check_inflight(inflight, ours, ref, prompts, dtype, model_dir.name)
    print(f"GPUCHECK {'ok  ' if ok else 'FAIL'} model={model_dir.name} dtype={dtype} tp={args.tp} decoder={decoder} "
          f"logits_max_abs={abs_diff:.2e} logits_rel={logit_rel:.2e} (hf_{dtype}_rel={ref['own_rel']:.2e}) "
          f"decode_logprob_rel={score_rel:.2e} "
          f"greedy_prefix_vs_hf={agree}/{wanted} consistent={consistent} (alone_prefix={alone_agree})",
          flush=True)
    if not consistent:
        for r in range(len(prompts)):
            if not ours[r] == solo[r] == no_graph[r]:
                print(f"  row {r}: batched {ours[r]}\n         alone   {solo[r]}\n         eager   {no_graph[r]}")
    return ok


def inflight_runs(stage, gen, runtime, prompts) -> dict:
    """The in-flight engine on the same prompts: joining one per step with a budget that chunks them
    and a cache that forces preemption, and each alone; sequences and log-probs (rank 0)."""
    from parity_check import run_inflight

    runs = {}
    for mode, staggered in (("staggered", True), ("alone", False)):
        seqs, logprobs, core = run_inflight(stage, gen, runtime, prompts, NEW_TOKENS, staggered=staggered)
        runs[mode] = (seqs, logprobs)
        runs[f"{mode}_preemptions"] = core.scheduler.preemptions
    return runs


def check_inflight(runs: dict, ours, ref, prompts, dtype: str, name: str) -> bool:
    """fp32: equal to HF and to each request alone; fp16/bf16: the log-probs of the tokens it chose
    against HF fp32 within the static engine's bar, the agreeing prefixes reported."""
    (seqs, logprobs), (solo, _) = runs["staggered"], runs["alone"]
    vs_alone = min(prefix(a[len(p):], b[len(p):]) for a, b, p in zip(seqs, solo, prompts, strict=True))
    vs_static = min(prefix(a[len(p):], b[len(p):]) for a, b, p in zip(seqs, ours, prompts, strict=True))
    vs_hf = min(prefix(a[len(p):], h[len(p):]) for a, h, p in zip(seqs, ref["greedy"], prompts, strict=True))
    wanted = min(len(h) - len(p) for h, p in zip(ref["greedy"], prompts, strict=True))
    score_rel = max(rel(lp, sc) for lp, sc in zip(logprobs, ref["inflight_scores"], strict=True))
    if dtype == "fp32":
        ok = (seqs == solo and vs_hf >= wanted and [len(s) for s in seqs] == [len(h) for h in ref["greedy"]]
              and score_rel <= 1e-4)
    else:  # other batch shapes round differently, so a near-tie may flip: the chosen tokens' scores decide
        ok = score_rel <= max(1e-2, 2 * ref["own_rel"])
    print(f"GPUCHECK {'ok  ' if ok else 'FAIL'} inflight model={name} dtype={dtype} decode_logprob_rel={score_rel:.2e} "
          f"prefix_vs_alone={vs_alone} "
          f"prefix_vs_static={vs_static} prefix_vs_hf={vs_hf}/{wanted} preemptions={runs['staggered_preemptions']}",
          flush=True)
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtypes", default="fp32,fp16")
    p.add_argument("--workdir", default="/tmp/ft_runner_gpu_checks")
    p.add_argument("--skip-kernels", action="store_true")
    p.add_argument("--only", default="", help="comma-separated model names (default: every model)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of this script")
    args = p.parse_args(argv)
    runtime = parallel.init_runtime(args.tp, 1, args.device)
    ok = True
    if runtime.rank == 0 and not args.skip_kernels:
        from ft_runner.kernels import selfcheck

        ok &= selfcheck.run(runtime.device.type)
    root = Path(args.workdir) / "hf"
    paths = parallel.from_root(runtime.comm, lambda: "\n".join(str(m) for m in make_models(root)))
    for model in paths.split("\n"):
        if args.only and Path(model).name not in args.only.split(","):
            continue
        for dtype in args.dtypes.split(","):
            ok &= check_model(Path(model), dtype, args, runtime)
    ok = runtime.comm.bcast(ok, root=0)
    if runtime.rank == 0:
        print("GPUCHECKS ok" if ok else "GPUCHECKS FAILED", flush=True)
    parallel.shutdown(runtime)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
