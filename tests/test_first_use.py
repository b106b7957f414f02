"""What a new user meets first (issue 18), against the demo's server: `mpirun -n 2 server.py --tp 2` on
the embedded model, with the OpenAI API on. Readiness, quiet logs, chat on the embedded model,
OpenAI parity, stop strings on text and the rejected-request metrics, with real clients."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest
import transformers
from helpers import TOKENIZER_DIR, Server
from pytriton.client import ModelClient

PROMPT = "Thank you for"
MODEL = "tiny_gpt2"
# What a clean start may not print: Triton's W/E lines, Python warnings, tracebacks, log levels.
NOISE = re.compile(r"^[WE]\d{4} |Warning|Traceback|CancelledError|\bERROR\b|\bWARNING\b|^error", re.M)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's server, started by hand: the test itself polls readiness and acts at once."""
    server = Server(2, "--tp", "2", tmp=tmp_path_factory.mktemp("demo"), openai=True).launch()
    server.first_ready = None
    deadline = time.time() + 180
    while time.time() < deadline and server.proc.poll() is None:
        if server.ready():
            server.first_ready = _first_calls(server)
            break
        time.sleep(0.05)
    try:
        assert server.first_ready is not None, server.output()
        yield server
    finally:
        server.stop()


def _first_calls(server) -> dict:
    """Right after the first 200 of /v2/health/ready: the OpenAI API and a Triton model."""
    out = {"models": _status(f"{server.openai_url}/v1/models")}
    with ModelClient(server.http_url, MODEL, init_timeout_s=1, inference_timeout_s=60) as client:
        result = client.infer_batch(prompts=np.array([[PROMPT.encode()]]),
                                    request_output_len=np.array([[4]], dtype=np.uint32))
    out["triton"] = result["sentences"].reshape(-1)[0].decode()
    out["health"] = _status(f"{server.openai_url}/health")
    return out


@pytest.fixture(scope="module")
def client(demo):
    return openai.OpenAI(base_url=f"{demo.openai_url}/v1", api_key="unused", max_retries=0, timeout=120)


# ---- 1. readiness


def test_once_triton_is_ready_every_front_end_answers_at_once(demo):
    assert demo.first_ready["models"] == 200
    assert demo.first_ready["triton"].startswith(PROMPT)
    # the OpenAI /health follows Triton's within moments (set right after Triton's start returns)
    deadline = time.time() + 5
    while _status(f"{demo.openai_url}/health") != 200 and time.time() < deadline:
        time.sleep(0.05)
    assert _status(f"{demo.openai_url}/health") == 200
    for model in (MODEL, f"{MODEL}_stream", "fastertransformer", "health"):
        assert _status(f"{demo.http_url}/v2/models/{model}/ready") == 200


# ---- 7. the embedded model chats


def test_the_embedded_model_has_a_chat_template_and_chat_works(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is a class?"}],
                                         max_tokens=8, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens > 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer.chat_template


# ---- 4. OpenAI parity


def test_an_unknown_model_is_404_model_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"


def test_token_id_prompts_one_list_or_a_batch(client):
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ids = tokenizer(PROMPT)["input_ids"]
    text = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert one.choices[0].text == text and one.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model=MODEL, prompt=[ids, ids[:1]], max_tokens=6, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == text
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        client.completions.create(model=MODEL, prompt=[10**6], max_tokens=2)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    (b'{"model": "tiny_gpt2"}', 400, "prompt"),
    (b'{"model": "tiny_gpt2", "prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    (b'{"model": "tiny_gpt2", "prompt": {"a": 1}}', 400, "prompt"),
    (b'{"model": "nope", "prompt": "x"}', 404, "model"),
])
def test_every_4xx_has_an_openai_error_body(demo, body, status, param):
    code, answer = _post(f"{demo.openai_url}/v1/completions", body)
    assert code == status
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_an_unknown_route_is_an_openai_404(demo):
    code, answer = _post(f"{demo.openai_url}/v1/embeddings", b"{}")
    assert code == 404 and answer["error"]["type"] == "not_found_error"


