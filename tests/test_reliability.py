"""Reliability (issue 6): bad input, faults, readiness and health, security defaults.

Every scenario runs against real `mpirun` ranks and a real PyTriton server. Faults are injected
through FT_RUNNER_FAULT_INJECT (ft_runner/serving/faults.py) or real signals; each has a deadline, so
a hang fails its test instead of the CI run.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from helpers import ROOT, Server, hf_greedy, mpi_env, mpirun, port_free
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

MODEL = "tiny_random_gpt2"  # the text model; "fastertransformer" is the token model
TOKENS = "fastertransformer"
STREAM = f"{MODEL}_stream"
CONTEXT, VOCAB = 128, 1027  # tiny_gpt2 (conftest.py)
EXIT_DEADLINE_S = 10.0
GOOD_PROMPT, GOOD_LEN = "Hello world", 6


class RecordingServer(Server):
    """A Server with extra environment that polls /v2/health/ready from the moment mpirun starts."""

    def __init__(self, n: int, *args: str, tmp: Path, env: dict | None = None):
        super().__init__(n, *args, tmp=tmp, env=env)
        self.polls: list[tuple[float, bool, str]] = []  # (time, ready, log so far)

    def start(self) -> RecordingServer:
        self.launch()
        try:
            self._wait_ready()
        except BaseException:
            self.kill_all()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            log, ready = self.output(), self.ready()
            self.polls.append((time.time(), ready, log))
            if ready and "rank 0 pid" in log:
                return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready in {self.ready_timeout}s:\n{self.output()}")

    def kill_all(self) -> None:
        """SIGKILL the whole job (helpers.Server.kill_session) and close its log."""
        self.kill_session()
        self.log.close()


def text_inputs(prompts, output_lens) -> list:
    prompts = np.array([[p if isinstance(p, bytes) else p.encode()] for p in prompts], dtype=object)
    lens = np.array(output_lens, dtype=np.uint32).reshape(-1, 1)
    inputs = [httpclient.InferInput("prompts", list(prompts.shape), "BYTES"),
              httpclient.InferInput("request_output_len", list(lens.shape), "UINT32")]
    inputs[0].set_data_from_numpy(prompts)
    inputs[1].set_data_from_numpy(lens)
    return inputs


def generate(server, prompts, output_lens, timeout=120.0) -> list[str]:
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=timeout,
                                          connection_timeout=timeout) as client:
        result = client.infer(MODEL, text_inputs(prompts, output_lens))
    return [s.decode() for s in result.as_numpy("sentences").reshape(-1)]


def health(server, timeout_s=None) -> dict:
    body = {"inputs": [] if timeout_s is None else
            [{"name": "timeout_s", "shape": [1], "datatype": "FP32", "data": [timeout_s]}]}
    request = urllib.request.Request(f"{server.http_url}/v2/models/health/infer", data=json.dumps(body).encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return {o["name"]: o["data"][0] for o in json.load(response)["outputs"]}
    except urllib.error.HTTPError as exc:
        return {"error": json.loads(exc.read())["error"], "status": exc.code}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "zombie" not in fh.read().split("State:")[1].split("\n")[0]
    except OSError:
        return False


def assert_job_ends(server, pids, since: float, nonzero: bool, within: float = EXIT_DEADLINE_S) -> float:
    """The job exits within `within` s of `since`, leaves no rank behind and frees its ports."""
    try:
        rc = server.proc.wait(max(0.1, since + within - time.time()))
    except subprocess.TimeoutExpired:
        server.kill_all()
        pytest.fail(f"the job did not exit within {within}s:\n{server.output()[-3000:]}")
    elapsed = time.time() - since
    server.log.close()
    assert (rc != 0) == nonzero, f"rc={rc}\n{server.output()[-3000:]}"
    deadline = time.time() + 5
    while time.time() < deadline:
        left = [p for p in pids if alive(p)]
        ports = [p for p in (server.http, server.grpc, server.metrics) if not port_free(p)]
        if not left and not ports:
            break
        time.sleep(0.2)
    assert not left and not ports, f"left behind: pids {left}, ports {ports}"
    return elapsed


def fault_server(tiny_gpt2, tmp_path, fault: str, n: int = 2, *args: str) -> RecordingServer:
    return RecordingServer(n, "--tp", str(n), "--hf-model-name", str(tiny_gpt2), *args, tmp=tmp_path,
                           env={"FT_RUNNER_FAULT_INJECT": fault} if fault else {})


# -- the shared server: readiness from the first poll, health, bad input, security ------------------------


@pytest.fixture(scope="module")
def server(tiny_gpt2, tmp_path_factory):
    """TP 2 on 2 ranks; rank 1 loads its shard 4 s slower, so readiness is polled while it loads."""
    server = RecordingServer(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), tmp=tmp_path_factory.mktemp("rel"),
                             env={"FT_RUNNER_FAULT_INJECT": "load_delay:1:4"})
    try:
        yield server.start()
    finally:
        server.kill_all()


@pytest.fixture(scope="module")
def good_answer(tiny_gpt2):
    """HF transformers' greedy continuation of the good request, decoded as the server decodes it."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    ids = hf_greedy(tiny_gpt2, tokenizer(GOOD_PROMPT)["input_ids"], GOOD_LEN)
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_ready_is_not_200_until_every_rank_has_loaded_its_shard(server):
    loading = [ready for _, ready, log in server.polls
               if "rank 1 loads its shard" in log and "all 2 ranks loaded their shards" not in log]
    before_all_loaded = [ready for _, ready, log in server.polls if "all 2 ranks loaded their shards" not in log]
    assert len(loading) >= 10, "the readiness polls must overlap rank 1's load"
    assert not any(before_all_loaded), "ready before every rank had loaded its shard"
    assert server.polls[-1][1] and server.ready()


