"""Deadlines and shedding (issue 21): a request past its deadline is stopped at the next step, its KV
pages freed, and answered with a clear error; a full queue is refused at once on both APIs; a stream
that waits in the queue, or whose client stops reading, holds up no other request.

One TP=2 server (real mpirun ranks, PyTriton, the OpenAI API; the official clients) whose worker rank
sleeps STEP_S at every step (faults.py's worker_delay), so that a request of n new tokens lasts about
n * STEP_S seconds on any machine. Its limits: --max-num-seqs SLOTS, --max-queue-len 1,
--request-timeout-s TIMEOUT_S. Each test waits for the metrics to say the server is idle, then
orders its requests by the same metrics, so none depends on a race.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from helpers import Server
from surface import token_infer
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

MODEL = "tiny_random_gpt2"
STREAM = f"{MODEL}_stream"
STEP_S = 0.05
TIMEOUT_S = 5
SLOTS = 3
PROMPT = "Hello world"


@pytest.fixture(scope="module")
def server(tiny_gpt2, tmp_path_factory):
    with Server(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), "--max-num-seqs", str(SLOTS), "--max-queue-len", "1",
                "--request-timeout-s", str(TIMEOUT_S), tmp=tmp_path_factory.mktemp("deadlines"), openai=True,
                env={"FT_RUNNER_FAULT_INJECT": f"worker_delay:{STEP_S}"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.openai_url}/v1", api_key="unused", max_retries=0, timeout=60)


TIMED_OUT = 'ft_runner:requests_total{outcome="timeout"}'
REJECTED = 'ft_runner:requests_total{outcome="rejected"}'


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def wait_running(server, n: int) -> None:
    wait_until(lambda: server.metric("ft_runner:num_requests_running") == n, f"{n} requests running")


def wait_idle(server) -> None:
    """Nothing runs or waits, and every KV page is free again."""
    names = ("ft_runner:num_requests_running", "ft_runner:num_requests_waiting", "ft_runner:kv_cache_usage_perc")
    wait_until(lambda: all(server.metric(name) == 0 for name in names), "the server idle, its KV cache empty")


def text_inputs(tokens: int, grpc=False) -> list:
    """PROMPT for `tokens` new tokens exactly (min_length holds the end token back)."""
    module = grpcclient if grpc else httpclient
    arrays = {"prompts": np.array([[PROMPT.encode()]], dtype=object),
              "request_output_len": np.array([[tokens]], dtype=np.uint32),
              "min_length": np.array([[tokens]], dtype=np.uint32)}
    inputs = []
    for name, value in arrays.items():
        inputs.append(module.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        inputs[-1].set_data_from_numpy(value)
    return inputs


def text_request(server, tokens: int, timeout_us: int | None = None) -> str:
    """The text model over HTTP; `timeout_us` is Triton's own `timeout` parameter (microseconds)."""
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=60) as triton:
        result = triton.infer(MODEL, text_inputs(tokens), timeout=timeout_us)
    return result.as_numpy("sentences").reshape(-1)[0].decode()


class Stream:
    """One request to the streaming model on a gRPC stream of its own; `arrivals` time its responses.
    With `stalled` its client stops reading (the callback waits) until the event is set."""

    def __init__(self, server, tokens: int, timeout_us: int | None = None, stalled: threading.Event | None = None):
        self.arrivals: list[float] = []
        self.error = None
        self.done = threading.Event()
        self.stalled = stalled
        self.triton = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
        self.triton.start_stream(callback=self._on_response)
        self.triton.async_stream_infer(STREAM, text_inputs(tokens, grpc=True), timeout=timeout_us)

    def _on_response(self, result, error) -> None:
        if self.stalled is not None:
            self.stalled.wait(60)
        self.arrivals.append(time.monotonic())
        if error is not None:
            self.error = str(error)
        if error is not None or result.as_numpy("finish_reason").reshape(-1)[0]:
            self.done.set()

    def close(self) -> None:
        self.triton.stop_stream()
        self.triton.close()


def test_a_request_past_its_timeout_gets_a_clear_error_frees_its_pages_and_the_next_is_served(server, client):
    """Each API's per-request timeout (1 s) on requests of 100 tokens (5 s): OpenAI's extra `timeout`
    (504), Triton's `timeout` parameter on the text model (HTTP 503: UNAVAILABLE) and on a gRPC stream."""
    wait_idle(server)
    before = server.metric(TIMED_OUT)
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        start = time.monotonic()
        in_openai = pool.submit(client.completions.create, model=MODEL, prompt=PROMPT, max_tokens=100,
                                temperature=0, extra_body={"ignore_eos": True, "timeout": 1.0})
        wait_running(server, 1)
        in_triton = pool.submit(text_request, server, 100, 1_000_000)
        wait_running(server, 2)
        stream = Stream(server, 100, timeout_us=1_000_000)
        with pytest.raises(openai.InternalServerError) as err:
            in_openai.result(30)
        assert err.value.status_code == 504 and err.value.body["type"] == "timeout_error"
        assert "did not finish within its deadline of 1 s" in err.value.body["message"]
        with pytest.raises(InferenceServerException, match="did not finish within its deadline of 1 s") as err:
            in_triton.result(30)
        assert err.value.status() == "503"
        assert stream.done.wait(30) and "did not finish within its deadline of 1 s" in stream.error
        stream.close()
        assert time.monotonic() - start < 4.0, "a request ran on past its deadline"
    finally:
        pool.shutdown()
    assert server.metric(TIMED_OUT) == before + 3
    wait_idle(server)
    assert text_request(server, 8).startswith(PROMPT)


