"""`client.py`: send prompts to a running ft_runner server and print the generations.

Every sampling flag becomes one of the text model's per-row inputs (FT's names); flags left out
are not sent, so the server's defaults (greedy) apply. `--stream` uses the decoupled
`<model>_stream` model over gRPC (an http:// URL maps to port 8001 of its host) and prints each token's text as it arrives; `--json` prints one
JSON object per prompt instead of the human-readable blocks.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np

DEFAULT_MODEL = "tiny_gpt2"

# flag -> (input name, numpy dtype)
SAMPLING_FLAGS = {
    "top_k": ("runtime_top_k", np.uint32),
    "top_p": ("runtime_top_p", np.float32),
    "temperature": ("temperature", np.float32),
    "repetition_penalty": ("repetition_penalty", np.float32),
    "presence_penalty": ("presence_penalty", np.float32),
    "min_length": ("min_length", np.uint32),
    "random_seed": ("random_seed", np.uint64),
    "beam_width": ("beam_width", np.uint32),
    "len_penalty": ("len_penalty", np.float32),
    "diversity_rate": ("beam_search_diversity_rate", np.float32),
    "start_id": ("start_id", np.uint32),
    "end_id": ("end_id", np.uint32),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Query an ft_runner server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--url", default="localhost", help="http://HOST:8000 or grpc://HOST:8001")
    p.add_argument("--model-name", default=DEFAULT_MODEL, help="served model name")
    p.add_argument("--init-timeout-s", type=float, default=600.0, help="how long to wait for the server")
    p.add_argument("--timeout-s", type=float, default=600.0, help="how long one inference may take")
    p.add_argument("--prompts", nargs="+", help="the prompts, sent as one batch",
                   default=["Q: How are you?", "Q: How big is the universe?", "1 2 3 4 ", "a b c d "])
    p.add_argument("--output-len", type=int, default=30, help="request_output_len: new tokens per prompt")
    p.add_argument("--beam-width", type=int, default=None, help="beams per prompt (None: the server's 1)")
    s = p.add_argument_group("sampling (FT semantics; None = the server's default: greedy)")
    s.add_argument("--top-k", type=int, help="runtime_top_k: sample from the k most likely tokens")
    s.add_argument("--top-p", type=float, help="runtime_top_p: sample from the smallest set with this mass")
    s.add_argument("--temperature", type=float, help="divides the logits before sampling")
    s.add_argument("--repetition-penalty", type=float, help="multiplicative, 1 = off (not with --presence-penalty)")
    s.add_argument("--presence-penalty", type=float, help="subtracted from seen tokens' logits, 0 = off")
    s.add_argument("--min-length", type=int, help="no end token before this many new tokens")
    s.add_argument("--random-seed", type=int, help="same seed and prompt: same output")
    s.add_argument("--len-penalty", type=float, help="beam scores are divided by length ** len_penalty")
    s.add_argument("--diversity-rate", type=float, help="beam_search_diversity_rate")
    s.add_argument("--start-id", type=int, help="the token an empty prompt starts from")
    s.add_argument("--end-id", type=int, help="the token that ends a generation (None: the model's)")
    s.add_argument("--stop-words", nargs="+",
                   help="generation stops at any of these strings, matched on the text; it is cut before them")
    s.add_argument("--bad-words", nargs="+", help="strings never generated")
    s.add_argument("--return-log-probs", action="store_true", help="also return per-token log-probs")
    p.add_argument("--stream", action="store_true",
                   help="stream tokens as they are generated (the <model>_stream model over gRPC; an http:// URL "
                        "is mapped to gRPC port 8001 of its host; one prompt at a time)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return p


def request_inputs(prompts: list[str], output_len: int, words: dict | None = None, log_probs: bool = False,
                   **sampling) -> dict:
    """The text model's inputs, batch axis first; `sampling` keys are SAMPLING_FLAGS names."""
    rows = len(prompts)
    inputs = {
        "prompts": np.char.encode(np.array(prompts)[:, None], "utf-8"),
        "request_output_len": np.full((rows, 1), output_len, dtype=np.uint32),
    }
    for flag, value in sampling.items():
        if value is not None:
            name, dtype = SAMPLING_FLAGS[flag]
            inputs[name] = np.full((rows, 1), value, dtype=dtype)
    for name, values in (words or {}).items():
        if values:
            inputs[name] = np.tile(np.char.encode(np.array(values, dtype=str), "utf-8")[None, :], (rows, 1))
    if log_probs:
        inputs["is_return_log_probs"] = np.ones((rows, 1), dtype=bool)
    return inputs