def test_health_probe_runs_a_generation_through_every_rank(server):
    first, second = health(server), health(server, timeout_s=5.0)
    assert first["ok"] is True and second["ok"] is True
    assert 0 < first["latency_ms"] < 10_000


def column(values, dtype) -> np.ndarray:
    """One value per row, shape (rows, 1): how every per-row input travels."""
    values = [v.encode() if isinstance(v, str) else v for v in values]
    return np.array([[v] for v in values], dtype=dtype)


def text(prompts=("Hello",), lens=(4,), **extra) -> dict:
    return dict(prompts=column(prompts, object), request_output_len=column(lens, np.uint32), **extra)


def tokens(ids=((5, 6, 7),), lengths=(3,), lens=(4,), **extra) -> dict:
    return dict(input_ids=np.array(ids, dtype=np.uint32), input_lengths=column(lengths, np.uint32),
                request_output_len=column(lens, np.uint32), **extra)


def triton_error(server, model: str, inputs: dict) -> str:
    """The error a request gets; fails the test if it is served."""
    triton_inputs = []
    for name, value in inputs.items():
        triton_inputs.append(httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        triton_inputs[-1].set_data_from_numpy(value)
    with httpclient.InferenceServerClient(server.http_url.removeprefix("http://"), network_timeout=120) as client:
        try:
            client.infer(model, triton_inputs)
        except InferenceServerException as exc:
            return str(exc)
    pytest.fail(f"the bad request to {model} was served")


def http_error(server, model: str, body: bytes) -> str:
    request = urllib.request.Request(f"{server.http_url}/v2/models/{model}/infer", data=body, method="POST")
    try:
        urllib.request.urlopen(request, timeout=120).read()
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())["error"]
    pytest.fail("the bad request was served")


def json_body(*inputs) -> bytes:
    return json.dumps({"inputs": [dict(zip(("name", "datatype", "shape", "data"), i, strict=True)) for i in inputs]}).encode()


