"""Streaming: the decoupled text model sends each token as it is generated (issue 4).

Through the shared TP=2 server (conftest.surface_server): PyTriton's DecoupledModelClient and
tritonclient's gRPC stream, Triton's HTTP generate_stream (server-sent events), and
`client.py --stream`. Tokens arrive in order, one response per step; the prompt plus the
concatenated texts equal the non-streamed sentence; the last response says why each row stopped.
"""

import concurrent.futures
import json
import queue
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
from helpers import ROOT
from surface import STREAM, TEXT, hf_generate, text_infer, tokenizer

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "The class statement"]
NEW = 12


def stream_parts(url: str, prompt: str, output_len: int, **inputs) -> list[dict]:
    from pytriton.client import DecoupledModelClient

    arrays = {"prompts": np.array([prompt.encode()]), "request_output_len": np.array([output_len], np.uint32)}
    arrays.update(inputs)
    with DecoupledModelClient(url, STREAM, init_timeout_s=120, inference_timeout_s=120) as client:
        return list(client.infer_sample(**arrays))


def sentence(url: str, prompt: str, output_len: int) -> tuple[str, dict]:
    result = text_infer(url, [prompt], output_len)
    return result["sentences"][0, 0, 0].decode(), result


def test_decoupled_client_gets_one_token_per_step_in_order_and_a_flagged_end(surface_server, tiny_gpt2):
    prompt = PROMPTS[0]
    parts = stream_parts(surface_server.grpc_url, prompt, NEW)
    ids = tokenizer(tiny_gpt2)(prompt)["input_ids"]
    assert [int(p["token_id"][0]) for p in parts] == hf_generate(tiny_gpt2, ids, NEW)[len(ids):]
    text, result = sentence(surface_server.http_url, prompt, NEW)
    prompt_text = tokenizer(tiny_gpt2).decode(ids, skip_special_tokens=True)
    assert prompt_text + "".join(p["text"][0].decode() for p in parts) == text
    assert [p["finish_reason"][0] for p in parts] == [b""] * (NEW - 1) + [b"length"]
    assert "sequence_length" not in parts[0] and int(parts[-1]["sequence_length"][0]) == len(ids) + NEW
    assert parts[-1]["sequence_length"][0] == result["sequence_length"][0, 0]
    assert abs(parts[-1]["cum_log_probs"][0] - result["cum_log_probs"][0, 0]) < 1e-4


def _single_token_word(tok, token_ids):
    """A generated token whose text tokenizes back to exactly that token (usable as a stop string)."""
    for t in token_ids:
        text = tok.decode([t])
        if text.strip() and tok(text)["input_ids"] == [t]:
            return t, text
    pytest.skip("no generated token round-trips through the tokenizer")


def test_grpc_stream_rows_stop_for_length_end_id_and_stop_word(surface_server, tiny_gpt2):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    tok = tokenizer(tiny_gpt2)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    greedy = [hf_generate(tiny_gpt2, i, NEW)[len(i):] for i in ids]
    end = greedy[1][3]
    end_at = greedy[1].index(end) + 1
    stop_token, stop_text = _single_token_word(tok, greedy[2][1:6])
    arrays = {
        "prompts": np.char.encode(np.array(PROMPTS)[:, None], "utf-8"),
        "request_output_len": np.full((3, 1), NEW, np.uint32),
        "end_id": np.array([[tok.eos_token_id], [end], [tok.eos_token_id]], np.uint32),
        "stop_words": np.array([[b""], [b""], [stop_text.encode()]], dtype=object),
    }
    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(surface_server.grpc_url.split("://")[1])
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, array.shape, np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    client.async_stream_infer(STREAM, inputs, enable_empty_final_response=True)
    parts = []
    while True:
        result, error = responses.get(timeout=120)
        assert error is None, error
        if result.get_response().parameters["triton_final_response"].bool_param:
            assert not result.get_response().outputs  # Triton's own end-of-stream flag, empty
            break
        parts.append({name: result.as_numpy(name) for name in ("token_id", "text", "finish_reason")})
    client.stop_stream()
    client.close()
    tokens = np.stack([p["token_id"][:, 0] for p in parts], axis=1)  # (rows, steps)
    stop_at = greedy[2].index(stop_token) + 1
    assert tokens[0].tolist() == greedy[0]
    assert tokens[1].tolist() == greedy[1][:end_at] + [-1] * (NEW - end_at)
    assert tokens[2].tolist() == greedy[2][:stop_at] + [-1] * (NEW - stop_at)
    assert parts[-1]["finish_reason"][:, 0].tolist() == [b"length", b"end_id", b"stop_word"]
    assert parts[end_at - 1]["finish_reason"][1, 0] == b"end_id"
    assert [p["finish_reason"][1, 0] for p in parts[: end_at - 1]] == [b""] * (end_at - 1)


def test_http_generate_stream_sends_one_event_per_token(surface_server, tiny_gpt2):
    prompt = PROMPTS[1]
    body = json.dumps({"prompts": prompt, "request_output_len": NEW, "runtime_top_k": 5, "random_seed": 11})
    request = urllib.request.Request(f"{surface_server.http_url}/v2/models/{STREAM}/generate_stream",
                                     data=body.encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        events = [json.loads(line[len("data: "):]) for line in response.read().decode().splitlines()
                  if line.startswith("data: ")]
    assert len(events) == NEW and [e["finish_reason"] for e in events] == [""] * (NEW - 1) + ["length"]
    result = text_infer(surface_server.http_url, [prompt], NEW, runtime_top_k=5, random_seed=11)
    ids = tokenizer(tiny_gpt2)(prompt)["input_ids"]
    prompt_text = tokenizer(tiny_gpt2).decode(ids, skip_special_tokens=True)
    assert prompt_text + "".join(e["text"] for e in events) == result["sentences"][0, 0, 0].decode()
    assert events[-1]["sequence_length"] == result["sequence_length"][0, 0]


def test_concurrent_streams_each_equal_their_non_streamed_result(surface_server):
    def one(i):
        prompt = PROMPTS[i % 3]
        parts = stream_parts(surface_server.grpc_url, prompt, NEW - i, temperature=np.array([0.9], np.float32),
                             runtime_top_p=np.array([0.8], np.float32), random_seed=np.array([i], np.uint64))
        result = text_infer(surface_server.http_url, [prompt], NEW - i, temperature=0.9, runtime_top_p=0.8,
                            random_seed=i)
        return len(parts) == NEW - i and result["sentences"][0, 0, 0].decode().endswith(
            "".join(p["text"][0].decode() for p in parts))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        assert all(pool.map(one, range(6)))


def test_streaming_refuses_beam_search_with_a_clear_error(surface_server):
    from pytriton.client.exceptions import PyTritonClientInferenceServerError

    with pytest.raises(PyTritonClientInferenceServerError, match="streaming sends one token per step"):
        stream_parts(surface_server.grpc_url, PROMPTS[0], 4, beam_width=np.array([2], np.uint32))


def test_client_cli_stream_prints_the_tokens_as_they_come(surface_server):
    text, _ = sentence(surface_server.http_url, PROMPTS[0], 8)
    cmd = [sys.executable, str(ROOT / "client.py"), "--url", surface_server.grpc_url, "--model-name", TEXT,
           "--output-len", "8", "--prompts", PROMPTS[0], "--stream"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert text in out.stdout and "finish_reason: length" in out.stdout
    out = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert text.endswith(record["text"]) and len(record["tokens"]) == 8 and record["finish_reason"] == "length"
