"""Run under mpirun by test_parity.py: our TP x PP model against HF transformers.

Prints one line `PARITY max_abs_diff=... greedy_equal=...` on rank 0 and exits non-zero on a
mismatch. Every rank converts nothing: rank 0 converts, the others load their shards.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from ft_runner import parallel
from ft_runner.checkpoint.convert import convert
from ft_runner.checkpoint.load import load_stage
from ft_runner.engine.generator import Batch, Generator

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "a", "The class statement defines a new class"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    args = p.parse_args()
    runtime = parallel.init_runtime(args.tp, args.pp, "cpu")
    ckpt = parallel.from_root(runtime.comm, lambda: str(convert(Path(args.model), Path(args.out), args.tp)))
    stage = load_stage(Path(ckpt), runtime.grid, runtime.tp_group, "fp32", runtime.device)
    generator = Generator(stage, runtime)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    prompts = [tokenizer(t)["input_ids"] for t in PROMPTS]
    end_id = tokenizer.eos_token_id
    batch = Batch.make(prompts, args.new_tokens, end_id=end_id)
    logits = generator.prompt_logits(batch)
    out = generator.generate(batch)
    alone = [generator.generate(Batch.make([p], args.new_tokens, end_id=end_id)) for p in prompts]
    if runtime.rank != 0:
        return 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    worst, equal = 0.0, True
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0].numpy()
        worst = max(worst, float(np.abs(logits[row, : len(prompt)] - ref).max()))
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=args.new_tokens, do_sample=False,
                           pad_token_id=end_id)[0].tolist()
        got = out.output_ids[row, : out.sequence_lengths[row]].tolist()
        solo = alone[row].output_ids[0, : alone[row].sequence_lengths[0]].tolist()
        equal &= got == want == solo
        if got != want or solo != got:
            print(f"row {row}: ours {got}\n        hf   {want}\n        solo {solo}", flush=True)
    print(f"PARITY tp={args.tp} pp={args.pp} max_abs_diff={worst:.2e} greedy_equal={equal}", flush=True)
    return 0 if worst <= 1e-4 and equal else 1


if __name__ == "__main__":
    sys.exit(main())