def stream_error(server, inputs: dict) -> str:
    """The error a streaming (decoupled, gRPC) request ends with."""
    import queue

    import tritonclient.grpc as grpcclient

    events = queue.Queue()
    triton_inputs = []
    for name, value in inputs.items():
        triton_inputs.append(grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        triton_inputs[-1].set_data_from_numpy(value)
    with grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://")) as client:
        client.start_stream(callback=lambda result, error: events.put((result, error)))
        client.async_stream_infer(STREAM, triton_inputs)
        _, error = events.get(timeout=60)
        client.stop_stream()
    assert error is not None, "the bad streaming request was served"
    return str(error)


F32, U32 = np.float32, np.uint32
BAD_INPUT = [
    # (id, send(server) -> error message, what the message must say)
    ("empty prompt", lambda s: triton_error(s, MODEL, text([""])), r"prompts\[0\] is empty"),
    ("prompt longer than the context", lambda s: triton_error(s, MODEL, text(["hello " * 40], [1])),
     rf"prompts\[0\] has \d+ tokens; with request_output_len 1 .* over the model's context of {CONTEXT} tokens"),
    ("prompt + output over the context", lambda s: triton_error(s, MODEL, text(["Hello"], [CONTEXT - 1])),
     rf"prompts\[0\] has 4 tokens; with request_output_len {CONTEXT - 1} that is {CONTEXT + 3}, over"),
    ("output length 0", lambda s: triton_error(s, MODEL, text(lens=[0])),
     rf"request_output_len\[0\] = 0 must be between 1 and {CONTEXT}"),
    ("output length negative (JSON)", lambda s: http_error(s, MODEL, json_body(
        ("prompts", "BYTES", [1, 1], ["Hello"]), ("request_output_len", "UINT32", [1, 1], [-1]))),
     r"Unable to parse 'data': attempt to access JSON non-unsigned-integer as unsigned-integer"),
    ("output length negative (INT32)", lambda s: triton_error(s, MODEL, dict(
        prompts=column(["Hello"], object), request_output_len=column([-1], np.int32))),
     r"inference input 'request_output_len' data-type is 'INT32', but model .* expects 'UINT32'"),
    ("output length absurd", lambda s: triton_error(s, MODEL, text(lens=[2**32 - 1])),
     rf"request_output_len\[0\] = 4294967295 must be between 1 and {CONTEXT}"),
    ("output length as FP32", lambda s: triton_error(s, MODEL, dict(
        prompts=column(["Hello"], object), request_output_len=column([4.0], F32))),
     r"'request_output_len' data-type is 'FP32', but model .* expects 'UINT32'"),
    ("prompts as INT32", lambda s: triton_error(s, MODEL, dict(
        prompts=column([5], np.int32), request_output_len=column([4], U32))),
     r"inference input 'prompts' data-type is 'INT32', but model .* expects 'BYTES'"),
    ("prompts of the wrong shape", lambda s: triton_error(s, MODEL, dict(
        prompts=np.array([[b"a", b"b"]], dtype=object), request_output_len=column([4], U32))),
     r"unexpected shape for input 'prompts' .* Expected \[-1,1\], got \[1,2\]"),
    ("request_output_len missing", lambda s: triton_error(s, MODEL, dict(prompts=column(["Hello"], object))),
     r"missing required input\(s\) \['request_output_len'\]"),
    ("unknown input name", lambda s: triton_error(s, MODEL, text(foo=column([1], np.int32))),
     r"unexpected inference input 'foo'"),
    ("top_p above 1", lambda s: triton_error(s, MODEL, text(runtime_top_p=column([1.5], F32))),
     r"runtime_top_p\[0\] = 1\.5 is not allowed: it must be in \[0, 1\]"),
    ("top_p negative", lambda s: triton_error(s, MODEL, text(runtime_top_p=column([-0.1], F32))),
     r"runtime_top_p\[0\] = -0\.1 is not allowed"),
    ("top_p NaN", lambda s: triton_error(s, MODEL, text(runtime_top_p=column([np.nan], F32))),
     r"runtime_top_p\[0\] = nan is not allowed"),
    ("temperature negative", lambda s: triton_error(s, MODEL, text(temperature=column([-1.0], F32))),
     r"temperature\[0\] = -1 is not allowed: it must be > 0"),
    ("temperature infinite", lambda s: triton_error(s, MODEL, text(temperature=column([np.inf], F32))),
     r"temperature\[0\] = inf is not allowed"),
    ("top_k above the vocabulary", lambda s: triton_error(s, MODEL, text(runtime_top_k=column([5000], U32))),
     rf"runtime_top_k\[0\] = 5000 is not allowed: it must be between 0 and the vocabulary size {VOCAB}"),
    ("beam width 0", lambda s: triton_error(s, MODEL, text(beam_width=column([0], U32))),
     r"beam_width\[0\] = 0 is not allowed: it must be between 1 and 32"),
    ("beam width 64", lambda s: triton_error(s, MODEL, text(beam_width=column([64], U32))),
     r"beam_width\[0\] = 64 is not allowed: it must be between 1 and 32"),
    ("beam widths differ between rows", lambda s: triton_error(s, MODEL, text(
        ["a", "b"], [4, 4], beam_width=column([1, 2], U32))),
     r"beam_width must be the same for every row of a request \(got \[1, 2\]\)"),
    ("invalid UTF-8", lambda s: triton_error(s, MODEL, text([b"ok \xff\xfe"])),
     r"prompts\[0\] is not valid UTF-8 \(invalid start byte at byte 3\)"),
    ("stop word invalid UTF-8", lambda s: triton_error(s, MODEL, text(stop_words=np.array([[b"\xc3"]], object))),
     r"stop_words\[0\]\[0\] is not valid UTF-8"),
    ("repetition_penalty 0", lambda s: triton_error(s, MODEL, text(repetition_penalty=column([0.0], F32))),
     r"repetition_penalty\[0\] = 0 is not allowed: it must be > 0"),
    ("both penalties", lambda s: triton_error(s, MODEL, text(repetition_penalty=column([1.2], F32),
                                                               presence_penalty=column([0.5], F32))),
     r"repetition_penalty and presence_penalty are mutually exclusive"),
    ("min_length over the context", lambda s: triton_error(s, MODEL, text(min_length=column([1000], U32))),
     rf"min_length\[0\] = 1000 is not allowed: it must be between 0 and the model's context {CONTEXT}"),
    ("end_id outside the vocabulary", lambda s: triton_error(s, MODEL, text(end_id=column([5000], U32))),
     rf"end_id\[0\] = 5000 is not allowed: it must be a token id in \[0, {VOCAB}\)"),
    ("per-row input with too few rows", lambda s: triton_error(s, MODEL, text(
        ["a", "b"], [4, 4], temperature=column([1.0], F32))),
     r"input '\w+' batch size does not match other inputs"),
    ("batch over max_batch_size", lambda s: triton_error(s, MODEL, text(["a"] * 129, [1] * 129)),
     r"inference request batch-size must be <= 128"),
    ("10,000 prompts in one request", lambda s: triton_error(s, MODEL, text(["a"] * 10_000, [1] * 10_000)),
     r"inference request batch-size must be <= 128"),
    ("1 MB prompt", lambda s: triton_error(s, MODEL, text(["x" * 2**20], [1])),
     rf"prompts\[0\] is 1048576 bytes, over the limit of {CONTEXT * 256} bytes .* it cannot fit"),
    ("unknown model", lambda s: triton_error(s, "no_such_model", text()),
     r"Request for unknown model: 'no_such_model' is not found"),
    ("malformed JSON", lambda s: http_error(s, MODEL, b'{"inputs": [{"name": "prompts",'),
     r"failed to parse the request JSON buffer"),
    ("JSON inputs not a list", lambda s: http_error(s, MODEL, b'{"inputs": {}}'),
     r"Unable to parse 'inputs': attempt to access JSON non-array as array"),
    ("JSON data longer than its shape", lambda s: http_error(s, MODEL, json_body(
        ("prompts", "BYTES", [1, 1], ["a", "b"]), ("request_output_len", "UINT32", [1, 1], [4]))),
     r"unexpected number of string elements 2 for inference input 'prompts'"),
    ("token id outside the vocabulary", lambda s: triton_error(s, TOKENS, tokens(ids=[[5, 5000]], lengths=[2])),
     rf"input_ids\[0\] holds token id 5000, outside the vocabulary \[0, {VOCAB}\)"),
    ("input_lengths past the ids sent", lambda s: triton_error(s, TOKENS, tokens(lengths=[9])),
     r"input_lengths\[0\] = 9 is longer than the 3 input_ids sent"),
    ("token model output length 0", lambda s: triton_error(s, TOKENS, tokens(lens=[0])),
     rf"request_output_len\[0\] = 0 must be between 1 and {CONTEXT}"),
    ("word list offsets that fall", lambda s: triton_error(s, TOKENS, tokens(
        stop_words_list=np.array([[[5, 6], [2, 1]]], dtype=np.int32))),
     r"stop_words_list\[0\] offsets \[2, 1\] must rise"),
    ("word list of the wrong shape", lambda s: triton_error(s, TOKENS, tokens(
        stop_words_list=np.array([[[5, 6], [2, -1], [0, 0]]], dtype=np.int32))),
     r"unexpected shape for input 'stop_words_list'"),
    ("context embeddings", lambda s: triton_error(s, TOKENS, tokens(
        is_return_context_embeddings=column([True], np.bool_))),
     r"is_return_context_embeddings = true is not supported"),
    ("health timeout negative", lambda s: http_error(s, "health", json_body(("timeout_s", "FP32", [1], [-1]))),
     r"timeout_s = -1 must be in \(0, 300\] seconds"),
    ("streaming: empty prompt", lambda s: stream_error(s, text([""])), r"prompts\[0\] is empty"),
    ("streaming: beam search", lambda s: stream_error(s, text(beam_width=column([2], U32))),
     r"beam_width\[0\] = 2 is not allowed here: streaming sends one token per step"),
]


@pytest.mark.parametrize("send,message", [pytest.param(send, message, id=name) for name, send, message in BAD_INPUT])
def test_bad_input_gets_a_clear_error_and_the_next_request_is_served(server, good_answer, send, message):
    error = send(server)
    assert re.search(message, error), error
    assert generate(server, [GOOD_PROMPT], [GOOD_LEN]) == [good_answer]


def test_at_least_thirty_bad_input_cases():
    assert len(BAD_INPUT) >= 30


def test_a_bad_request_fails_alone_when_batched_with_good_ones(server, good_answer):
    """Triton's dynamic batcher puts concurrent requests into one call; each still gets its own answer
    (triton_stub.py turns a bad one's message into its own error, HTTP 400)."""
    def one(i):
        try:
            return generate(server, ["" if i % 4 == 0 else GOOD_PROMPT], [GOOD_LEN])[0] == good_answer
        except InferenceServerException as exc:
            return i % 4 == 0 and str(exc.status()) == "400" and "prompts[0] is empty" in str(exc)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        assert all(pool.map(one, range(64)))


def cancellations(server) -> int:
    return server.output().count("cancelled by its client")


def wait_for_cancellation(server, before: int, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while cancellations(server) <= before:
        if time.time() > deadline:
            pytest.fail(f"rank 0 heard of no cancelled request within {timeout}s:\n{server.output()[-3000:]}")
        time.sleep(0.1)


def test_a_grpc_client_leaving_mid_stream_frees_its_slot(server, good_answer):
    """gRPC stream cancelled after two tokens of 100: the stub reports it, the engine stops its rows
    (tests/test_engine.py times how soon), and the next request is served."""
    import queue

    import tritonclient.grpc as grpcclient

    before = cancellations(server)
    events = queue.Queue()
    inputs = []
    for name, value in text([GOOD_PROMPT], [100]).items():
        inputs.append(grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype)))
        inputs[-1].set_data_from_numpy(value)
    client = grpcclient.InferenceServerClient(server.grpc_url.removeprefix("grpc://"))
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    client.async_stream_infer(STREAM, inputs)
    for _ in range(2):
        result, error = events.get(timeout=60)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()
    wait_for_cancellation(server, before)
    assert generate(server, [GOOD_PROMPT], [GOOD_LEN], timeout=60) == [good_answer]


