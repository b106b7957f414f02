"""A random-weight HF model of one of bench_generate.py's shapes, saved with the embedded tokenizer,
for the REST before/after on a host that cannot reach the hub:

    python benchmarks/random_model.py --shape gptj-6b --out /tmp/gptj-random [--dtype fp16]

The vocabulary is the tokenizer's (1024 tokens) so that every generated token decodes to text; the
rest of the shape is the named model's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers
from bench_generate import TOKENIZER_DIR, TORCH_DTYPES, hf_config


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, help="a bench_generate.py shape: gpt2, gpt2-medium, gptj-6b, ...")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dtype", choices=sorted(TORCH_DTYPES), default="fp16")
    args = p.parse_args(argv)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    config = hf_config(args.shape)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[args.dtype])
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved a random {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
          f"vocabulary {config.vocab_size}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
