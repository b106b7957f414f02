"""Helpers of the request-surface tests: clients for the three served models, HF references."""

from __future__ import annotations

import functools

import numpy as np
import torch
import transformers

TEXT = "tiny_random_gpt2"  # the text model of the surface_server fixture (conftest.py)
STREAM = TEXT + "_stream"
TOKENS = "fastertransformer"


def text_infer(url: str, prompts: list[str], output_len, **inputs) -> dict:
    """The text model through PyTriton's ModelClient; `inputs` are per-row values (scalars or lists)."""
    from pytriton.client import ModelClient

    rows = len(prompts)
    arrays = {"prompts": np.char.encode(np.array(prompts)[:, None], "utf-8"),
              "request_output_len": _rows(output_len, rows, np.uint32)}
    for name, value in inputs.items():
        arrays[name] = value if isinstance(value, np.ndarray) and value.ndim == 2 else _rows(value, rows, FT_DTYPES[name])
    with ModelClient(url, TEXT, init_timeout_s=120, inference_timeout_s=120) as client:
        return client.infer_batch(**arrays)


FT_DTYPES = {"runtime_top_k": np.uint32, "runtime_top_p": np.float32, "temperature": np.float32,
             "repetition_penalty": np.float32, "presence_penalty": np.float32, "min_length": np.uint32,
             "random_seed": np.uint64, "beam_width": np.uint32, "len_penalty": np.float32,
             "beam_search_diversity_rate": np.float32, "start_id": np.uint32, "end_id": np.uint32,
             "is_return_log_probs": bool, "request_output_len": np.uint32}


def _rows(value, rows: int, dtype):
    values = value if isinstance(value, (list, tuple, np.ndarray)) else [value] * rows
    return np.array(values, dtype=dtype)[:, None]


def token_inputs(prompts: list[list[int]], output_len, **inputs) -> dict:
    """FT-backend tensors as FT's clients build them: ids right-padded, every other input [B, 1]."""
    rows, width = len(prompts), max(max(len(p) for p in prompts), 1)
    ids = np.zeros((rows, width), dtype=np.uint32)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = p
    arrays = {"input_ids": ids, "input_lengths": np.array([[len(p)] for p in prompts], dtype=np.uint32),
              "request_output_len": _rows(output_len, rows, np.uint32)}
    for name, value in inputs.items():
        arrays[name] = value if name.endswith("words_list") else _rows(value, rows, FT_DTYPES[name])
    return arrays


def token_infer(url: str, prompts: list[list[int]], output_len, protocol: str = "http", **inputs) -> dict:
    """The token model through tritonclient, as fastertransformer_backend's identity_test.py calls it."""
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import np_to_triton_dtype

    lib = httpclient if protocol == "http" else grpcclient
    address = url.split("://", 1)[1]
    tensors = []
    for name, array in token_inputs(prompts, output_len, **inputs).items():
        tensor = lib.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    client = lib.InferenceServerClient(address)
    try:
        result = client.infer(TOKENS, tensors)
    finally:
        client.close()
    names = [o["name"] for o in (result.get_response()["outputs"] if protocol == "http"
                                 else result.get_response(as_json=True)["outputs"])]
    return {name: result.as_numpy(name) for name in names}


def word_list(rows: list[list[list[int]]]) -> np.ndarray:
    """FT's word-list format [B, 2, L] int32, built the way FT's word_list.py builds it."""
    width = max([sum(len(w) for w in words) for words in rows] + [1])
    out = np.zeros((len(rows), 2, width), dtype=np.int32)
    out[:, 1] = -1
    for b, words in enumerate(rows):
        flat = [t for w in words for t in w]
        out[b, 0, : len(flat)] = flat
        ends = np.cumsum([len(w) for w in words])
        out[b, 1, : len(ends)] = ends
    return out


@functools.lru_cache(maxsize=2)
def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=2)
def tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path)


def hf_generate(path, prompt: list[int], new: int, **kwargs) -> list[int]:
    """HF transformers' continuation (prompt included); greedy unless kwargs say otherwise."""
    kwargs.setdefault("do_sample", False)
    eos = kwargs.get("eos_token_id", hf_model(path).config.eos_token_id)
    with torch.no_grad():
        out = hf_model(path).generate(torch.tensor([prompt]), max_new_tokens=new, pad_token_id=eos, **kwargs)
    return out[0].tolist()


def hf_logits(path, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) fp32 logits of HF's model at every position."""
    with torch.no_grad():
        return hf_model(path)(torch.tensor([ids])).logits[0]


def ours(result: dict, row: int, beam: int = 0, ids_key: str = "output_ids") -> list[int]:
    return result[ids_key][row, beam, : result["sequence_length"][row, beam]].tolist()
