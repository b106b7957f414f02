"""The OpenAI-compatible API (issue 9): the official `openai` client against a live mpirun server,
and the request surface against a real in-process engine."""

import copy
import json
import socket
import threading
import time
import urllib.request

import openai
import pytest
import transformers
from helpers import Server, hf_greedy, make_tiny_gpt2

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
PROMPT = "Thank you for"


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = make_tiny_gpt2(tmp_path_factory.mktemp("chat") / "tiny-chat-gpt2", seed=3)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(chat_model, tmp_path_factory):
    with Server(2, "--tp", "2", "--hf-model-name", str(chat_model), tmp=tmp_path_factory.mktemp("openai"),
                openai=True) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.openai_url}/v1", api_key="unused", max_retries=0, timeout=120)


def hf_completion(model_dir, text, n, special=True):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    return tokenizer.decode(hf_greedy(model_dir, ids, n)[len(ids):], skip_special_tokens=True)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["tiny_chat_gpt2"]
    assert urllib.request.urlopen(f"{server.openai_url}/health").status == 200


def test_greedy_completion_equals_hf_and_carries_usage(client, chat_model):
    out = client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=12, temperature=0)
    assert out.choices[0].text == hf_completion(chat_model, PROMPT, 12)
    assert out.choices[0].finish_reason in ("length", "stop")
    prompt_tokens = len(transformers.AutoTokenizer.from_pretrained(chat_model)(PROMPT)["input_ids"])
    assert out.usage.prompt_tokens == prompt_tokens and out.usage.completion_tokens == 12
    assert out.usage.total_tokens == prompt_tokens + 12


def test_streamed_completion_concatenates_to_the_plain_one(client):
    plain = client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_plain_and_streamed_equal_hf_on_the_chat_template(client, chat_model):
    messages = [{"role": "user", "content": "Q: Are you going for lunch?"}]
    templated = "user: Q: Are you going for lunch?\nassistant:"
    want = hf_completion(chat_model, templated, 10, special=False)
    out = client.chat.completions.create(model="tiny_chat_gpt2", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny_chat_gpt2", messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_stop_strings_cut_the_text_and_finish_with_stop(client):
    full = client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"need a visible stop string in {text!r}"
    cut = client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text[: text.find(stop)]


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        return client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=16, temperature=1.0,
                                         seed=seed).choices[0].text

    first = sample(123)
    assert sample(123) == first
    assert any(sample(s) != first for s in (7, 8, 9))


def test_n_choices_and_logprobs(client):
    out = client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=5, temperature=1.0, n=3,
                                    seed=5, logprobs=1)
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) > 0
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)


def test_metrics_move_as_requests_are_served(client, server):
    before = {name: server.metric(name) for name in (
        'ft_runner:requests_total{outcome="success"}', "ft_runner:generation_tokens_total",
        "ft_runner:time_to_first_token_seconds_count", "ft_runner:e2e_request_latency_seconds_count")}
    client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=4, temperature=0)
    after = {name: server.metric(name) for name in before}
    assert all(after[name] > before[name] for name in before), (before, after)
    assert server.metric("ft_runner:num_requests_running") == 0


def test_a_client_leaving_mid_stream_is_cancelled(client, server):
    """The client closes its SSE connection after two chunks of 100: the engine gives its job up."""
    cancelled = 'ft_runner:requests_total{outcome="cancelled"}'
    before = server.metric(cancelled)
    body = json.dumps({"model": "tiny_chat_gpt2", "prompt": PROMPT, "max_tokens": 100, "ignore_eos": True,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", int(server.openai_url.rsplit(":", 1)[1]))) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        received = b""
        while received.count(b"data:") < 2:
            chunk = conn.recv(4096)
            assert chunk, "the stream ended before two chunks"
            received += chunk
    deadline = time.time() + 10
    while server.metric(cancelled) == before and time.time() < deadline:
        time.sleep(0.1)
    assert server.metric(cancelled) == before + 1
    assert server.metric("ft_runner:num_requests_running") == 0
    client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, max_tokens=4, temperature=0)


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=5000), "max_tokens"), (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(n=0), "n"), (dict(presence_penalty=1.0, extra_body={"repetition_penalty": 1.2}), "presence_penalty"),
    (dict(extra_body={"top_k": -5}), "top_k"),
])
def test_bad_parameters_are_400_with_an_openai_error_body(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny_chat_gpt2", prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"


def test_missing_prompt_is_400(client):
    with pytest.raises(openai.BadRequestError):
        client.post("/completions", body={"model": "tiny_chat_gpt2"}, cast_to=object)


# ---- in-process: a real engine and Frontend on one rank, FastAPI's test client


@pytest.fixture(scope="module")
def local_engine(tiny_gpt2, tmp_path_factory):
    """A real Frontend over a one-rank CPU engine, its thread running; and the model's tokenizer."""
    from ft_runner import parallel
    from ft_runner.checkpoint.convert import convert
    from ft_runner.checkpoint.load import load_stage
    from ft_runner.engine.core import EngineCore
    from ft_runner.engine.generator import Generator
    from ft_runner.serving.frontend import Frontend
    from ft_runner.serving.openai_api import OpenAIServer
    from ft_runner.serving.protocol import Channel

    runtime = parallel.init_runtime(1, 1, "cpu")
    ckpt = convert(tiny_gpt2, tmp_path_factory.mktemp("ft"), 1)
    stage = load_stage(ckpt, runtime.grid, None, "fp32", runtime.device)
    engine = Frontend(EngineCore(stage, runtime), Generator(stage, runtime), Channel(runtime.comm))
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,), daemon=True)
    loop.start()
    yield engine, transformers.AutoTokenizer.from_pretrained(ckpt)
    stop.set()
    loop.join(10)


