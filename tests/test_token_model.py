"""The token model answers clients written for fastertransformer_backend unchanged (issue 4).

Requests are built the way FT's tools/gpt/identity_test.py and end_to_end_test.py build them:
tritonclient http/grpc, input_ids right-padded UINT32, every other input [B, 1], empty word lists
as [[0], [-1]]. Through the shared TP=2 server (conftest.surface_server), checked against HF.
"""

import concurrent.futures
import json
import subprocess
import sys
import urllib.request

import numpy as np
import pytest
import torch
from helpers import ROOT
from surface import TEXT, TOKENS, hf_generate, hf_logits, ours, text_infer, token_infer, tokenizer

PROMPTS = ["Thank you for", "Q: Are you going for lunch?", "a", "The class statement defines a new class"]
NEW = 12


@pytest.fixture(scope="module")
def prompt_ids(tiny_gpt2):
    return [tokenizer(tiny_gpt2)(p)["input_ids"] for p in PROMPTS]


def identity_test_inputs(rows: int, end_id: int, start_id: int) -> dict:
    """Every optional input FT's identity_test.py sends, with its values (greedy: top_k 1, top_p 0)."""
    empty = np.concatenate([np.zeros([rows, 1, 1], np.int32), -1 * np.ones([rows, 1, 1], np.int32)], axis=1)
    return dict(runtime_top_k=1, runtime_top_p=0.0, beam_search_diversity_rate=0.0, temperature=1.0,
                len_penalty=1.0, repetition_penalty=1.0, random_seed=0, is_return_log_probs=True, beam_width=1,
                start_id=start_id, end_id=end_id, bad_words_list=empty, stop_words_list=empty)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_an_ft_backend_client_gets_greedy_ids_lengths_and_log_probs(surface_server, tiny_gpt2, prompt_ids, protocol):
    tok = tokenizer(tiny_gpt2)
    url = surface_server.http_url if protocol == "http" else surface_server.grpc_url
    inputs = identity_test_inputs(len(prompt_ids), tok.eos_token_id, tok.bos_token_id)
    result = token_infer(url, prompt_ids, NEW, protocol=protocol, **inputs)
    S = max(len(p) for p in prompt_ids)
    assert result["output_ids"].shape == (4, 1, S + NEW) and result["output_ids"].dtype == np.uint32
    assert result["sequence_length"].shape == (4, 1) and result["sequence_length"].dtype == np.uint32
    assert result["cum_log_probs"].shape == (4, 1) and result["output_log_probs"].shape == (4, 1, NEW)
    assert result["response_input_lengths"][:, 0].tolist() == [len(p) for p in prompt_ids]
    for row, ids in enumerate(prompt_ids):
        want = hf_generate(tiny_gpt2, ids, NEW)
        assert ours(result, row) == want
        logp = torch.log_softmax(hf_logits(tiny_gpt2, want), dim=-1)
        expected = [float(logp[t - 1, want[t]]) for t in range(len(ids), len(want))]
        assert np.allclose(result["output_log_probs"][row, 0, : len(expected)], expected, atol=1e-3)
        assert abs(result["cum_log_probs"][row, 0] - sum(expected)) < 1e-3


def test_an_empty_row_starts_from_start_id_and_log_probs_come_only_when_asked(surface_server, tiny_gpt2, prompt_ids):
    start = prompt_ids[0][0]
    result = token_infer(surface_server.http_url, [[], prompt_ids[2]], NEW, start_id=start)
    assert ours(result, 0) == hf_generate(tiny_gpt2, [start], NEW)
    assert ours(result, 1) == hf_generate(tiny_gpt2, prompt_ids[2], NEW)
    assert "cum_log_probs" not in result and "output_log_probs" not in result


def test_the_model_config_is_fastertransformer_backends_gpt_contract(surface_server):
    with urllib.request.urlopen(f"{surface_server.http_url}/v2/models/{TOKENS}/config", timeout=30) as response:
        config = json.loads(response.read())
    inputs = {i["name"]: (i["data_type"], i["dims"], i.get("optional", False)) for i in config["input"]}
    outputs = {o["name"]: (o["data_type"], o["dims"]) for o in config["output"]}
    assert inputs["input_ids"] == ("TYPE_UINT32", [-1], False)
    assert inputs["input_lengths"] == ("TYPE_UINT32", [1], False)
    assert inputs["request_output_len"] == ("TYPE_UINT32", [-1], False)
    for name, dtype in [("runtime_top_k", "TYPE_UINT32"), ("runtime_top_p", "TYPE_FP32"), ("random_seed", "TYPE_UINT64"),
                        ("is_return_log_probs", "TYPE_BOOL"), ("beam_width", "TYPE_UINT32"), ("end_id", "TYPE_UINT32"),
                        ("beam_search_diversity_rate", "TYPE_FP32"), ("len_penalty", "TYPE_FP32")]:
        assert inputs[name] == (dtype, [1], True), name
    assert inputs["stop_words_list"] == ("TYPE_INT32", [2, -1], True)
    assert inputs["bad_words_list"] == ("TYPE_INT32", [2, -1], True)
    assert outputs["output_ids"] == ("TYPE_UINT32", [-1, -1])
    assert outputs["sequence_length"] == ("TYPE_UINT32", [-1])
    assert outputs["cum_log_probs"] == ("TYPE_FP32", [-1])
    assert outputs["output_log_probs"] == ("TYPE_FP32", [-1, -1])


def test_concurrent_requests_keep_their_own_parameters(surface_server, prompt_ids):
    """Requests batched together on the server: each row keeps its seed, top-k, top-p and length."""
    requests = [dict(runtime_top_k=k, runtime_top_p=p, temperature=t, random_seed=s, request_len=n)
                for k, p, t, s, n in [(0, 0.0, 1.0, 0, NEW), (5, 0.0, 0.8, 1, 6), (0, 0.9, 1.3, 2, NEW),
                                      (40, 0.5, 1.0, 3, 9), (1, 0.0, 1.0, 4, 3), (0, 0.95, 0.6, 5, NEW)]]

    def send(i):
        r = dict(requests[i])
        return ours(token_infer(surface_server.http_url, [prompt_ids[i % 4]], r.pop("request_len"), **r), 0)

    alone = [send(i) for i in range(len(requests))]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(send, range(len(requests))))
    assert together == alone
    assert [len(a) - len(prompt_ids[i % 4]) for i, a in enumerate(alone)] == [NEW, 6, NEW, 9, 3, NEW]


def test_client_cli_json_with_sampling_flags(surface_server):
    cmd = [sys.executable, str(ROOT / "client.py"), "--url", surface_server.http_url, "--model-name", TEXT,
           "--output-len", "6", "--prompts", PROMPTS[0], PROMPTS[1], "--top-k", "5", "--temperature", "0.8",
           "--random-seed", "9", "--return-log-probs", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stdout.strip().splitlines()]
    want = text_infer(surface_server.http_url, PROMPTS[:2], 6, runtime_top_k=5, temperature=0.8, random_seed=9)
    assert [r["prompt"] for r in records] == PROMPTS[:2]
    assert [r["sentences"][0] for r in records] == [s.decode() for s in want["sentences"].reshape(-1)]
    assert np.array(records[0]["output_log_probs"]).shape == (1, 6)
    bad = subprocess.run(cmd[:-1] + ["--top-p", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "runtime_top_p[0] = 2 is not allowed" in bad.stderr
