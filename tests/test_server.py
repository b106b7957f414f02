"""End to end: real `mpirun` ranks, a real PyTriton server, real Triton clients (issue 2)."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import transformers
from helpers import ROOT, Server, hf_greedy, mpi_env, mpirun, port_free
from pytriton.client import ModelClient

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "The class statement", "x"]
NEW = 12


def infer(url, model, prompts, output_lens):
    with ModelClient(url, model, init_timeout_s=30, inference_timeout_s=120) as client:
        return client.infer_batch(
            prompts=np.char.encode(np.array(prompts)[:, None], "utf-8"),
            request_output_len=np.array(output_lens, dtype=np.uint32)[:, None],
        )


def texts(result):
    return [s.decode("utf-8") for s in result["sentences"].reshape(-1)]


@pytest.fixture(scope="module")
def expected(tiny_gpt2):
    """HF transformers' greedy continuation of every prompt, decoded as the server decodes it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_gpt2)
    out = {}
    for prompt in PROMPTS:
        for n in (NEW, 3):
            ids = hf_greedy(tiny_gpt2, tokenizer(prompt)["input_ids"], n)
            out[prompt, n] = tokenizer.decode(ids, skip_special_tokens=True)
    return out


@pytest.fixture(scope="module")
def tp2_server(tiny_gpt2, tmp_path_factory):
    with Server(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), tmp=tmp_path_factory.mktemp("tp2")) as server:
        yield server


def test_http_greedy_equals_hf_with_per_row_output_lengths(tp2_server, expected):
    lens = [NEW, 3, NEW, 3]
    result = infer(tp2_server.http_url, "tiny_random_gpt2", PROMPTS, lens)
    assert texts(result) == [expected[p, n] for p, n in zip(PROMPTS, lens)]
    assert result["sentences"].shape == (4, 1, 1)
    assert result["sequence_length"].shape == (4, 1) and result["sequence_length"].dtype == np.int64
    assert result["cum_log_probs"].shape == (4, 1) and (result["cum_log_probs"] < 0).all()


def test_grpc_greedy_equals_hf(tp2_server, expected):
    result = infer(tp2_server.grpc_url, "tiny_random_gpt2", PROMPTS, [NEW] * 4)
    assert texts(result) == [expected[p, NEW] for p in PROMPTS]


def test_twenty_concurrent_requests_are_all_correct(tp2_server, expected):
    def one(i):
        prompt = PROMPTS[i % len(PROMPTS)]
        url = tp2_server.http_url if i % 2 else tp2_server.grpc_url
        return texts(infer(url, "tiny_random_gpt2", [prompt], [NEW]))[0] == expected[prompt, NEW]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert all(pool.map(one, range(20)))


def test_a_bad_request_gets_a_clear_error_and_the_server_keeps_serving(tp2_server, expected):
    from pytriton.client.exceptions import PyTritonClientInferenceServerError

    with pytest.raises(PyTritonClientInferenceServerError, match="over the model's context of 128"):
        infer(tp2_server.http_url, "tiny_random_gpt2", ["Thank you for"], [127])
    with pytest.raises(PyTritonClientInferenceServerError, match="prompts\\[0\\] is empty"):
        infer(tp2_server.http_url, "tiny_random_gpt2", [""], [4])
    assert texts(infer(tp2_server.http_url, "tiny_random_gpt2", ["x"], [NEW]))[0] == expected["x", NEW]


def test_client_cli_prints_every_prompt_with_its_generation(tp2_server, expected):
    out = subprocess.run([sys.executable, str(ROOT / "client.py"), "--url", tp2_server.http_url,
                          "--model-name", "tiny_random_gpt2", "--output-len", str(NEW),
                          "--prompts", "Thank you for", "Q: Are you going for lunch?"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "================[ 1 ]================" in out.stdout
    assert repr(expected["Thank you for", NEW]) in out.stdout
    assert repr(expected["Q: Are you going for lunch?", NEW]) in out.stdout


def test_client_cli_fails_clearly_when_the_server_is_unreachable(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "client.py"), "--url", "http://127.0.0.1:9",
                          "--init-timeout-s", "2", "--prompts", "hi"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "error: http://127.0.0.1:9" in out.stderr


def test_tp2_pp2_on_four_ranks_and_sigterm_to_mpirun_ends_everything(tiny_gpt2, tmp_path, expected):
    server = Server(4, "--tp", "2", "--pp", "2", "--hf-model-name", str(tiny_gpt2), tmp=tmp_path).start()
    try:
        result = infer(server.grpc_url, "tiny_random_gpt2", PROMPTS, [NEW] * 4)
        assert texts(result) == [expected[p, NEW] for p in PROMPTS]
        ranks = server.rank_pids()
        assert len(ranks) == 4
    finally:
        start = time.time()
        server.stop(signal.SIGTERM, timeout=15)
    _assert_all_gone(server, ranks, start)


def test_sigterm_to_rank0_drains_and_exits_zero(tiny_gpt2, tmp_path):
    server = Server(2, "--tp", "2", "--hf-model-name", str(tiny_gpt2), tmp=tmp_path).start()
    ranks = server.rank_pids()
    rank0 = int(server.output().split("rank 0 pid ")[1].split()[0])
    start = time.time()
    os.kill(rank0, signal.SIGTERM)
    assert server.proc.wait(15) == 0, server.output()
    server.log.close()
    _assert_all_gone(server, ranks, start)


def test_embedded_default_model_serves_text_without_network(tmp_path):
    with Server(1, tmp=tmp_path) as server:
        result = infer(server.http_url, "tiny_gpt2", ["Thank you for"], [8])
    text = texts(result)[0]
    assert text.startswith("Thank you for") and len(text) > len("Thank you for")


def _assert_all_gone(server, ranks, start):
    deadline = start + 15
    while time.time() < deadline:
        alive = [pid for pid in ranks if _alive(pid)] + _pids("tritonserver.*" + str(server.http))
        ports = [p for p in (server.http, server.grpc, server.metrics) if not port_free(p)]
        if not alive and not ports:
            break
        time.sleep(0.25)
    assert not alive and not ports, f"left behind: pids {alive}, ports {ports}"
    time.sleep(1.5)  # the janitor removes shared memory a moment after rank 0 is gone
    leftovers = [f for f in os.listdir("/dev/shm") if f.startswith(("pytrtion", "psm_", "sm_segment."))
                 and not _in_use(f)]
    assert not leftovers, leftovers


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as fh:
            return "zombie" not in fh.read().split("State:")[1].split("\n")[0]
    except OSError:
        return False


def _pids(pattern):
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _in_use(name):
    from ft_runner.serving.janitor import files_in_use

    return f"/dev/shm/{name}" in files_in_use()


@pytest.mark.parametrize("n,args,message", [
    (3, ["--tp", "2"], "mpirun started 3 ranks but --tp 2 x --pp 1 needs 2"),
    (3, ["--tp", "3"], "--tp 3 does not divide the model's 4 attention heads"),
    (3, ["--pp", "3"], "--pp 3 does not divide the model's 4 layers"),
])
def test_a_bad_grid_is_one_clear_error_and_every_rank_exits_nonzero(tiny_gpt2, tmp_path, n, args, message):
    cmd = mpirun(n, str(ROOT / "server.py"), "--hf-model-name", str(tiny_gpt2), "--output-dir",
                 str(tmp_path), *args)
    out = subprocess.run(cmd, env=mpi_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count(f"error: {message}") == 1, out.stdout + out.stderr