@pytest.fixture(scope="module")
def local_api(local_engine):
    from fastapi.testclient import TestClient

    from ft_runner.serving.openai_api import OpenAIServer

    engine, tokenizer = local_engine

    def make(no_chat_template=False, **kw):
        tok = tokenizer
        if no_chat_template:  # the embedded tokenizer has one
            tok = copy.copy(tokenizer)
            tok.chat_template = None
        return TestClient(OpenAIServer(engine, tok, engine.generator.model.config, "m", **kw).app)

    return make


def test_a_model_without_chat_template_answers_400(local_api):
    r = local_api(no_chat_template=True).post("/v1/chat/completions",
                                              json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


def test_overload_answers_429(local_api):
    r = local_api(max_concurrent=0).post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 429 and r.json()["error"]["type"] == "server_overloaded"


def test_streaming_sends_sse_chunks_ending_with_done(local_api):
    with local_api().stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 4, "temperature": 0,
                                                              "stream": True, "ignore_eos": True,
                                                              "stream_options": {"include_usage": True}}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert '"usage"' in events[-2] and '"completion_tokens": 4' in events[-2]


def test_frequency_penalty_changes_the_greedy_continuation_as_the_sampler_says(local_api):
    """OpenAI's frequency_penalty goes to the in-flight sampler (tests/test_inflight_sampler.py checks
    its arithmetic): a strong one moves a greedy continuation off the tokens it already repeated."""
    client = local_api()
    body = dict(model="m", prompt="The class statement defines", max_tokens=24, temperature=0)
    plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    penalised = client.post("/v1/completions", json={**body, "frequency_penalty": 2.0}).json()
    assert penalised["choices"][0]["text"] != plain and penalised["usage"]["completion_tokens"] > 0


def serve_with_small_send_buffers(app) -> tuple[object, int]:
    """uvicorn on a listening socket whose connections get 8 kB send buffers (as over a slow network:
    no autotuning to megabytes, as loopback does), so that a client that stops reading blocks its writes."""
    import uvicorn

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)  # accepted sockets inherit it
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    server.install_signal_handlers = lambda: None
    threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, listener.getsockname()[1]


def test_a_client_that_stops_reading_its_stream_holds_up_no_one_and_loses_it_after_its_deadline(local_engine):
    """Real uvicorn, real sockets: 16 choices of 120 tokens (about 330 kB of SSE) to a client that never
    reads fill the socket buffers, so the response's writes block. Another request is served meanwhile,
    the request leaves the in-flight count when its generation ends, and SEND_GRACE_S after its
    deadline (its `timeout`) the server drops the connection: the client finds no [DONE]."""
    from ft_runner.serving.openai_api import SEND_GRACE_S, OpenAIServer

    engine, tokenizer = local_engine
    api = OpenAIServer(engine, tokenizer, engine.generator.model.config, "m")
    uvicorn_server, port = serve_with_small_send_buffers(api.app)
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 120, "n": 16, "ignore_eos": True, "stream": True,
                           "timeout": 2.0}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        start = time.monotonic()
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        other = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=30)
        assert other.completions.create(model="m", prompt="hi", max_tokens=4).usage.completion_tokens == 4
        deadline = time.monotonic() + 30
        while api.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert api.in_flight == 0, "a stalled client kept its request in flight after its generation ended"
        assert engine.core.kv_cache_usage == 0.0
        time.sleep(max(0.0, start + 2.0 + SEND_GRACE_S + 1.0 - time.monotonic()))
        stalled.settimeout(10)
        received = b""
        while chunk := stalled.recv(65536):
            received += chunk
        assert received.startswith(b"HTTP/1.1 200") and b"[DONE]" not in received, "the stream was not cut off"
        assert 0 < received.count(b"data:") < 16 * 120
    finally:
        stalled.close()
        uvicorn_server.should_exit = True