def generate(url: str, model_name: str, prompts: list[str], output_len: int, beam_width: int | None = None,
             init_timeout_s: float = 600.0, timeout_s: float = 600.0, **options) -> dict:
    """One batched request; returns the output arrays with the batch axis first."""
    from pytriton.client import ModelClient

    inputs = request_inputs(prompts, output_len, beam_width=beam_width, **options)
    with ModelClient(url, model_name, init_timeout_s=init_timeout_s, inference_timeout_s=timeout_s) as client:
        return client.infer_batch(**inputs)


def stream(url: str, model_name: str, prompt: str, output_len: int, init_timeout_s: float = 600.0,
           timeout_s: float = 600.0, **options):
    """Yield each response of the streaming model (a dict of outputs for the prompt's one row)."""
    from pytriton.client import DecoupledModelClient

    inputs = {k: v[0] for k, v in request_inputs([prompt], output_len, **options).items()}
    with DecoupledModelClient(_grpc_url(url), model_name, init_timeout_s=init_timeout_s,
                              inference_timeout_s=timeout_s) as client:
        yield from client.infer_sample(**inputs)


def _grpc_url(url: str) -> str:
    """DecoupledModelClient speaks gRPC only: an http URL maps to the gRPC port 8001 of its host."""
    if url.startswith("grpc://"):
        return url
    host = url.split("://", 1)[-1].split(":")[0] or "localhost"
    return f"grpc://{host}:8001"


def _options(args) -> dict:
    options = {flag: getattr(args, flag) for flag in SAMPLING_FLAGS if flag != "beam_width"}
    options["words"] = {"stop_words": args.stop_words, "bad_words": args.bad_words}
    options["log_probs"] = args.return_log_probs
    return options


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _print_stream(args, options) -> int:
    for i, prompt in enumerate(args.prompts):
        if not args.json:
            print(f"================[ {i} ]================\nprompt: {prompt}\n{prompt}", end="", flush=True)
        tokens, texts, final = [], [], {}
        for part in stream(args.url, f"{args.model_name}_stream", prompt, args.output_len, args.init_timeout_s,
                           args.timeout_s, **options):
            token, text = int(part["token_id"][0]), _text(part["text"][0])
            tokens.append(token)
            texts.append(text)
            final = part
            if not args.json:
                print(text, end="", flush=True)
        reason = _text(final["finish_reason"][0]) if final else ""
        if args.json:
            print(json.dumps({"prompt": prompt, "tokens": tokens, "text": "".join(texts), "finish_reason": reason,
                              "cum_log_prob": float(final["cum_log_probs"][0]) if "cum_log_probs" in final else None}))
        else:
            print(f"\nfinish_reason: {reason}")
    return 0


def _print_batch(args, result) -> None:
    for i, prompt in enumerate(args.prompts):
        row = {name: value[i] for name, value in result.items()}
        if args.json:
            out = {"prompt": prompt}
            for name, value in row.items():
                out[name] = [_text(v) for v in value.reshape(-1)] if value.dtype == object else value.tolist()
            print(json.dumps(out))
            continue
        print(f"================[ {i} ]================")
        print(f"prompt: {prompt}")
        for name, value in row.items():
            if value.dtype == object:
                value = np.vectorize(_text)(value).squeeze(-1)
            print(f"{name}: {value.tolist()}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from pytriton.client.exceptions import PyTritonClientError
    from pytriton.client.warnings import NotSupportedTimeoutWarning

    # PyTriton warns that its own connection timeouts differ from ours on every call: noise for a CLI
    warnings.filterwarnings("ignore", category=NotSupportedTimeoutWarning)

    options = _options(args)
    try:
        if args.stream:
            if args.beam_width not in (None, 1):
                print("error: --stream sends one token at a time: it needs --beam-width 1", file=sys.stderr)
                return 2
            return _print_stream(args, options)
        result = generate(args.url, args.model_name, args.prompts, args.output_len, args.beam_width,
                          args.init_timeout_s, args.timeout_s, **options)
    except PyTritonClientError as exc:
        print(f"error: {args.url} model {args.model_name!r}: {exc}", file=sys.stderr)
        return 1
    _print_batch(args, result)
    return 0