def test_an_http_client_leaving_generate_stream_frees_its_slot(server, good_answer):
    """The same through Triton's HTTP generate_stream (server-sent events): the client closes the socket."""
    before = cancellations(server)
    body = json.dumps({"prompts": GOOD_PROMPT, "request_output_len": 100}).encode()
    with socket.create_connection((server.http_url.removeprefix("http://").split(":")[0], server.http)) as conn:
        conn.sendall(f"POST /v2/models/{STREAM}/generate_stream HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while received.count(b"data:") < 2:
            received += conn.recv(4096)
            assert received, "the stream ended before two events"
    wait_for_cancellation(server, before)
    assert generate(server, [GOOD_PROMPT], [GOOD_LEN], timeout=60) == [good_answer]


def test_ports_bind_only_the_requested_address(server):
    """--bind-address 127.0.0.1 (helpers.Server) must not listen on every interface."""
    listening = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port = local.rsplit(":", 1)
            if state == "0A":  # LISTEN
                listening.setdefault(int(port, 16), []).append(address)
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as IPv4-mapped IPv6 (gRPC)
    for port in (server.http, server.grpc, server.metrics):
        assert listening.get(port) and set(listening[port]) <= loopback, f"port {port} listens on {listening.get(port)}"



def test_sigkill_of_rank0_ends_every_rank(server):
    """The last user of the shared server: it kills it."""
    pids = server.rank_pids()
    start = time.time()
    os.kill(server.rank0_pid(), signal.SIGKILL)
    assert_job_ends(server, pids, start, nonzero=True)


# -- faults -----------------------------------------------------------------------------------------------


def test_worker_exception_fails_the_request_clearly_and_ends_the_job(tiny_gpt2, tmp_path):
    server = fault_server(tiny_gpt2, tmp_path, "worker_forward_raise:4").start()
    try:
        pids = server.rank_pids()
        assert generate(server, ["Hello"], [4])[0].startswith("Hello")  # steps 0-3 run
        start = time.time()
        with pytest.raises(InferenceServerException, match=r"generation failed on the rank grid .*restart"):
            generate(server, ["Hello"], [4], timeout=EXIT_DEADLINE_S)
        elapsed = assert_job_ends(server, pids, start, nonzero=True)
    finally:
        server.kill_all()
    assert "injected fault: worker forward raised" in server.output()
    print(f"job ended {elapsed:.1f}s after the failing request")


def test_hung_rank_fails_the_health_probe_then_sigkill_of_it_fails_in_flight_requests(tiny_gpt2, tmp_path):
    server = fault_server(tiny_gpt2, tmp_path, "worker_hang:1").start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pids = server.rank_pids()
        assert health(server)["ok"] is True  # step 0 (one token)
        in_flight = pool.submit(generate, server, ["Hello"], [4], 60)  # step 1: the worker hangs in it
        time.sleep(1.0)
        start = time.time()
        probe = health(server, timeout_s=2.0)
        assert time.time() - start < EXIT_DEADLINE_S, "the health probe must fail, not hang"
        assert "unhealthy: a one-token generation through all ranks did not finish in 2 s" in probe["error"]
        worker = next(p for p in pids if p != server.rank0_pid())
        start = time.time()
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(InferenceServerException, match="generation failed on the rank grid"):
            in_flight.result(timeout=EXIT_DEADLINE_S)
        assert time.time() - start < EXIT_DEADLINE_S
        assert_job_ends(server, pids, start, nonzero=True)
    finally:
        server.kill_all()
        pool.shutdown(wait=False, cancel_futures=True)


def test_sigterm_to_rank0_completes_in_flight_requests_refuses_new_ones_and_exits_zero(tiny_gpt2, tmp_path):
    """Signalled directly: Open MPI turns a SIGTERM to mpirun into SIGKILL 0.25 s later (cpu_stack.md §4)."""
    server = fault_server(tiny_gpt2, tmp_path, "worker_delay:1").start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pids = server.rank_pids()
        in_flight = pool.submit(generate, server, ["Hello there"], [6])
        time.sleep(1.0)  # the request is now in its 6 steps of 1 s each
        start = time.time()
        os.kill(server.rank0_pid(), signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(InferenceServerException, match="the server is shutting down and accepts no new requests"):
            generate(server, ["Hello"], [4])
        assert in_flight.result(timeout=30)[0].startswith("Hello there")
        assert_job_ends(server, pids, start, nonzero=False, within=30)
    finally:
        server.kill_all()
        pool.shutdown(wait=False, cancel_futures=True)


# -- startup failures: one actionable line, every rank exits non-zero -------------------------------------


def run_to_failure(tmp_path, *args: str, env: dict | None = None, n: int = 2) -> tuple[int, str]:
    cmd = mpirun(n, str(ROOT / "server.py"), "--output-dir", str(tmp_path), "--bind-address", "127.0.0.1", *args)
    out = subprocess.run(cmd, env=mpi_env(**(env or {})), capture_output=True, text=True, timeout=180)
    return out.returncode, out.stdout + out.stderr


def test_a_missing_model_directory_is_one_clear_error(tmp_path):
    rc, out = run_to_failure(tmp_path, "--tp", "2", "--hf-model-name", str(tmp_path / "no_such_model"))
    assert rc != 0
    assert out.count(f"error: model directory {tmp_path / 'no_such_model'} does not exist") == 1, out


def test_a_port_in_use_is_one_clear_error_before_anything_loads(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out = run_to_failure(tmp_path, "--tp", "2", "--http-port", str(port))
    assert rc != 0
    message = f"error: --http-port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"
    assert out.count(message) == 1, out


def test_out_of_memory_while_loading_is_one_actionable_line(tiny_gpt2, tmp_path):
    rc, out = run_to_failure(tmp_path, "--tp", "2", "--hf-model-name", str(tiny_gpt2),
                             env={"FT_RUNNER_FAULT_INJECT": "load_oom:1"})
    assert rc != 0
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out
    assert re.fullmatch(r"error: rank 1 \(TP 1, PP 0\) ran out of cpu memory loading its fp32 shard "
                        r"\(OutOfMemoryError: .*\): spread the model over more ranks \(--tp/--pp\), use a smaller "
                        r"--data-type or --quantization, or free memory", lines[0]), lines[0]
    assert "Traceback" not in out


# -- security defaults ------------------------------------------------------------------------------------


def _calls(tree):
    import ast

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else (
                f"{getattr(func.value, 'id', '?')}.{func.attr}" if isinstance(func, ast.Attribute) else "?")
            yield name, {k.arg: k.value for k in node.keywords}, node.lineno


UNSAFE_CALLS = ("eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "pickle.Unpickler",
                "yaml.load", "yaml.unsafe_load", "torch.jit.load")


def test_nothing_from_the_network_is_unpickled_or_evaluated():
    """No unpickling/eval/exec anywhere in the package; torch.load only with weights_only=True,
    numpy loads without allow_pickle, yaml only through safe_load, trust_remote_code never hard-wired on."""
    import ast

    sources = sorted(ROOT.glob("ft_runner/**/*.py")) + [ROOT / "server.py", ROOT / "client.py"]
    bad = []
    for path in sources:
        for name, kwargs, line in _calls(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{line}"
            if name in UNSAFE_CALLS or name.split(".")[0] in ("marshal", "shelve", "dill", "cloudpickle"):
                bad.append(f"{where}: {name}()")
            if name == "torch.load" and not (isinstance(kwargs.get("weights_only"), ast.Constant)
                                             and kwargs["weights_only"].value is True):
                bad.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and "allow_pickle" in kwargs:
                bad.append(f"{where}: np.load(allow_pickle=...)")
            value = kwargs.get("trust_remote_code")
            if isinstance(value, ast.Constant) and value.value is True:
                bad.append(f"{where}: trust_remote_code=True")
    assert not bad, "\n".join(bad)
    assert len(sources) > 20


def test_server_defaults_trust_no_remote_code_and_document_the_bind_address():
    from ft_runner.serving.server import build_parser

    parser = build_parser()
    args = parser.parse_args([])
    assert args.trust_remote_code is False
    assert args.bind_address == "0.0.0.0"  # FT's example; tests and local use pass 127.0.0.1
    assert "127.0.0.1" in parser.format_help()
