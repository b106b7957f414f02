"""benchmarks/bench_serving.py: its metrics on synthetic timestamps (pure functions), a real run against
a live server's OpenAI endpoint and Triton stream model, and offline runs of the in-process engines
on a tiny model on the CPU."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, Server, mpi_env

sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_serving as bs  # noqa: E402

KEYS = {"kind", "engine", "model", "dtype", "quantization", "tp", "pp", "gpu", "commit", "workload", "num_requests",
        "input_len", "output_len", "request_rate", "max_concurrency", "duration_s", "request_throughput",
        "output_tok_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50",
        "e2e_ms_p99"}


# --- pure functions ---------------------------------------------------------------------------------


def test_ttft_tpot_itl_e2e_follow_their_definitions():
    # sent at 1.0; tokens at 1.1, 1.2, 1.4, 1.5: TTFT 0.1, E2E 0.5, TPOT (0.5 - 0.1) / 3, ITL 0.1 0.2 0.1
    a = bs.RequestResult(prompt_len=10, output_len=4, start=1.0, token_times=[1.1, 1.2, 1.4, 1.5], end=1.5,
                         error=None)
    lat = bs.latencies(a)
    assert lat["ttft"] == pytest.approx(0.1) and lat["e2e"] == pytest.approx(0.5)
    assert lat["tpot"] == pytest.approx(0.4 / 3) and lat["itl"] == pytest.approx([0.1, 0.2, 0.1])
    # one token: no TPOT, no ITL; a failed request counts in neither
    b = bs.RequestResult(prompt_len=5, output_len=1, start=2.0, token_times=[2.3], end=2.3, error=None)
    failed = bs.RequestResult(prompt_len=7, output_len=0, start=2.0, end=2.1, error="HTTP 400")
    out = bs.summarize([a, b, failed], duration=2.0)
    assert out["completed"] == 2 and out["failed"] == 1
    assert out["total_input_tokens"] == 15 and out["total_output_tokens"] == 5
    assert out["request_throughput"] == pytest.approx(1.0) and out["output_tok_s"] == pytest.approx(2.5)
    assert out["total_tok_s"] == pytest.approx(10.0)
    assert out["ttft_ms_mean"] == pytest.approx(200.0) and out["ttft_ms_p50"] == pytest.approx(200.0)
    assert out["tpot_ms_p50"] == pytest.approx(400 / 3) and out["tpot_ms_p99"] == pytest.approx(400 / 3)
    assert out["itl_ms_p50"] == pytest.approx(100.0) and out["itl_ms_mean"] == pytest.approx(400 / 3)
    assert out["e2e_ms_p50"] == pytest.approx(400.0) and out["goodput"] is None


def test_goodput_counts_requests_meeting_every_slo():
    fast = bs.RequestResult(1, 3, 0.0, [0.05, 0.06, 0.07], 0.07, None)  # TTFT 50 ms, TPOT 10 ms
    slow_start = bs.RequestResult(1, 3, 0.0, [0.5, 0.51, 0.52], 0.52, None)  # TTFT 500 ms
    slow_steps = bs.RequestResult(1, 3, 0.0, [0.05, 0.2, 0.35], 0.35, None)  # TPOT 150 ms
    one = bs.RequestResult(1, 1, 0.0, [0.05], 0.05, None)  # TPOT counts as 0
    results = [fast, slow_start, slow_steps, one]
    assert bs.summarize(results, 2.0, {"ttft": 100})["goodput"] == pytest.approx(3 / 2)
    assert bs.summarize(results, 2.0, {"ttft": 100, "tpot": 20})["goodput"] == pytest.approx(2 / 2)
    assert bs.summarize(results, 2.0, {"e2e": 100})["goodput"] == pytest.approx(2 / 2)
    assert bs.parse_slos(["ttft:100", "tpot:20"]) == {"ttft": 100.0, "tpot": 20.0}
    with pytest.raises(Exception, match="KEY:MS"):
        bs.parse_slos(["latency:5"])


def test_stats_without_values_are_null():
    assert bs.stats([], "ttft") == dict.fromkeys(["ttft_ms_mean", "ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99"])
    out = bs.summarize([bs.RequestResult(3, 4, 0.0, [], 1.0, None)], 1.0)  # an engine without token times
    assert out["ttft_ms_p50"] is None and out["itl_ms_p50"] is None and out["e2e_ms_p50"] == pytest.approx(1000)


def test_workload_lengths_ids_and_arrivals():
    assert bs.parse_range("64:512") == (64, 512) and bs.parse_range("128") == (128, 128)
    reqs = bs.make_workload(200, (3, 9), (2, 5), vocab=20, avoid=[0, 7], seed=1)
    assert reqs == bs.make_workload(200, (3, 9), (2, 5), vocab=20, avoid=[0, 7], seed=1)
    ids = np.concatenate([r.prompt_ids for r in reqs])
    assert {len(r.prompt_ids) for r in reqs} == set(range(3, 10)) and {r.output_len for r in reqs} == {2, 3, 4, 5}
    assert set(ids.tolist()) == set(range(20)) - {0, 7}
    assert not bs.arrival_times(5, math.inf, 1.0, 0).any()
    times = bs.arrival_times(4000, 10.0, 1.0, 0)
    assert times[0] == 0 and (np.diff(times) >= 0).all() and np.diff(times).mean() == pytest.approx(0.1, rel=0.1)


def test_admission_lets_requests_out_on_arrival_and_within_the_concurrency_limit():
    reqs = [bs.Request(i, [1], 1, arrival=a) for i, a in enumerate([0.0, 0.0, 0.0, 5.0])]
    adm = bs.Admission(reqs, limit=2, t0=100.0)
    assert [(r.index, t) for r, t in adm.due(100.0)] == [(0, 100.0), (1, 100.0)]
    assert adm.next_start() is None  # the third waits for a finish
    adm.release(101.5)
    assert adm.due(101.0) == [] and [(r.index, t) for r, t in adm.due(102.0)] == [(2, 101.5)]
    adm.release(101.7)
    assert adm.next_start() == 105.0 and [r.index for r, _ in adm.due(105.0)] == [3] and adm.done


# --- against a live server --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_gpt2, tmp_path_factory):
    with Server(1, "--hf-model-name", str(tiny_gpt2), tmp=tmp_path_factory.mktemp("bench_serving"),
                openai=True) as srv:
        yield srv


def rows_of(directory) -> list[dict]:
    files = list(directory.glob("serving_*_*.jsonl"))
    assert len(files) == 1, files
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def check_row(row: dict, engine: str, count: int, output_tokens=None) -> None:
    assert KEYS <= row.keys(), KEYS - row.keys()
    assert row["kind"] == "serving" and row["engine"] == engine and row["quantization"] == "none"
    assert row["num_requests"] == row["completed"] == count and row["failed"] == 0
    assert row["request_throughput"] > 0 and row["output_tok_s"] > 0 and row["duration_s"] > 0
    assert 0 < row["ttft_ms_p50"] <= row["e2e_ms_p50"] and row["ttft_ms_p99"] <= row["e2e_ms_p99"]
    assert row["itl_ms_p50"] >= 0 and row["tpot_ms_p50"] > 0
    if output_tokens is not None:  # ignore_eos: exactly the lengths asked for
        assert row["total_output_tokens"] == output_tokens


def workload_args(tmp_path, *extra) -> list[str]:
    return ["--num-prompts", "6", "--input-len", "4:12", "--output-len", "3:6", "--request-rate", "40",
            "--max-concurrency", "4", "--warmup-requests", "1", "--seed", "3", "--results", str(tmp_path),
            "--goodput", "ttft:60000", *extra]


def expected_tokens() -> int:
    return sum(r.output_len for r in bs.make_workload(6, (4, 12), (3, 6), 1000, [], 3))


def test_openai_backend_against_a_live_server(server, tiny_gpt2, tmp_path):
    assert bs.main(["--backend", "openai", "--base-url", server.openai_url, "--tokenizer", str(tiny_gpt2),
                    *workload_args(tmp_path)]) == 0
    (row,) = rows_of(tmp_path)
    check_row(row, "ft_runner", 6, expected_tokens())
    assert row["backend"] == "openai" and row["model"] == "tiny_random_gpt2" and row["request_rate"] == 40
    assert row["input_len"] == "4:12" and row["workload"] == "random-4:12-3:6" and row["goodput"] > 0


def test_triton_grpc_backend_against_a_live_server(server, tiny_gpt2, tmp_path):
    assert bs.main(["--backend", "triton-grpc", "--grpc-url", server.grpc_url, "--served-model-name",
                    "tiny_random_gpt2", "--tokenizer", str(tiny_gpt2), *workload_args(tmp_path)]) == 0
    (row,) = rows_of(tmp_path)
    check_row(row, "ft_runner", 6, expected_tokens())  # min_length stands in for ignore_eos
    assert row["backend"] == "triton-grpc"


# --- offline engines ------------------------------------------------------------------------------


def run_offline(tmp_path, engines: str):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serving.py"), "--offline", "--model",
           str(ROOT / "ft_runner" / "assets" / "tiny-gpt2"), "--device", "cpu", "--engines", engines,
           "--num-prompts", "6", "--input-len", "4:24", "--output-len", "3:8", "--request-rate", "inf,50",
           "--warmup-requests", "2", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "res"),
           "--plot", str(tmp_path / "serving.png")]
    result = subprocess.run(cmd, env=mpi_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return rows_of(tmp_path / "res"), output


def check_offline(rows, engine: str) -> None:
    mine = [r for r in rows if r["engine"] == engine]
    assert [r["request_rate"] for r in mine] == ["inf", 50.0]
    expected = sum(r.output_len for r in bs.make_workload(6, (4, 24), (3, 8), 1024, [0], 0))
    for row in mine:
        check_row(row, engine, 6, expected)
        assert row["backend"] == "offline" and row["dtype"] == "fp32" and row["model"] == "tiny-gpt2"
        assert row["gpu"].startswith("cpu-") and row["engine_config"]["max_num_seqs"] == 256


def test_offline_static_and_hf_continuous_batching(tmp_path):
    rows, output = run_offline(tmp_path, "ft_runner-static,hf-cb")
    check_offline(rows, "ft_runner-static")
    if "skipping engine hf-cb" in output:
        print(output[output.index("skipping engine hf-cb"):].splitlines()[0])  # transformers lacks it
    else:
        check_offline(rows, "hf-cb")
    assert (tmp_path / "serving.png").stat().st_size > 0


def inflight_engine_missing() -> bool:
    try:
        import ft_runner.engine.core  # noqa: F401
    except ImportError:
        return True
    return False


@pytest.mark.skipif(inflight_engine_missing(), reason="in-flight engine not there yet")
def test_offline_inflight_engine(tmp_path):
    rows, _ = run_offline(tmp_path, "ft_runner")
    check_offline(rows, "ft_runner")
    for row in rows:  # the step profile accounts for every token computed, and for no more time than the run's
        profile = row["step_profile"].values()
        prefilled = sum(p["prefill_tokens"] for p in profile)
        # each request's first token comes from its prefill; the rest from a decode row each
        decoded = sum(p["decode_rows"] for p in profile)
        if row["request_rate"] == "inf":  # the first run: every prompt token computed
            assert (prefilled, decoded) == (row["total_input_tokens"], row["total_output_tokens"] - 6)
        else:  # the same prompts again: their full blocks come from the prefix cache (and a prompt's
            # one uncached token is a single-token row)
            assert 0 < prefilled < row["total_input_tokens"] and decoded >= row["total_output_tokens"] - 6
        assert 0 < sum(p["s"] for p in profile) <= row["duration_s"]