def test_a_full_queue_is_refused_at_once_on_both_apis_and_a_queued_stream_holds_up_no_running_one(server, client):
    """SLOTS streams run and one waits (--max-queue-len 1): an OpenAI request gets 429, a Triton text
    request UNAVAILABLE (HTTP 503), a stream an error, all at once; the running streams' tokens keep
    coming while the queued stream waits for its first (StreamModel.infer is asynchronous)."""
    wait_idle(server)
    before = server.metric(REJECTED)
    running = []
    for n in range(1, SLOTS + 1):
        running.append(Stream(server, 40))
        wait_running(server, n)
    queued = Stream(server, 4)
    wait_until(lambda: server.metric("ft_runner:num_requests_waiting") == 1, "one request waiting")
    sent = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4)
    assert err.value.status_code == 429 and err.value.body["type"] == "server_overloaded"
    assert "--max-queue-len 1" in err.value.body["message"] and err.value.response.headers["retry-after"] == "1"
    with pytest.raises(InferenceServerException, match=r"overloaded: 1 requests already wait") as err:
        text_request(server, 4)
    assert err.value.status() == "503"
    refused = Stream(server, 4)
    assert refused.done.wait(10) and "--max-queue-len 1" in refused.error
    assert time.monotonic() - sent < 2.0, "a refusal waited for the queue"
    for stream in running + [queued, refused]:
        assert stream.done.wait(30)
        stream.close()
    assert all(stream.error is None for stream in running + [queued])
    gap = max(np.diff(stream.arrivals).max() for stream in running)
    assert gap < 1.0, f"a running stream's responses were held back {gap:.2f} s while another stream waited"
    assert server.metric(REJECTED) == before + 3


def sse_request(server, tokens: int) -> socket.socket:
    """An OpenAI SSE request on a raw socket whose client never reads."""
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": tokens, "ignore_eos": True,
                       "stream": True}).encode()
    conn = socket.create_connection(("127.0.0.1", int(server.openai_url.rsplit(":", 1)[1])))
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return conn


def test_clients_that_stop_reading_their_streams_hold_up_no_one_and_end_at_the_servers_deadline(server):
    """A gRPC stream and an OpenAI SSE stream of 120 tokens (6 s) whose clients never read: a request
    beside them is served in its own time, and --request-timeout-s stops them and frees their pages."""
    wait_idle(server)
    before = server.metric(TIMED_OUT)
    stall = threading.Event()
    stalled = Stream(server, 120, stalled=stall)
    wait_running(server, 1)
    sse = sse_request(server, 120)
    wait_running(server, 2)
    try:
        start = time.monotonic()
        assert text_request(server, 8).startswith(PROMPT)
        took = time.monotonic() - start
        assert took < 3.0, f"a request of 8 tokens took {took:.1f} s beside two stalled streams"
        assert server.metric("ft_runner:num_requests_running") == 2
        wait_until(lambda: server.metric(TIMED_OUT) == before + 2, "the stalled streams timed out", TIMEOUT_S + 10)
        wait_idle(server)
        stall.set()
        assert stalled.done.wait(30) and f"deadline of {TIMEOUT_S} s" in stalled.error
        received = b""
        while b"[DONE]" not in received:
            chunk = sse.recv(65536)
            assert chunk, f"the stream ended without [DONE]: {received[-300:]!r}"
            received += chunk
        assert b'"type": "timeout_error"' in received
    finally:
        stall.set()
        stalled.close()
        sse.close()


def token_request(server, tokens: int) -> int:
    """The `fastertransformer` token model over gRPC; the number of new tokens it returned."""
    ids = [40, 69, 76, 322, 307]  # token ids of the embedded tokenizer's vocabulary
    result = token_infer(server.grpc_url, [ids], tokens, protocol="grpc", min_length=tokens)
    return int(result["sequence_length"][0, 0]) - len(ids)


@pytest.mark.parametrize("model", ["text-http", "fastertransformer-grpc"])
def test_a_short_triton_request_sent_while_a_long_one_runs_returns_first(server, model):
    """Issue 17: a running Triton call holds no other request of its model in Triton's queue. While a
    request of 40 tokens runs (2 s: inside the server's 5-s deadline at over twice the nominal step;
    60 tokens missed it on a 2-core box), one of 4 tokens joins the engine's running batch and is
    answered first (the stub answers each call through response senders, so Triton hands its one instance the
    next call at once, and the model's callable is a coroutine: triton_stub.py, text_model.answer_each)."""
    long_tokens = 40
    call = (lambda n: text_request(server, n)) if model == "text-http" else (lambda n: token_request(server, n))
    wait_idle(server)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        running = pool.submit(call, long_tokens)
        wait_running(server, 1)
        start = time.monotonic()
        short = call(4)
        took = time.monotonic() - start
        assert not running.done(), f"the long request ended before the short one (which took {took:.2f} s)"
        assert took < long_tokens * STEP_S / 2, f"a request of 4 tokens took {took:.2f} s beside a long one"
        long_ = running.result(30)
    finally:
        pool.shutdown()
    if model == "text-http":
        assert short.startswith(PROMPT) and long_.startswith(PROMPT) and len(long_) > len(short)
    else:
        assert (short, long_) == (4, long_tokens)
