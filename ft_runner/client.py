"""`client.py`: send prompts to a running ft_runner server and print the generations."""

from __future__ import annotations

import argparse
import sys

import numpy as np

DEFAULT_MODEL = "tiny_gpt2"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Query an ft_runner server.")
    p.add_argument("--url", default="localhost", help="http://HOST:8000 or grpc://HOST:8001 (default: localhost)")
    p.add_argument("--model-name", default=DEFAULT_MODEL, help=f"served model name (default: {DEFAULT_MODEL})")
    p.add_argument("--init-timeout-s", type=float, default=600.0, help="how long to wait for the server")
    p.add_argument("--timeout-s", type=float, default=600.0, help="how long one inference may take")
    p.add_argument("--prompts", nargs="+",
                   default=["Q: How are you?", "Q: How big is the universe?", "1 2 3 4 ", "a b c d "])
    p.add_argument("--output-len", type=int, default=30)
    p.add_argument("--beam-width", type=int, default=1)
    return p


def generate(url: str, model_name: str, prompts: list[str], output_len: int, beam_width: int = 1,
             init_timeout_s: float = 600.0, timeout_s: float = 600.0) -> dict:
    """One batched request; returns the output arrays with the batch axis first."""
    from pytriton.client import ModelClient

    batch = len(prompts)
    inputs = {
        "prompts": np.char.encode(np.array(prompts)[:, None], "utf-8"),
        "request_output_len": np.full((batch, 1), output_len, dtype=np.uint32),
        "beam_width": np.full((batch, 1), beam_width, dtype=np.uint32),
    }
    with ModelClient(url, model_name, init_timeout_s=init_timeout_s, inference_timeout_s=timeout_s) as client:
        return client.infer_batch(**inputs)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pytriton.client.exceptions import PyTritonClientError

    try:
        result = generate(args.url, args.model_name, args.prompts, args.output_len, args.beam_width,
                          args.init_timeout_s, args.timeout_s)
    except PyTritonClientError as exc:
        print(f"error: {args.url} model {args.model_name!r}: {exc}", file=sys.stderr)
        return 1
    for i, prompt in enumerate(args.prompts):
        print(f"================[ {i} ]================")
        print(f"prompt: {prompt}")
        for name, value in result.items():
            if value.dtype == object:
                value = np.vectorize(lambda b: b.decode("utf-8", "replace"))(value).squeeze(-1)
            print(f"{name}: {value[i].tolist()}")
    return 0