def test_ignore_eos_min_tokens_and_stop_token_ids(client):
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, logprobs=1,
                                     extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 12
    stop_id = tokenizer(full.choices[0].logprobs.tokens[3])["input_ids"][0]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"stop_token_ids": [stop_id], "ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and cut.usage.completion_tokens <= 4
    eos = tokenizer.eos_token_id
    short = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                      extra_body={"stop_token_ids": [eos], "min_tokens": 12})
    assert short.usage.completion_tokens == 12
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"min_tokens": 5})


# ---- 5. stop strings on the text, whatever the tokenization


def _split_stop(client) -> tuple[str, str, int]:
    """The greedy completion, and a stop string made of the end of one token and the start of the next
    that the tokenizer would tokenize otherwise (so FT's token-sequence match could not find it)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=1,
                                    extra_body={"ignore_eos": True})
    toks, text = out.choices[0].logprobs.tokens, out.choices[0].text
    generated = tokenizer(text)["input_ids"]
    for i in range(2, len(toks) - 1):
        a, b = toks[i], toks[i + 1]
        if len(a) >= 2 and len(b) >= 2 and a.strip() and b.strip():
            stop = a[-2:] + b[:2]
            ids = tokenizer(stop)["input_ids"]
            inside = any(generated[j:j + len(ids)] == ids for j in range(len(generated)))
            if not inside and text.find(stop) == len("".join(toks[:i])) + len(a) - 2:
                return text, stop, i
    pytest.fail(f"no stop string across two tokens in {toks}")


def test_a_stop_string_split_across_tokens_stops_and_is_cut(client, demo):
    text, stop, index = _split_stop(client)
    want = text[: text.find(stop)]
    before = demo.metric("ft_runner:generation_tokens_total")
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens == index + 2
    # the engine stopped within a few steps of the stop, far from max_tokens
    assert demo.metric("ft_runner:generation_tokens_total") - before < index + 2 + 20
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == want


def test_the_text_models_stop_words_are_strings_on_the_text(client, demo):
    text, stop, _ = _split_stop(client)
    want = PROMPT + text[: text.find(stop)]
    inputs = dict(prompts=np.array([[PROMPT.encode()]]), request_output_len=np.array([[40]], dtype=np.uint32),
                  stop_words=np.array([[stop.encode()]], dtype=object))
    with ModelClient(demo.http_url, MODEL, init_timeout_s=30, inference_timeout_s=60) as triton:
        result = triton.infer_batch(**inputs)
    assert result["sentences"].reshape(-1)[0].decode() == want
    from pytriton.client import DecoupledModelClient

    with DecoupledModelClient(demo.grpc_url, f"{MODEL}_stream", init_timeout_s=30, inference_timeout_s=60) as stream:
        parts = list(stream.infer_sample(**{k: v[0] for k, v in inputs.items()}))
    assert PROMPT + "".join(p["text"][0].decode() for p in parts) == want
    assert parts[-1]["finish_reason"][0] == b"stop_word"


# ---- 3. metrics count rejected requests, both APIs


def test_rejected_requests_are_counted_for_both_apis(client, demo):
    rejected = 'ft_runner:requests_total{outcome="rejected"}'
    before = demo.metric(rejected)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT)
    _post(f"{demo.openai_url}/v1/completions", b"{not json")
    from pytriton.client.exceptions import PyTritonClientInferenceServerError

    with ModelClient(demo.http_url, MODEL, init_timeout_s=30) as triton, \
            pytest.raises(PyTritonClientInferenceServerError, match="is empty"):
        triton.infer_batch(prompts=np.array([[b""]]), request_output_len=np.array([[4]], dtype=np.uint32))
    assert demo.metric(rejected) == before + 4


# ---- 8. quiet logs (last: it reads everything the server printed)


def test_a_stream_cancel_is_one_info_line_and_a_clean_run_logs_no_warning(demo):
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(demo.openai_url.rsplit(":", 1)[1]))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data:") < 2:
            received += conn.recv(4096)
    deadline = time.time() + 10
    while "cancelled by its client" not in demo.output() and time.time() < deadline:
        time.sleep(0.1)
    log = demo.output()
    assert log.count("cancelled by its client") == 1, log
    assert not NOISE.findall(log), "\n".join(line for line in log.splitlines() if NOISE.search(line))
